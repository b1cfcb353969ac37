"""Pallas flash attention (FlashAttention-2 forward and backward) for TPU and GPU.

``flash_attention`` has the contract of ``reference.mha_reference`` (see ``attention.py``)
but never materialises the ``[T, S]`` scores: the forward pass streams key blocks with an
online softmax and saves only the output and the float32 logsumexp; the backward pass
precomputes ``delta = rowsum(dO * O)`` and recomputes probabilities block by block in two
kernels, dq (key blocks inner) and dk/dv (query blocks and the G query heads that share a
kv head inner, so GQA/MQA never repeats K/V in memory).

Backends: ``flash_tpu`` (Mosaic) and ``flash_gpu`` (Triton) share their math through
``flash_common``. Without an explicit ``backend`` the kernel is picked when lowering
(``lax.platform_dependent``), so ``jax.export(..., platforms=["tpu"|"cuda"])`` works from a
CPU host; on CPU, Pallas can only interpret, so the CPU branch runs the TPU kernel in
interpret mode.

Rows that see no key at all (padding) return 0 and get zero gradients; the contract leaves
them unspecified (the XLA reference returns the mean of v there).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from llava_jax import sharding
from llava_jax.kernels import flash_common as fc
from llava_jax.kernels import flash_gpu, flash_tpu

BACKENDS = ("tpu", "gpu")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes along the query (``block_q*``) and key (``block_k*``) axes, for the forward
  kernel, the dk/dv kernel and the dq kernel. They change speed, never results.
  ``BlockSizes.default(backend)`` gives the per-backend defaults."""

  block_q: int
  block_k: int
  block_q_dkv: int
  block_k_dkv: int
  block_q_dq: int
  block_k_dq: int

  def __post_init__(self):
    for name, value in self.items():
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"BlockSizes.{name} must be a positive int, got {value!r}")

  @classmethod
  def uniform(cls, block_q: int, block_k: int | None = None) -> BlockSizes:
    """The same query/key block for all three kernels."""
    block_k = block_q if block_k is None else block_k
    return cls(block_q, block_k, block_q, block_k, block_q, block_k)

  @classmethod
  def default(cls, backend: str) -> BlockSizes:
    """Defaults for "tpu" (128-lane multiples that fit the default scoped VMEM), "gpu"
    (Triton tiles that fit shared memory up to head dim 256) and "cpu" (interpret mode:
    large blocks, since interpret cost grows with the number of grid steps)."""
    try:
      return _DEFAULT_BLOCKS[backend]
    except KeyError:
      raise ValueError(
          f"no default block sizes for backend {backend!r}; expected one of {sorted(_DEFAULT_BLOCKS)}"
      ) from None

  def items(self):
    return [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)]

  def q_blocks(self) -> tuple[int, ...]:
    return self.block_q, self.block_q_dkv, self.block_q_dq

  def k_blocks(self) -> tuple[int, ...]:
    return self.block_k, self.block_k_dkv, self.block_k_dq

  def clip(self, t: int, s: int) -> BlockSizes:
    """Blocks no longer than the (already aligned) query length t / key length s."""
    return BlockSizes(
        min(self.block_q, t),
        min(self.block_k, s),
        min(self.block_q_dkv, t),
        min(self.block_k_dkv, s),
        min(self.block_q_dq, t),
        min(self.block_k_dq, s),
    )


_DEFAULT_BLOCKS = {
    "tpu": BlockSizes(block_q=512, block_k=512, block_q_dkv=256, block_k_dkv=256, block_q_dq=256, block_k_dq=256),
    "gpu": BlockSizes(block_q=128, block_k=64, block_q_dkv=64, block_k_dkv=64, block_q_dq=64, block_k_dq=64),
    "cpu": BlockSizes.uniform(128),
}


@dataclasses.dataclass(frozen=True)
class _Config:
  """Everything static about one call (a custom_vjp non-differentiable argument)."""

  mask: fc.MaskInfo
  scale: float
  soft_cap: float | None
  blocks: BlockSizes | None
  backend: str | None
  interpret: bool


def _dispatch(name: str, cfg: _Config, *args):
  """Calls ``flash_<backend>.<name>(*args, ...)``; without a fixed backend the choice is
  staged out and made when lowering for the target platform."""

  def branch(module, default_blocks: str, interpret: bool):
    blocks = cfg.blocks or BlockSizes.default(default_blocks)
    return lambda *a: getattr(module, name)(
        *a, mask=cfg.mask, scale=cfg.scale, soft_cap=cfg.soft_cap, blocks=blocks, interpret=interpret
    )

  if cfg.backend == "tpu":
    return branch(flash_tpu, "tpu", cfg.interpret)(*args)
  if cfg.backend == "gpu":
    return branch(flash_gpu, "gpu", cfg.interpret)(*args)
  return lax.platform_dependent(
      *args,
      tpu=branch(flash_tpu, "tpu", cfg.interpret),
      cuda=branch(flash_gpu, "gpu", cfg.interpret),
      rocm=branch(flash_gpu, "gpu", cfg.interpret),
      default=branch(flash_tpu, "cpu", True),
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash(q, k, v, q_seg, kv_seg, prefix, cfg: _Config):
  return _dispatch("forward", cfg, q, k, v, q_seg, kv_seg, prefix)[0]


def _flash_fwd(q, k, v, q_seg, kv_seg, prefix, cfg: _Config):
  o, lse = _dispatch("forward", cfg, q, k, v, q_seg, kv_seg, prefix)
  return o, (q, k, v, q_seg, kv_seg, prefix, o, lse)


def _flash_bwd(cfg: _Config, residuals, do):
  q, k, v, q_seg, kv_seg, prefix, o, lse = residuals
  dq, dk, dv = _dispatch("backward", cfg, q, k, v, q_seg, kv_seg, prefix, o, lse, do)
  return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def target_platform() -> str:
  """The platform this trace is compiled for: that of the enclosing mesh's devices
  (``with mesh:``, ``jax.set_mesh`` or an abstract mesh, any size, 1 device included),
  else ``jax.default_backend()``.

  An ahead-of-time compile for a TPU topology traces on a CPU host with the topology's
  devices in the mesh; deciding from the default backend there would silently compile
  the interpreted kernel (plain HLO, no Mosaic call) into the TPU program.
  """
  return sharding.context_platform() or jax.default_backend()


def flash_attention(
    q,
    k,
    v,
    *,
    causal: bool = True,
    segment_ids=None,
    kv_segment_ids=None,
    prefix_len=None,
    interpret: bool | None = None,
    logits_soft_cap: float | None = None,
    sliding_window: int | None = None,
    block_sizes: BlockSizes | None = None,
    backend: str | None = None,
):
  """Memory-efficient attention with the contract of ``mha_reference``; differentiable.

  Args:
    q: float[B, T, H, D] (float32 or bfloat16); k, v: float[B, S, K, D], H a multiple of K.
    causal: bottom-right aligned causal mask (query i sits at key position i + S - T).
    segment_ids: int32[B, T]; kv_segment_ids: int32[B, S] (defaults to segment_ids when
      T == S). Tokens attend only where ids are equal and non-zero.
    prefix_len: int32[B]; keys below it are visible to every query (needs causal=True).
    interpret: None decides from the platform being compiled for (``target_platform``:
      the devices of the enclosing mesh, else the default backend): interpret mode iff
      that is CPU. False forces the compiled kernel (what ``jax.export(platforms=[...])``
      needs), True interpret mode.
    logits_soft_cap: optional ``cap * tanh(logits / cap)`` before masking.
    sliding_window: optional local attention, keys with ``q_pos - k_pos < window``.
    block_sizes: tile sizes; None uses ``BlockSizes.default`` of the chosen backend.
    backend: "tpu" or "gpu" forces that kernel (in interpret mode it runs anywhere);
      None picks it at lowering time from the target platform.
  Returns:
    float[B, T, H, D] in q's dtype; softmax statistics are float32.
  """
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"expected q [B,T,H,D], k/v [B,S,K,D]; got {q.shape}, {k.shape}, {v.shape}")
  b, t, h, d = q.shape
  s, kh = k.shape[1], k.shape[2]
  if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
    raise ValueError(f"k {k.shape} and v {v.shape} must be [B={b}, S, K, D={d}]")
  if h % kh:
    raise ValueError(f"query heads {h} must be a multiple of kv heads {kh}")
  if backend not in (None, *BACKENDS):
    raise ValueError(f"unknown backend {backend!r}; expected None or one of {BACKENDS}")
  if logits_soft_cap is not None and not logits_soft_cap > 0:
    raise ValueError(f"logits_soft_cap must be positive, got {logits_soft_cap}")
  if sliding_window is not None and sliding_window < 1:
    raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
  if interpret is None:
    interpret = target_platform() == "cpu"

  segmented = segment_ids is not None or kv_segment_ids is not None
  if segmented:
    if kv_segment_ids is None:
      if t != s:
        raise ValueError(f"kv_segment_ids required when T ({t}) != S ({s})")
      kv_segment_ids = segment_ids
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32)
    segment_ids = jnp.asarray(segment_ids, jnp.int32)
    kv_segment_ids = jnp.asarray(kv_segment_ids, jnp.int32)
    if segment_ids.shape != (b, t) or kv_segment_ids.shape != (b, s):
      raise ValueError(
          f"segment ids must be int32[{b}, {t}] and int32[{b}, {s}], got "
          f"{segment_ids.shape} and {kv_segment_ids.shape}"
      )
  if prefix_len is not None:
    if not causal:
      raise ValueError("prefix_len only makes sense with causal=True")
    prefix = jnp.asarray(prefix_len, jnp.int32)
    if prefix.shape != (b,):
      raise ValueError(f"prefix_len must be int32[{b}], got shape {prefix.shape}")
  else:
    prefix = jnp.zeros((b,), jnp.int32)  # a scalar-prefetch operand either way

  mask = fc.MaskInfo(
      causal=causal,
      q_offset=s - t,
      kv_len=s,
      sliding_window=sliding_window,
      segmented=segmented,
      prefixed=prefix_len is not None,
  )
  cfg = _Config(
      mask=mask,
      scale=1.0 / math.sqrt(d),
      soft_cap=None if logits_soft_cap is None else float(logits_soft_cap),
      blocks=block_sizes,
      backend=backend,
      interpret=bool(interpret),
  )
  return _flash(q, k, v, segment_ids, kv_segment_ids, prefix, cfg)
