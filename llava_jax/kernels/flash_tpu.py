"""Flash attention forward/backward as Pallas TPU (Mosaic) kernels.

Layout: the wrapper transposes to head-major ``[B, H, T, D]`` so every tile is a
contiguous ``[block, D]`` VMEM slab (the minor two block dims must be (8, 128)-aligned or
full). Running statistics (m, l) are lane-broadcast ``[rows, 128]`` scratch and segment ids
are lane/sublane-broadcast, as in the official Pallas TPU flash and splash kernels. The
forward pass transposes its final lse tile once per query block and writes it as a
sublane-broadcast row ``[8, bq]`` (8x, not the 128x of a lane-broadcast column, in HBM).
``prefix_len`` travels as a scalar-prefetch operand (SMEM), which also lets the index maps
skip the DMA of key/query blocks that are fully masked.

Grids (the last axes are the reduction, "arbitrary"):
  forward  (B, H, T/bq, S/bk)            accumulates o over key blocks
  dq       (B, H, T/bq, S/bk)            accumulates dq over key blocks
  dk, dv   (B, K, S/bk, G, T/bq)         accumulates over the G query heads of kv head K
                                         and all query blocks: GQA without repeating K/V.
The dk/dv kernel works on transposed tiles ``s.T = k q^T`` ([bk, bq]) so lse/delta are
rows and no tile is transposed in VMEM (as splash attention does).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from llava_jax.kernels import flash_common as fc

NUM_LANES = 128
NUM_SUBLANES = 8


def _lanes(x, n: int):
  """Lane-broadcast ``[rows, w]`` -> ``[rows, n]`` (slice when n < w, tile when n > w)."""
  w = x.shape[-1]
  if n == w:
    return x
  if n < w:
    return x[:, :n]
  reps, rem = divmod(n, w)
  if rem:
    raise ValueError(f"cannot lane-broadcast width {w} to {n}")
  return jnp.tile(x, (1, reps))


def _clamp(idx, lo, hi, num):
  """Block index to fetch at grid step ``idx``: skipped steps re-use a needed block, so
  the pipeline issues no DMA for them."""
  return jnp.minimum(jnp.clip(idx, lo, jnp.maximum(hi - 1, lo)), num - 1)


def _prefix(mask, prefix_ref, b):
  return prefix_ref[b] if mask.prefixed else None


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(
    prefix_ref,
    q_ref,
    k_ref,
    v_ref,
    qseg_ref,
    kvseg_ref,  # inputs
    o_ref,
    lse_ref,  # outputs
    m_sc,
    l_sc,
    acc_sc,  # scratch
    *,
    mask: fc.MaskInfo,
    scale,
    soft_cap,
    block_q,
    block_k,
    num_k_blocks,
):
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  head_dim = acc_sc.shape[-1]
  prefix = _prefix(mask, prefix_ref, b)

  @pl.when(j == 0)
  def _init():
    m0, l0 = fc.init_stats(m_sc.shape)
    m_sc[...] = m0
    l_sc[...] = l0
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  lo, hi = mask.kv_block_range(i * block_q, block_q, block_k, num_k_blocks, prefix)

  @pl.when(jnp.logical_and(j >= lo, j < hi))
  def _run():
    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    s, _ = fc.scores(fc.dot(q, k, fc.NT_DIMS), scale=scale, soft_cap=soft_cap)
    shape = (block_q, block_k)
    q_pos = lax.broadcasted_iota(jnp.int32, shape, 0) + (i * block_q + mask.q_offset)
    k_pos = lax.broadcasted_iota(jnp.int32, shape, 1) + j * block_k
    q_seg = _lanes(qseg_ref[...], block_k) if mask.segmented else None
    kv_seg = kvseg_ref[:1, :] if mask.segmented else None
    s = fc.apply_mask(s, mask.visible(q_pos, k_pos, q_seg, kv_seg, prefix))
    m_next, l_next, alpha, p = fc.online_softmax_step(m_sc[...], l_sc[...], s, lambda x: _lanes(x, block_k))
    m_sc[...] = m_next
    l_sc[...] = l_next
    acc_sc[...] = acc_sc[...] * _lanes(alpha, head_dim) + fc.dot(p.astype(v.dtype), v)

  @pl.when(j == num_k_blocks - 1)
  def _store():
    inv_l, lse = fc.finalize(m_sc[...], l_sc[...])
    o_ref[...] = (acc_sc[...] * _lanes(inv_l, head_dim)).astype(o_ref.dtype)
    lse_ref[...] = lse.T[:NUM_SUBLANES, :]  # column [bq, 128] -> rows [8, bq]


def _segment_operands(q_seg, kv_seg, *, q_rows: bool):
  """Broadcast int32[B, T] / int32[B, S] ids into the layouts the tiles read.

  q_rows=False (forward, dq): q ids ``[B, T, 128]`` (a column per tile), kv ids
  ``[B, 8, S]`` (a row). q_rows=True (dk/dv, transposed tiles): the other way round.
  """
  if q_seg is None:
    return None, None
  b, t = q_seg.shape
  s = kv_seg.shape[1]
  if q_rows:
    return (
        lax.broadcast_in_dim(q_seg, (b, NUM_SUBLANES, t), (0, 2)),
        lax.broadcast_in_dim(kv_seg, (b, s, NUM_LANES), (0, 1)),
    )
  return (
      lax.broadcast_in_dim(q_seg, (b, t, NUM_LANES), (0, 1)),
      lax.broadcast_in_dim(kv_seg, (b, NUM_SUBLANES, s), (0, 2)),
  )


def _forward_padded(q, k, v, q_seg, kv_seg, prefix, *, mask, scale, soft_cap, block_q, block_k, interpret):
  """q float[B, H, Tp, D], k/v float[B, K, Sp, D] (head-major, padded) ->
  (o float[B, H, Tp, D], lse float32[B, H, Tp])."""
  b, h, t, d = q.shape
  kh, s = k.shape[1], k.shape[2]
  group = h // kh
  nq, nk = t // block_q, s // block_k

  def kv_block(bi, i, j, prefix_ref):
    lo, hi = mask.kv_block_range(i * block_q, block_q, block_k, nk, _prefix(mask, prefix_ref, bi))
    return _clamp(j, lo, hi, nk)

  q_spec = pl.BlockSpec((None, None, block_q, d), lambda bi, hi, i, j, p: (bi, hi, i, 0))
  kv_spec = pl.BlockSpec(
      (None, None, block_k, d), lambda bi, hi, i, j, p: (bi, lax.div(hi, group), kv_block(bi, i, j, p), 0)
  )
  q_seg_b, kv_seg_b = _segment_operands(q_seg, kv_seg, q_rows=False)
  seg_specs = [None, None]
  if q_seg is not None:
    seg_specs = [
        pl.BlockSpec((None, block_q, NUM_LANES), lambda bi, hi, i, j, p: (bi, i, 0)),
        pl.BlockSpec((None, NUM_SUBLANES, block_k), lambda bi, hi, i, j, p: (bi, 0, kv_block(bi, i, j, p))),
    ]
  kernel = functools.partial(
      _fwd_kernel, mask=mask, scale=scale, soft_cap=soft_cap, block_q=block_q, block_k=block_k, num_k_blocks=nk
  )
  o, lse = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(b, h, nq, nk),
          in_specs=[q_spec, kv_spec, kv_spec, *seg_specs],
          out_specs=[
              pl.BlockSpec((None, None, block_q, d), lambda bi, hi, i, j, p: (bi, hi, i, 0)),
              pl.BlockSpec((None, None, NUM_SUBLANES, block_q), lambda bi, hi, i, j, p: (bi, hi, 0, i)),
          ],
          scratch_shapes=[
              pltpu.VMEM((block_q, NUM_LANES), jnp.float32),
              pltpu.VMEM((block_q, NUM_LANES), jnp.float32),
              pltpu.VMEM((block_q, d), jnp.float32),
          ],
      ),
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, NUM_SUBLANES, t), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="flash_fwd_tpu",
  )(prefix, q, k, v, q_seg_b, kv_seg_b)
  return o, lse[:, :, 0, :]


# ---------------------------------------------------------------------------- backward


def _dq_kernel(
    prefix_ref,
    q_ref,
    k_ref,
    v_ref,
    qseg_ref,
    kvseg_ref,
    lse_ref,
    di_ref,
    do_ref,
    dq_ref,
    dq_sc,
    *,
    mask: fc.MaskInfo,
    scale,
    soft_cap,
    block_q,
    block_k,
    num_k_blocks,
):
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  prefix = _prefix(mask, prefix_ref, b)

  @pl.when(j == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  lo, hi = mask.kv_block_range(i * block_q, block_q, block_k, num_k_blocks, prefix)

  @pl.when(jnp.logical_and(j >= lo, j < hi))
  def _run():
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    s, tanh_s = fc.scores(fc.dot(q, k, fc.NT_DIMS), scale=scale, soft_cap=soft_cap)
    shape = (block_q, block_k)
    q_pos = lax.broadcasted_iota(jnp.int32, shape, 0) + (i * block_q + mask.q_offset)
    k_pos = lax.broadcasted_iota(jnp.int32, shape, 1) + j * block_k
    q_seg = _lanes(qseg_ref[...], block_k) if mask.segmented else None
    kv_seg = kvseg_ref[:1, :] if mask.segmented else None
    s = fc.apply_mask(s, mask.visible(q_pos, k_pos, q_seg, kv_seg, prefix))
    lse = jnp.expand_dims(lse_ref[0], -1)  # [bq, 1]
    delta = jnp.expand_dims(di_ref[0], -1)
    p = jnp.exp(s - lse)
    dp = fc.dot(do, v, fc.NT_DIMS)
    ds = fc.score_grad(p, dp, delta, tanh_s, scale=scale)
    dq_sc[...] += fc.dot(ds.astype(k.dtype), k)

  @pl.when(j == num_k_blocks - 1)
  def _store():
    dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)


def _dkv_kernel(
    prefix_ref,
    q_ref,
    k_ref,
    v_ref,
    qseg_ref,
    kvseg_ref,
    lse_ref,
    di_ref,
    do_ref,
    dk_ref,
    dv_ref,
    dk_sc,
    dv_sc,
    *,
    mask: fc.MaskInfo,
    scale,
    soft_cap,
    block_q,
    block_k,
    num_q_blocks,
    group,
):
  b, j, g, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
  prefix = _prefix(mask, prefix_ref, b)

  @pl.when(jnp.logical_and(g == 0, i == 0))
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  lo, hi = mask.q_block_range(j * block_k, block_q, block_k, num_q_blocks, prefix)

  @pl.when(jnp.logical_and(i >= lo, i < hi))
  def _run():
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    # Transposed tiles [bk, bq]: lse/delta/q ids are rows, kv ids a column.
    s, tanh_s = fc.scores(fc.dot(k, q, fc.NT_DIMS), scale=scale, soft_cap=soft_cap)
    shape = (block_k, block_q)
    k_pos = lax.broadcasted_iota(jnp.int32, shape, 0) + j * block_k
    q_pos = lax.broadcasted_iota(jnp.int32, shape, 1) + (i * block_q + mask.q_offset)
    q_seg = qseg_ref[:1, :] if mask.segmented else None
    kv_seg = _lanes(kvseg_ref[...], block_q) if mask.segmented else None
    s = fc.apply_mask(s, mask.visible(q_pos, k_pos, q_seg, kv_seg, prefix))
    p = jnp.exp(s - lse_ref[:1, :])
    dv_sc[...] += fc.dot(p.astype(do.dtype), do)
    dp = fc.dot(v, do, fc.NT_DIMS)
    ds = fc.score_grad(p, dp, di_ref[:1, :], tanh_s, scale=scale)
    dk_sc[...] += fc.dot(ds.astype(q.dtype), q)

  @pl.when(jnp.logical_and(g == group - 1, i == num_q_blocks - 1))
  def _store():
    dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _backward_padded(q, k, v, q_seg, kv_seg, prefix, lse, delta, do, *, mask, scale, soft_cap, blocks, interpret):
  """Head-major padded operands (see ``_forward_padded``); lse, delta float32[B, H, Tp].
  Returns dq float[B, H, Tp, D], dk/dv float[B, K, Sp, D]."""
  b, h, t, d = q.shape
  kh, s = k.shape[1], k.shape[2]
  group = h // kh
  common = dict(mask=mask, scale=scale, soft_cap=soft_cap)

  # dq: same iteration space as the forward pass.
  bq, bk = blocks.block_q_dq, blocks.block_k_dq
  nq, nk = t // bq, s // bk

  def kv_block(bi, i, j, prefix_ref):
    lo, hi = mask.kv_block_range(i * bq, bq, bk, nk, _prefix(mask, prefix_ref, bi))
    return _clamp(j, lo, hi, nk)

  q_spec = pl.BlockSpec((None, None, bq, d), lambda bi, hi, i, j, p: (bi, hi, i, 0))
  kv_spec = pl.BlockSpec(
      (None, None, bk, d), lambda bi, hi, i, j, p: (bi, lax.div(hi, group), kv_block(bi, i, j, p), 0)
  )
  row_spec = pl.BlockSpec((None, None, 1, bq), lambda bi, hi, i, j, p: (bi, hi, 0, i))
  q_seg_b, kv_seg_b = _segment_operands(q_seg, kv_seg, q_rows=False)
  seg_specs = [None, None]
  if q_seg is not None:
    seg_specs = [
        pl.BlockSpec((None, bq, NUM_LANES), lambda bi, hi, i, j, p: (bi, i, 0)),
        pl.BlockSpec((None, NUM_SUBLANES, bk), lambda bi, hi, i, j, p: (bi, 0, kv_block(bi, i, j, p))),
    ]
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, block_q=bq, block_k=bk, num_k_blocks=nk, **common),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(b, h, nq, nk),
          in_specs=[q_spec, kv_spec, kv_spec, *seg_specs, row_spec, row_spec, q_spec],
          out_specs=q_spec,
          scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
      ),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="flash_bwd_dq_tpu",
  )(prefix, q, k, v, q_seg_b, kv_seg_b, lse[:, :, None, :], delta[:, :, None, :], do)

  # dk, dv: key blocks outer, (query head in group, query block) inner.
  bq, bk = blocks.block_q_dkv, blocks.block_k_dkv
  nq, nk = t // bq, s // bk

  def q_block(bi, j, i, prefix_ref):
    lo, hi = mask.q_block_range(j * bk, bq, bk, nq, _prefix(mask, prefix_ref, bi))
    return _clamp(i, lo, hi, nq)

  q_spec = pl.BlockSpec((None, None, bq, d), lambda bi, ki, j, g, i, p: (bi, ki * group + g, q_block(bi, j, i, p), 0))
  kv_spec = pl.BlockSpec((None, None, bk, d), lambda bi, ki, j, g, i, p: (bi, ki, j, 0))
  rows_spec = pl.BlockSpec(
      (None, None, NUM_SUBLANES, bq), lambda bi, ki, j, g, i, p: (bi, ki * group + g, 0, q_block(bi, j, i, p))
  )
  q_seg_b, kv_seg_b = _segment_operands(q_seg, kv_seg, q_rows=True)
  seg_specs = [None, None]
  if q_seg is not None:
    seg_specs = [
        pl.BlockSpec((None, NUM_SUBLANES, bq), lambda bi, ki, j, g, i, p: (bi, 0, q_block(bi, j, i, p))),
        pl.BlockSpec((None, bk, NUM_LANES), lambda bi, ki, j, g, i, p: (bi, j, 0)),
    ]
  rows = lambda x: lax.broadcast_in_dim(x, (b, h, NUM_SUBLANES, t), (0, 1, 3))  # noqa: E731
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, block_q=bq, block_k=bk, num_q_blocks=nq, group=group, **common),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(b, kh, nk, group, nq),
          in_specs=[q_spec, kv_spec, kv_spec, *seg_specs, rows_spec, rows_spec, q_spec],
          out_specs=[kv_spec, kv_spec],
          scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
      ),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")
      ),
      interpret=interpret,
      name="flash_bwd_dkv_tpu",
  )(prefix, q, k, v, q_seg_b, kv_seg_b, rows(lse), rows(delta), do)
  return dq, dk, dv


# ------------------------------------------------------------------ public entry points


def fit_blocks(blocks, t: int, s: int, interpret: bool):
  """Clips block sizes to the (aligned) sequence lengths; the compiled kernel needs
  multiples of 128 (lane width of the lse/delta rows and the segment-id tiles)."""
  align = 8 if interpret else NUM_LANES
  blocks = blocks.clip(fc.round_up(t, align), fc.round_up(s, align))
  if not interpret:
    for name, value in blocks.items():
      if value % NUM_LANES:
        raise ValueError(f"TPU flash attention needs {name} to be a multiple of {NUM_LANES}, got {value}")
  return blocks


def _to_heads(x):  # float[B, T, H, D] -> float[B, H, T, D]
  return jnp.swapaxes(x, 1, 2)


def forward(
    q, k, v, q_seg, kv_seg, prefix, *, mask: fc.MaskInfo, scale: float, soft_cap: float | None, blocks, interpret: bool
):
  """Flash attention forward on TPU.

  Args:
    q: float[B, T, H, D]; k, v: float[B, S, K, D]; q_seg int32[B, T] and kv_seg
      int32[B, S] (or both None); prefix int32[B] (zeros when unused).
    mask: static visibility (unpadded lengths); blocks: a ``BlockSizes``.
  Returns:
    (o float[B, T, H, D], lse float32[B, H, T]).
  """
  t, s = q.shape[1], k.shape[1]
  blocks = fit_blocks(blocks, t, s, interpret)
  q, k, v, q_seg, kv_seg, tp, sp = fc.pad_inputs(q, k, v, q_seg, kv_seg, blocks)
  o, lse = _forward_padded(
      _to_heads(q),
      _to_heads(k),
      _to_heads(v),
      q_seg,
      kv_seg,
      prefix,
      mask=mask.padded(sp),
      scale=scale,
      soft_cap=soft_cap,
      block_q=blocks.block_q,
      block_k=blocks.block_k,
      interpret=interpret,
  )
  return _to_heads(o)[:, :t], lse[:, :, :t]


def backward(
    q,
    k,
    v,
    q_seg,
    kv_seg,
    prefix,
    o,
    lse,
    do,
    *,
    mask: fc.MaskInfo,
    scale: float,
    soft_cap: float | None,
    blocks,
    interpret: bool,
):
  """Flash attention backward on TPU (arguments as in ``forward``; o, do float[B, T, H, D],
  lse float32[B, H, T]). Returns dq float[B, T, H, D], dk, dv float[B, S, K, D]."""
  t, s = q.shape[1], k.shape[1]
  blocks = fit_blocks(blocks, t, s, interpret)
  delta = fc.attention_delta(o, do)
  q, k, v, q_seg, kv_seg, tp, sp = fc.pad_inputs(q, k, v, q_seg, kv_seg, blocks)
  lse = fc.pad_axis(lse, 2, tp, fc.EMPTY_ROW_LSE)
  delta = fc.pad_axis(delta, 2, tp)
  do = fc.pad_axis(do, 1, tp)
  dq, dk, dv = _backward_padded(
      _to_heads(q),
      _to_heads(k),
      _to_heads(v),
      q_seg,
      kv_seg,
      prefix,
      lse,
      delta,
      _to_heads(do),
      mask=mask.padded(sp),
      scale=scale,
      soft_cap=soft_cap,
      blocks=blocks,
      interpret=interpret,
  )
  return _to_heads(dq)[:, :t], _to_heads(dk)[:, :s], _to_heads(dv)[:, :s]
