"""CLIP and SigLIP vision transformers (one module; variants are config flags).

Einsum letters: B batch, N image tokens, E width, H heads, D head dim, F mlp.
Param names follow Hugging Face (``embeddings/patch_embedding``, ``encoder/layers``,
``self_attn/q_proj`` …) so converters map name to name.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from llava_jax.kernels.attention import attention
from llava_jax.models.configs import VisionConfig
from llava_jax.models.layers import ACT, LayerStack, activation, dense, dtype_of, layer_norm, logical


class Attention(nn.Module):
  """Bidirectional multi-head attention with biased q/k/v/out projections."""

  cfg: VisionConfig

  @nn.compact
  def __call__(self, x, kv=None):
    """x float[B, T, E] (queries); kv float[B, S, E] (defaults to x). Returns float[B, T, E]."""
    c, dt = self.cfg, dtype_of(self.cfg.dtype)
    kv = x if kv is None else kv
    h, d = c.num_heads, c.width // c.num_heads
    proj = lambda name: dense((h, d), ("embed", "heads", "head_dim"), name=name, dtype=dt)
    q, k, v = proj("q_proj")(x), proj("k_proj")(kv), proj("v_proj")(kv)
    o = attention(q, k, v, causal=False, impl=c.attn_impl)
    return dense(c.width, ("heads", "head_dim", "embed"), axis=(-2, -1), name="out_proj", dtype=dt)(o)


class MLP(nn.Module):
  width: int
  mlp_dim: int
  act: str
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x):
    dt = dtype_of(self.dtype)
    x = dense(self.mlp_dim, ("embed", "mlp"), name="fc1", dtype=dt)(x)
    x = activation(self.act)(x)
    return dense(self.width, ("mlp", "embed"), name="fc2", dtype=dt)(x)


class EncoderLayer(nn.Module):
  """Pre-LN transformer block: x + attn(ln1(x)); x + mlp(ln2(x))."""

  cfg: VisionConfig

  @nn.compact
  def __call__(self, x):
    c, dt = self.cfg, dtype_of(self.cfg.dtype)
    x = x + Attention(c, name="self_attn")(layer_norm(c.layer_norm_eps, "layer_norm1", dt)(x))
    y = layer_norm(c.layer_norm_eps, "layer_norm2", dt)(x)
    x = x + MLP(c.width, c.mlp_dim, c.act, c.dtype, name="mlp")(y)
    return nn.with_logical_constraint(x, ACT), None


class MAPHead(nn.Module):
  """SigLIP multi-head attention pooling: a learned probe attends over all tokens."""

  cfg: VisionConfig

  @nn.compact
  def __call__(self, x):
    """x float[B, N, E] -> float[B, E]."""
    c = self.cfg
    probe = self.param(
        "probe", logical(nn.initializers.xavier_uniform(), (None, None, "embed")), (1, 1, c.width), jnp.float32
    )
    h = Attention(c, name="attention")(jnp.broadcast_to(probe, (x.shape[0], 1, c.width)), x)
    h = h + MLP(c.width, c.mlp_dim, c.act, c.dtype, name="mlp")(
        layer_norm(c.layer_norm_eps, "layernorm", dtype_of(c.dtype))(h)
    )
    return h[:, 0]


class VisionTransformer(nn.Module):
  """CLIP / SigLIP ViT tower.

  ``__call__`` returns LLaVA's image features: ``hidden_states[select_layer]`` (HF
  indexing: 0 is the embedding output) with the class token dropped for
  ``select_feature="patch"``; only the layers needed are computed.
  ``tower`` returns HF's ``(last_hidden_state, pooler_output)`` for the full tower.
  """

  cfg: VisionConfig

  def setup(self):
    c = self.cfg
    dt = dtype_of(c.dtype)
    self.patch_embedding = nn.Conv(
        c.width,
        (c.patch_size, c.patch_size),
        strides=(c.patch_size, c.patch_size),
        padding="VALID",
        use_bias=c.patch_bias,
        dtype=dt,
        param_dtype=jnp.float32,
        kernel_init=logical(nn.initializers.lecun_normal(), ("patch_h", "patch_w", "channels", "embed")),
        bias_init=logical(nn.initializers.zeros_init(), ("embed",)),
    )
    n_pos = c.num_patches + int(c.class_token)
    self.position_embedding = self.param(
        "position_embedding", logical(nn.initializers.normal(0.02), (None, "embed")), (n_pos, c.width), jnp.float32
    )
    if c.class_token:
      self.class_embedding = self.param(
          "class_embedding", logical(nn.initializers.normal(0.02), ("embed",)), (c.width,), jnp.float32
      )
    if c.pre_norm:
      self.pre_layrnorm = layer_norm(c.layer_norm_eps, "pre_layrnorm", dt)
    self.encoder = LayerStack(EncoderLayer, c, depth=c.depth, scan=c.scan, remat=c.remat, name="encoder")
    self.post_layernorm = layer_norm(c.layer_norm_eps, "post_layernorm", dt)
    if c.head:
      self.head = MAPHead(c, name="head")

  def embed(self, pixel_values):
    """float32[B, S, S, 3] (normalised, NHWC) -> float[B, N(+1), E] encoder input."""
    c = self.cfg
    if pixel_values.shape[1:] != (c.image_size, c.image_size, 3):
      raise ValueError(
          f"pixel_values shape {pixel_values.shape}: expected [B, {c.image_size}, {c.image_size}, 3] (NHWC)"
      )
    x = self.patch_embedding(pixel_values.astype(dtype_of(c.dtype)))
    x = x.reshape(x.shape[0], -1, c.width)
    if c.class_token:
      cls = jnp.broadcast_to(self.class_embedding.astype(x.dtype), (x.shape[0], 1, c.width))
      x = jnp.concatenate([cls, x], axis=1)
    x = x + self.position_embedding.astype(x.dtype)
    if c.pre_norm:
      x = self.pre_layrnorm(x)
    return nn.with_logical_constraint(x, ACT)

  def hidden_state(self, pixel_values, num_layers: int):
    """HF ``hidden_states[num_layers]``: float[B, N(+1), E] after ``num_layers`` blocks."""
    return self.encoder(self.embed(pixel_values), num_layers=num_layers)

  def tower(self, pixel_values):
    """HF vision model outputs: (last_hidden_state float[B, N(+1), E], pooled float[B, E])."""
    c = self.cfg
    x = self.hidden_state(pixel_values, c.depth)
    if c.kind == "clip":  # CLIP: last_hidden_state un-normed; pooled = LN(class token)
      return x, self.post_layernorm(x[:, 0])
    x = self.post_layernorm(x)
    return x, (self.head(x) if c.head else x.mean(axis=1))

  def __call__(self, pixel_values):
    """float32[B, S, S, 3] -> image features float[B, N_img, E]."""
    c = self.cfg
    if self.is_initializing():  # create every param, including the unused tail
      self.tower(pixel_values)
    x = self.hidden_state(pixel_values, c.num_layers_used)
    if c.feature_norm:
      x = self.post_layernorm(x)
    if c.class_token and c.select_feature == "patch":
      x = x[:, 1:]
    return x
