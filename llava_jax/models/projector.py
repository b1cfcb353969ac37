"""Vision-to-language projector: ``linear``, ``mlp2x_gelu`` (LLaVA-1.5) or ``identity``.

Names follow HF's ``multi_modal_projector``: ``linear_1`` (and ``linear_2``).
"""

from __future__ import annotations

import flax.linen as nn
import jax

from llava_jax.models.configs import ProjectorConfig
from llava_jax.models.layers import dense, dtype_of


class Projector(nn.Module):
  cfg: ProjectorConfig
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x):
    """float[..., in_dim] -> float[..., out_dim]."""
    c, dt = self.cfg, dtype_of(self.dtype)
    if c.kind == "identity":
      return x
    x = dense(c.out_dim, ("embed", "mlp"), name="linear_1", use_bias=c.bias, dtype=dt)(x)
    if c.kind == "linear":
      return x
    x = jax.nn.gelu(x, approximate=False)  # LLaVA uses nn.GELU(): the exact erf form
    return dense(c.out_dim, ("mlp", "embed"), name="linear_2", use_bias=c.bias, dtype=dt)(x)
