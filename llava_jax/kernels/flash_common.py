"""Math shared by the TPU (Mosaic) and GPU (Triton) flash-attention kernels.

Everything here is plain jnp/lax on in-kernel values, so it lowers through both Pallas
backends and through interpret mode. The backends only differ in how they lay tiles out:
the TPU kernels keep row statistics lane-broadcast (``float32[bq, 128]``) and build 2-D
iotas, the GPU kernels keep ``float32[bq, 1]`` and 1-D aranges; both hand this module
arrays that already broadcast against the ``[rows, cols]`` score tile.

Conventions: positions are in *key coordinates* (query row r sits at ``r + q_offset``,
``q_offset = S - T`` for bottom-right causal alignment). Masked scores are replaced by
``MASK_VALUE`` (finite, as in ``reference.py``). A query row that sees no key at all gets
output 0 and ``lse = EMPTY_ROW_LSE``, which makes its backward probabilities exactly 0.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from jax import lax

from llava_jax.kernels.reference import MASK_VALUE

# exp(MASK_VALUE - EMPTY_ROW_LSE) underflows to 0: rows with no visible key contribute
# nothing to dq/dk/dv, consistent with their forward output being the constant 0.
EMPTY_ROW_LSE = -MASK_VALUE

NT_DIMS = (((1,), (1,)), ((), ()))  # a @ b.T
TN_DIMS = (((0,), (0,)), ((), ()))  # a.T @ b
NN_DIMS = (((1,), (0,)), ((), ()))  # a @ b


def dot(a, b, dims=NN_DIMS):
  """2-D matmul with float32 accumulation; ``dims`` picks which operand is transposed."""
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


@dataclasses.dataclass(frozen=True)
class MaskInfo:
  """Static description of which (query, key) pairs are visible (hashable: a jit static).

  Attributes:
    causal: bottom-right aligned causal mask.
    q_offset: key position of query row 0 (``S - T`` of the unpadded inputs).
    kv_len: unpadded key length; keys at positions ``>= kv_len`` are padding.
    kv_padded: whether the kernel sees padded keys that must be masked by position.
    sliding_window: keys with ``q_pos - k_pos >= sliding_window`` are hidden.
    segmented: segment ids are passed (equal and non-zero ids attend).
    prefixed: ``prefix_len`` is passed (keys below it are visible to every query).
  """

  causal: bool
  q_offset: int
  kv_len: int
  kv_padded: bool = False
  sliding_window: int | None = None
  segmented: bool = False
  prefixed: bool = False

  def padded(self, padded_kv_len: int) -> MaskInfo:
    """The same mask for a kernel that sees keys padded up to ``padded_kv_len``."""
    return dataclasses.replace(self, kv_padded=padded_kv_len > self.kv_len)

  def visible(self, q_pos, k_pos, q_seg=None, kv_seg=None, prefix=None):
    """bool[rows, cols] (or None when everything is visible) for one score tile.

    Args:
      q_pos, k_pos: int32 positions in key coordinates, broadcastable to the tile.
      q_seg, kv_seg: int32 segment ids broadcastable to the tile (if ``segmented``).
      prefix: int32 scalar prefix length of this batch row (if ``prefixed``).
    """
    mask = None

    def both(a, b):
      return b if a is None else jnp.logical_and(a, b)

    if self.causal:
      mask = k_pos <= q_pos
      if self.prefixed:
        mask = jnp.logical_or(mask, k_pos < prefix)
    if self.sliding_window is not None:
      mask = both(mask, (q_pos - k_pos) < self.sliding_window)
    if self.segmented:
      mask = both(mask, jnp.logical_and(q_seg == kv_seg, kv_seg != 0))
    elif self.kv_padded:
      # With segment ids the wrapper pads keys with id 0, which already hides them.
      mask = both(mask, k_pos < self.kv_len)
    return mask

  def kv_block_range(self, q_start, block_q: int, block_k: int, num_k_blocks: int, prefix=None):
    """int32 (lo, hi): key blocks ``lo <= j < hi`` may hold a visible key for queries
    in rows ``[q_start, q_start + block_q)``; the other blocks are skipped."""
    lo, hi = 0, num_k_blocks
    if self.sliding_window is not None:
      # Some pair in the block is visible iff (j + 1) * block_k > q_lo - window + 1.
      first = q_start + self.q_offset - self.sliding_window + 1
      lo = lax.div(jnp.maximum(first, 0), block_k)
    if self.causal:
      last = q_start + block_q - 1 + self.q_offset  # largest query position
      hi = jnp.minimum(lax.div(jnp.maximum(last + block_k, 0), block_k), num_k_blocks)
      if self.prefixed:
        hi = jnp.maximum(hi, jnp.minimum(cdiv(prefix, block_k), num_k_blocks))
    return jnp.asarray(lo, jnp.int32), jnp.asarray(hi, jnp.int32)

  def q_block_range(self, k_start, block_q: int, block_k: int, num_q_blocks: int, prefix=None):
    """int32 (lo, hi): query blocks ``lo <= i < hi`` may see a key in rows
    ``[k_start, k_start + block_k)``; the transpose of ``kv_block_range``."""
    lo, hi = 0, num_q_blocks
    if self.causal:
      # First block whose last query position reaches k_start.
      lo = lax.div(jnp.maximum(k_start - self.q_offset, 0), block_q)
      if self.prefixed:
        lo = jnp.where(k_start < prefix, 0, lo)
    if self.sliding_window is not None:
      # Blocks whose first query is at least `window` past the block's last key see none.
      bound = self.sliding_window + k_start + block_k - 1 - self.q_offset
      hi = jnp.minimum(cdiv(jnp.maximum(bound, 0), block_q), num_q_blocks)
    return jnp.asarray(lo, jnp.int32), jnp.asarray(hi, jnp.int32)


def cdiv(a, b: int):
  """ceil(a / b) for non-negative int32 ``a`` (traced or Python) and positive int ``b``."""
  if isinstance(a, int):
    return -(-a // b)
  return lax.div(a + (b - 1), b)


def scores(raw, *, scale: float, soft_cap: float | None):
  """float32[rows, cols] logits from raw ``q.k`` products, and the tanh needed by the
  soft-cap derivative (None without soft cap): ``cap * tanh(raw * scale / cap)``."""
  s = raw * scale
  if soft_cap is None:
    return s, None
  t = jnp.tanh(s / soft_cap)
  return soft_cap * t, t


def apply_mask(s, mask):
  """Replaces hidden scores by MASK_VALUE (not -inf: keeps every row finite)."""
  return s if mask is None else jnp.where(mask, s, MASK_VALUE)


def online_softmax_step(m_prev, l_prev, s, expand=lambda x: x):
  """One FlashAttention-2 update of the running max ``m`` and denominator ``l``.

  Args:
    m_prev, l_prev: float32[rows, w] (w = 1, or lane-broadcast w = 128 on TPU).
    s: float32[rows, cols] masked scores of the current key block.
    expand: maps ``[rows, w]`` to ``[rows, cols]`` (identity when w = 1).
  Returns:
    (m_next, l_next, alpha, p): alpha float32[rows, w] rescales the old accumulator,
    p float32[rows, cols] are the unnormalised probabilities of this block.
  """
  m_curr = jnp.max(s, axis=-1, keepdims=True)
  m_next = jnp.maximum(m_prev, m_curr)
  alpha = jnp.exp(m_prev - m_next)
  p = jnp.exp(s - expand(m_next))
  l_next = alpha * l_prev + jnp.sum(p, axis=-1, keepdims=True)
  return m_next, l_next, alpha, p


def init_stats(shape):
  """Initial (m, l): m starts at MASK_VALUE so fully masked blocks keep m finite."""
  return jnp.full(shape, MASK_VALUE, jnp.float32), jnp.zeros(shape, jnp.float32)


def finalize(m, l):
  """(inv_l, lse), both float32 like ``m``. Rows that never saw a visible key (m still
  MASK_VALUE) get inv_l = 0 (output 0) and lse = EMPTY_ROW_LSE."""
  seen = m > MASK_VALUE
  inv_l = jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)
  lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), EMPTY_ROW_LSE)
  return inv_l, lse


def score_grad(p, dp, delta, tanh_s, *, scale: float):
  """d loss / d raw ``q.k`` for one tile: ``p * (dp - delta)`` through soft cap and scale.

  Args:
    p: float32 tile of normalised probabilities ``exp(s - lse)``.
    dp: float32 tile ``dO . v``; delta: ``rowsum(dO * O)`` broadcastable to the tile.
    tanh_s: the tanh returned by ``scores`` (None without soft cap).
  """
  ds = p * (dp - delta)
  if tanh_s is not None:
    ds = ds * (1.0 - tanh_s * tanh_s)
  return ds * scale


def round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def pad_axis(x, axis: int, size: int, value=0):
  """Pads ``x`` along ``axis`` up to ``size`` with ``value`` (no-op when already there)."""
  if x is None or x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


def padded_lengths(t: int, s: int, q_blocks, k_blocks) -> tuple[int, int]:
  """Query/key lengths padded to a multiple of every block size used on that axis."""
  return round_up(t, math.lcm(*q_blocks)), round_up(s, math.lcm(*k_blocks))


def pad_inputs(q, k, v, q_seg, kv_seg, blocks):
  """Pads the sequence axes to a multiple of every block size in ``blocks``.

  Args:
    q: float[B, T, H, D]; k, v: float[B, S, K, D]; q_seg int32[B, T], kv_seg int32[B, S]
      (or None). Padded keys get segment id 0 (or are masked by position, see
      ``MaskInfo.padded``); padded query rows are sliced off by the caller.
  Returns:
    (q, k, v, q_seg, kv_seg, Tp, Sp) padded.
  """
  tp, sp = padded_lengths(q.shape[1], k.shape[1], blocks.q_blocks(), blocks.k_blocks())
  return (
      pad_axis(q, 1, tp),
      pad_axis(k, 1, sp),
      pad_axis(v, 1, sp),
      pad_axis(q_seg, 1, tp),
      pad_axis(kv_seg, 1, sp),
      tp,
      sp,
  )


def attention_delta(o, do):
  """float32[B, H, T] ``rowsum(dO * O)`` (FlashAttention-2 backward precompute).

  Args: o, do: float[B, T, H, D].
  """
  return jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))


__all__ = [
    "EMPTY_ROW_LSE",
    "MASK_VALUE",
    "MaskInfo",
    "apply_mask",
    "attention_delta",
    "cdiv",
    "dot",
    "finalize",
    "init_stats",
    "online_softmax_step",
    "pad_axis",
    "pad_inputs",
    "padded_lengths",
    "round_up",
    "score_grad",
    "scores",
]
