"""Building blocks shared by the ViT and the LLM: norms, dense layers with logical axes,
activations, RoPE, and the scanned / rematerialised layer stack.

Einsum letters: B batch, T sequence, E embed, F mlp, H heads, K kv heads, D head dim.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llava_jax.models.configs import RopeScaling

Array = jax.Array

# Logical axes of activations, for ``nn.with_logical_constraint`` (``sharding.LOGICAL_RULES``
# maps them onto the mesh). Written once here so every module constrains alike.
ACT = ("act_batch", "act_seq", "act_embed")  # float[B, T, E]
ACT_HEADS = ("act_batch", "act_seq", "act_heads", "act_head_dim")  # float[B, T, H, D]
ACT_MLP = ("act_batch", "act_seq", "act_mlp")  # float[B, T, F]
ACT_LOGITS = ("act_batch", "act_seq", "act_vocab")  # float32[B, T, V]
ACT_TOKENS = ("act_batch", "act_seq")  # int32[B, T] (segment ids)
# One layer's cache k/v float[B, S, K, D]; the stacked cache adds a leading (unsharded) layer axis.
CACHE_AXES = ("act_batch", "act_seq", "act_kv_heads", "act_head_dim")


def dtype_of(name: str):
  return jnp.dtype(name)


def logical(init: Callable, axes: Sequence[str | None]) -> Callable:
  return nn.with_logical_partitioning(init, tuple(axes))


class DenseGeneral(nn.Module):
  """``x @ kernel (+ bias)`` contracting ``axis`` of x, with the kernel created at its full
  shape (e.g. [E, H, D]) so its logical axis names always match its rank.

  (flax.linen.DenseGeneral creates the kernel flat and reshapes it afterwards, which
  breaks logical-sharding constraints on multi-dimensional kernels under a mesh.)
  """

  features: tuple[int, ...]
  axis: tuple[int, ...]
  kernel_axes: tuple[str | None, ...]
  bias_axes: tuple[str | None, ...]
  use_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    axis = tuple(a % x.ndim for a in self.axis)
    in_shape = tuple(x.shape[a] for a in axis)
    n_in, n_out = len(in_shape), len(self.features)
    init = nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, n_in + n_out))
    )
    kernel = self.param("kernel", logical(init, self.kernel_axes), in_shape + self.features, jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if axis == tuple(range(x.ndim - n_in, x.ndim)):
      # Trailing contraction: one 2-D matmul [N, I] @ [I, O]. The same math, but XLA:CPU
      # then finds the weight-gradient dot (x^T @ dy) without transposing dy first (the
      # N-D form costs an extra transpose copy of each [B, T, F] activation gradient).
      # Merging major-most dims keeps every sharding expressible.
      batch_shape = x.shape[: x.ndim - n_in]
      y = jnp.dot(x.reshape(-1, int(np.prod(in_shape))), kernel.reshape(int(np.prod(in_shape)), -1))
      y = y.reshape(batch_shape + self.features)
    else:
      y = jax.lax.dot_general(x, kernel, ((axis, tuple(range(n_in))), ((), ())))
    if self.use_bias:
      bias = self.param("bias", logical(nn.initializers.zeros_init(), self.bias_axes), self.features, jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


def dense(
    features: int | Sequence[int],
    axes: Sequence[str | None],
    *,
    name: str,
    use_bias: bool = True,
    axis: int | Sequence[int] = -1,
    dtype=jnp.float32,
    bias_axes: Sequence[str | None] | None = None,
) -> DenseGeneral:
  """A dense layer whose kernel (and bias) carry logical axis names (float32 params)."""
  feats = (features,) if isinstance(features, int) else tuple(features)
  axis = (axis,) if isinstance(axis, int) else tuple(axis)
  return DenseGeneral(
      features=feats,
      axis=axis,
      kernel_axes=tuple(axes),
      bias_axes=tuple(bias_axes or axes[-len(feats) :]),
      use_bias=use_bias,
      dtype=dtype,
      name=name,
  )


def layer_norm(eps: float, name: str, dtype=jnp.float32) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=eps,
      dtype=dtype,
      param_dtype=jnp.float32,
      name=name,
      scale_init=logical(nn.initializers.ones_init(), ("norm",)),
      bias_init=logical(nn.initializers.zeros_init(), ("norm",)),
  )


class RMSNorm(nn.Module):
  """x / rms(x) * w, computed in float32 (as HF Llama/Gemma); Gemma applies (1 + w)."""

  eps: float = 1e-6
  plus_one: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    init = nn.initializers.zeros_init() if self.plus_one else nn.initializers.ones_init()
    w = self.param("scale", logical(init, ("norm",)), (x.shape[-1],), jnp.float32)
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    if self.plus_one:  # Gemma multiplies in float32 before casting back
      return (y * (1.0 + w)).astype(self.dtype)
    # Llama casts the normalised activations to the input dtype, then scales.
    return (w * y.astype(x.dtype)).astype(self.dtype)


def activation(name: str) -> Callable[[Array], Array]:
  if name == "quick_gelu":
    return lambda x: x * jax.nn.sigmoid(1.702 * x)
  if name == "gelu_tanh":
    return lambda x: jax.nn.gelu(x, approximate=True)
  if name == "gelu":
    return lambda x: jax.nn.gelu(x, approximate=False)
  if name == "silu":
    return jax.nn.silu
  raise ValueError(f"unknown activation {name!r}")


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
  """float32[D/2] inverse frequencies, with Llama-3 or linear scaling (as HF computes them)."""
  inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
  if scaling is None:
    return inv.astype(np.float32)
  if scaling.kind == "linear":
    return (inv / scaling.factor).astype(np.float32)
  if scaling.kind != "llama3":
    raise ValueError(f"unsupported rope scaling {scaling.kind!r}")
  low_wavelen = scaling.original_max_position / scaling.low_freq_factor
  high_wavelen = scaling.original_max_position / scaling.high_freq_factor
  wavelen = 2 * math.pi / inv
  scaled = np.where(wavelen > low_wavelen, inv / scaling.factor, inv)
  smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) / (
      scaling.high_freq_factor - scaling.low_freq_factor
  )
  smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: Array, positions: Array, inv_freq: np.ndarray) -> Array:
  """Rotary embedding in HF's rotate-half convention.

  Args: x float[B, T, H, D]; positions int32[B, T]; inv_freq float32[D/2].
  Returns: float[B, T, H, D] in x's dtype (angles computed in float32).
  """
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, D/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return x * cos + rotated * sin


_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class LayerStack(nn.Module):
  """``depth`` copies of ``block_cls(cfg)``; runs the first ``num_layers`` of them.

  ``scan=True`` stores params with a leading ``layers`` axis (one compiled block,
  ``nn.scan``); ``scan=False`` stores ``layers_0 … layers_{depth-1}``. Either way every
  layer exists in the param tree (so checkpoints round-trip) while only the layers
  needed are computed (e.g. LLaVA's ``select_layer=-2`` skips the ViT's last block).
  Blocks are called as ``block(x, *args) -> (x, None)``; ``args`` are broadcast.

  ``layer_state`` (e.g. a KV cache): a pytree whose leaves have a leading layer axis
  [num_layers, ...]. Layer i then gets ``block(x, *args, state_i) -> (x, new_state_i)``
  and the call returns ``(x, new_layer_state)`` with the new states stacked the same way
  (scanned input and output under ``scan=True``).
  """

  block_cls: Any
  cfg: Any
  depth: int
  scan: bool = False
  remat: str = "none"

  @nn.compact
  def __call__(self, x: Array, *args, num_layers: int | None = None, layer_state: Any = None):
    n = self.depth if (num_layers is None or self.is_initializing()) else num_layers
    if not 0 <= n <= self.depth:
      raise ValueError(f"num_layers {n} out of range [0, {self.depth}]")
    has_state = layer_state is not None
    if has_state:
      for leaf in jax.tree.leaves(layer_state):
        if leaf.shape[0] != n:
          raise ValueError(f"layer_state leaves need a leading axis of {n} layers, got shape {leaf.shape}")
      args = args + (layer_state,)
    block = self.block_cls
    if self.remat != "none":
      block = nn.remat(block, policy=_REMAT_POLICIES[self.remat], prevent_cse=not self.scan)
    if not self.scan:
      new_states = []
      for i in range(n):
        call_args = args
        if has_state:
          call_args = args[:-1] + (jax.tree.map(lambda a: a[i], layer_state),)
        x, new = block(self.cfg, name=f"layers_{i}")(x, *call_args)
        new_states.append(new)
      if has_state:
        return x, jax.tree.map(lambda *a: jnp.stack(a), *new_states)
      return x
    if n == 0:
      return (x, layer_state) if has_state else x
    in_axes = (nn.broadcast,) * (len(args) - has_state) + ((0,) if has_state else ())
    scanned = nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=in_axes,
        length=n,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    if n != self.depth:
      # Run a prefix of the stored layers: slice the stacked params on the way in.
      scanned = nn.map_variables(scanned, "params", init=False, trans_in_fn=lambda t: jax.tree.map(lambda a: a[:n], t))
    x, new_states = scanned(self.cfg, name="layers")(x, *args)
    return (x, new_states) if has_state else x
