"""Flash attention forward/backward as Pallas Triton (GPU) kernels.

Works on the ``[B, T, H, D]`` layout directly: a block ``(None, block, None, D)`` is a
strided ``[block, D]`` tile, so no transposes are needed. Each program loops over the
blocks it reduces (``lax.fori_loop`` with bounds from ``MaskInfo``, so fully masked blocks
are never visited), keeping statistics in registers as ``float32[bq, 1]``. Triton tiles
must have power-of-two shapes: block sizes are powers of two and a head dim that is not
is zero-padded by the wrapper.

Grids:
  forward  (T/bq, B, H)   loops over key blocks
  dq       (T/bq, B, H)   loops over key blocks
  dk, dv   (S/bk, B, K)   loops over the G query heads of kv head K and the query
                          blocks, so dk/dv are summed over the group in registers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from llava_jax.kernels import flash_common as fc

MIN_BLOCK = 16  # smallest Triton dot tile


def _positions(start, size: int, offset: int = 0):
  return start + offset + jnp.arange(size, dtype=jnp.int32)


def _compiler_params(head_dim: int):
  return plgpu.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(
    prefix_ref,
    q_ref,
    k_ref,
    v_ref,
    qseg_ref,
    kvseg_ref,
    o_ref,
    lse_ref,
    *,
    mask: fc.MaskInfo,
    scale,
    soft_cap,
    block_q,
    block_k,
    num_k_blocks,
):
  i = pl.program_id(0)
  prefix = prefix_ref[...] if mask.prefixed else None
  q = q_ref[...]
  q_pos = _positions(i * block_q, block_q, mask.q_offset)[:, None]
  q_seg = qseg_ref[...][:, None] if mask.segmented else None

  def body(j, carry):
    acc, m, l = carry
    keys = pl.ds(j * block_k, block_k)
    k, v = k_ref[keys, :], v_ref[keys, :]
    s, _ = fc.scores(fc.dot(q, k, fc.NT_DIMS), scale=scale, soft_cap=soft_cap)
    k_pos = _positions(j * block_k, block_k)[None, :]
    kv_seg = kvseg_ref[keys][None, :] if mask.segmented else None
    s = fc.apply_mask(s, mask.visible(q_pos, k_pos, q_seg, kv_seg, prefix))
    m, l, alpha, p = fc.online_softmax_step(m, l, s)
    return acc * alpha + fc.dot(p.astype(v.dtype), v), m, l

  lo, hi = mask.kv_block_range(i * block_q, block_q, block_k, num_k_blocks, prefix)
  m0, l0 = fc.init_stats((block_q, 1))
  acc0 = jnp.zeros((block_q, q.shape[-1]), jnp.float32)
  acc, m, l = lax.fori_loop(lo, hi, body, (acc0, m0, l0))
  inv_l, lse = fc.finalize(m, l)
  o_ref[...] = (acc * inv_l).astype(o_ref.dtype)
  lse_ref[...] = lse.reshape(block_q)


def _seq_specs(q_seg, block, full: bool, index):
  """Spec of an int32[B, L] segment-id operand: a block of rows, or the whole row."""
  if q_seg is None:
    return None
  return pl.BlockSpec((None, q_seg.shape[1] if full else block), index)


def _forward_padded(q, k, v, q_seg, kv_seg, prefix, *, mask, scale, soft_cap, block_q, block_k, interpret):
  """q float[B, Tp, H, D], k/v float[B, Sp, K, D] (padded) ->
  (o float[B, Tp, H, D], lse float32[B, H, Tp])."""
  b, t, h, d = q.shape
  s, kh = k.shape[1], k.shape[2]
  group = h // kh
  nq, nk = t // block_q, s // block_k
  kernel = functools.partial(
      _fwd_kernel, mask=mask, scale=scale, soft_cap=soft_cap, block_q=block_q, block_k=block_k, num_k_blocks=nk
  )
  q_spec = pl.BlockSpec((None, block_q, None, d), lambda i, bi, hi: (bi, i, hi, 0))
  kv_spec = pl.BlockSpec((None, s, None, d), lambda i, bi, hi: (bi, 0, lax.div(hi, group), 0))
  return pl.pallas_call(
      kernel,
      grid=(nq, b, h),
      in_specs=[
          pl.BlockSpec((None,), lambda i, bi, hi: (bi,)),
          q_spec,
          kv_spec,
          kv_spec,
          _seq_specs(q_seg, block_q, False, lambda i, bi, hi: (bi, i)),
          _seq_specs(kv_seg, block_k, True, lambda i, bi, hi: (bi, 0)),
      ],
      out_specs=[q_spec, pl.BlockSpec((None, None, block_q), lambda i, bi, hi: (bi, hi, i))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, t), jnp.float32)],
      compiler_params=_compiler_params(d),
      interpret=interpret,
      name="flash_fwd_gpu",
  )(prefix, q, k, v, q_seg, kv_seg)


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
    *,
    mask: fc.MaskInfo,
    scale,
    soft_cap,
    block_q,
    block_k,
    num_k_blocks,
):
  i = pl.program_id(0)
  prefix = prefix_ref[...] if mask.prefixed else None
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...][:, None], di_ref[...][:, None]
  q_pos = _positions(i * block_q, block_q, mask.q_offset)[:, None]
  q_seg = qseg_ref[...][:, None] if mask.segmented else None

  def body(j, dq):
    keys = pl.ds(j * block_k, block_k)
    k, v = k_ref[keys, :], v_ref[keys, :]
    s, tanh_s = fc.scores(fc.dot(q, k, fc.NT_DIMS), scale=scale, soft_cap=soft_cap)
    k_pos = _positions(j * block_k, block_k)[None, :]
    kv_seg = kvseg_ref[keys][None, :] if mask.segmented else None
    s = fc.apply_mask(s, mask.visible(q_pos, k_pos, q_seg, kv_seg, prefix))
    p = jnp.exp(s - lse)
    ds = fc.score_grad(p, fc.dot(do, v, fc.NT_DIMS), delta, tanh_s, scale=scale)
    return dq + fc.dot(ds.astype(k.dtype), k)

  lo, hi = mask.kv_block_range(i * block_q, block_q, block_k, num_k_blocks, prefix)
  dq = lax.fori_loop(lo, hi, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


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
    *,
    mask: fc.MaskInfo,
    scale,
    soft_cap,
    block_q,
    block_k,
    num_q_blocks,
    group,
):
  j = pl.program_id(0)
  prefix = prefix_ref[...] if mask.prefixed else None
  k, v = k_ref[...], v_ref[...]
  k_pos = _positions(j * block_k, block_k)[None, :]
  kv_seg = kvseg_ref[...][None, :] if mask.segmented else None
  lo, hi = mask.q_block_range(j * block_k, block_q, block_k, num_q_blocks, prefix)

  def head_body(g, carry):
    def q_body(i, carry):
      dk, dv = carry
      rows = pl.ds(i * block_q, block_q)
      q, do = q_ref[rows, g, :], do_ref[rows, g, :]
      s, tanh_s = fc.scores(fc.dot(q, k, fc.NT_DIMS), scale=scale, soft_cap=soft_cap)
      q_pos = _positions(i * block_q, block_q, mask.q_offset)[:, None]
      q_seg = qseg_ref[rows][:, None] if mask.segmented else None
      s = fc.apply_mask(s, mask.visible(q_pos, k_pos, q_seg, kv_seg, prefix))
      p = jnp.exp(s - lse_ref[g, rows][:, None])
      dv = dv + fc.dot(p.astype(do.dtype), do, fc.TN_DIMS)
      ds = fc.score_grad(p, fc.dot(do, v, fc.NT_DIMS), di_ref[g, rows][:, None], tanh_s, scale=scale)
      return dk + fc.dot(ds.astype(q.dtype), q, fc.TN_DIMS), dv

    return lax.fori_loop(lo, hi, q_body, carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, group, head_body, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward_padded(q, k, v, q_seg, kv_seg, prefix, lse, delta, do, *, mask, scale, soft_cap, blocks, interpret):
  """Padded ``[B, L, heads, D]`` operands (see ``_forward_padded``); lse, delta
  float32[B, H, Tp]. Returns dq float[B, Tp, H, D], dk/dv float[B, Sp, K, D]."""
  b, t, h, d = q.shape
  s, kh = k.shape[1], k.shape[2]
  group = h // kh
  common = dict(mask=mask, scale=scale, soft_cap=soft_cap)
  prefix_spec = pl.BlockSpec((None,), lambda x, bi, hi: (bi,))

  bq, bk = blocks.block_q_dq, blocks.block_k_dq
  q_spec = pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, i, hi, 0))
  kv_spec = pl.BlockSpec((None, s, None, d), lambda i, bi, hi: (bi, 0, lax.div(hi, group), 0))
  row_spec = pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, block_q=bq, block_k=bk, num_k_blocks=s // bk, **common),
      grid=(t // bq, b, h),
      in_specs=[
          prefix_spec,
          q_spec,
          kv_spec,
          kv_spec,
          _seq_specs(q_seg, bq, False, lambda i, bi, hi: (bi, i)),
          _seq_specs(kv_seg, bk, True, lambda i, bi, hi: (bi, 0)),
          row_spec,
          row_spec,
          q_spec,
      ],
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_compiler_params(d),
      interpret=interpret,
      name="flash_bwd_dq_gpu",
  )(prefix, q, k, v, q_seg, kv_seg, lse, delta, do)

  bq, bk = blocks.block_q_dkv, blocks.block_k_dkv
  group_spec = pl.BlockSpec((None, t, group, d), lambda j, bi, ki: (bi, 0, ki, 0))
  kv_spec = pl.BlockSpec((None, bk, None, d), lambda j, bi, ki: (bi, j, ki, 0))
  rows_spec = pl.BlockSpec((None, group, t), lambda j, bi, ki: (bi, ki, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, block_q=bq, block_k=bk, num_q_blocks=t // bq, group=group, **common),
      grid=(s // bk, b, kh),
      in_specs=[
          prefix_spec,
          group_spec,
          kv_spec,
          kv_spec,
          _seq_specs(q_seg, bq, True, lambda j, bi, ki: (bi, 0)),
          _seq_specs(kv_seg, bk, False, lambda j, bi, ki: (bi, j)),
          rows_spec,
          rows_spec,
          group_spec,
      ],
      out_specs=[kv_spec, kv_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_compiler_params(d),
      interpret=interpret,
      name="flash_bwd_dkv_gpu",
  )(prefix, q, k, v, q_seg, kv_seg, lse, delta, do)
  return dq, dk, dv


# ------------------------------------------------------------------ public entry points


def fit_blocks(blocks, t: int, s: int):
  """Clips blocks to the power-of-two-rounded lengths; Triton tiles must be powers of 2."""
  blocks = blocks.clip(pl.next_power_of_2(max(t, MIN_BLOCK)), pl.next_power_of_2(max(s, MIN_BLOCK)))
  for name, value in blocks.items():
    if value & (value - 1) or value < MIN_BLOCK:
      raise ValueError(f"GPU flash attention needs {name} to be a power of two >= {MIN_BLOCK}, got {value}")
  return blocks


def _pad_head_dim(*xs):
  d = xs[0].shape[-1]
  dp = max(pl.next_power_of_2(d), MIN_BLOCK)
  return [fc.pad_axis(x, x.ndim - 1, dp) for x in xs]


def forward(
    q, k, v, q_seg, kv_seg, prefix, *, mask: fc.MaskInfo, scale: float, soft_cap: float | None, blocks, interpret: bool
):
  """Flash attention forward on GPU.

  Args:
    q: float[B, T, H, D]; k, v: float[B, S, K, D]; q_seg int32[B, T] and kv_seg
      int32[B, S] (or both None); prefix int32[B] (zeros when unused).
    mask: static visibility (unpadded lengths); blocks: a ``BlockSizes``.
  Returns:
    (o float[B, T, H, D], lse float32[B, H, T]).
  """
  t, s, d = q.shape[1], k.shape[1], q.shape[3]
  blocks = fit_blocks(blocks, t, s)
  q, k, v, q_seg, kv_seg, _, sp = fc.pad_inputs(q, k, v, q_seg, kv_seg, blocks)
  q, k, v = _pad_head_dim(q, k, v)
  o, lse = _forward_padded(
      q,
      k,
      v,
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
  return o[:, :t, :, :d], lse[:, :, :t]


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
  """Flash attention backward on GPU (arguments as in ``forward``; o, do float[B, T, H, D],
  lse float32[B, H, T]). Returns dq float[B, T, H, D], dk, dv float[B, S, K, D]."""
  t, s, d = q.shape[1], k.shape[1], q.shape[3]
  blocks = fit_blocks(blocks, t, s)
  delta = fc.attention_delta(o, do)
  q, k, v, q_seg, kv_seg, tp, sp = fc.pad_inputs(q, k, v, q_seg, kv_seg, blocks)
  lse = fc.pad_axis(lse, 2, tp, fc.EMPTY_ROW_LSE)
  delta = fc.pad_axis(delta, 2, tp)
  q, k, v, do = _pad_head_dim(q, k, v, fc.pad_axis(do, 1, tp))
  dq, dk, dv = _backward_padded(
      q,
      k,
      v,
      q_seg,
      kv_seg,
      prefix,
      lse,
      delta,
      do,
      mask=mask.padded(sp),
      scale=scale,
      soft_cap=soft_cap,
      blocks=blocks,
      interpret=interpret,
  )
  return dq[:, :t, :, :d], dk[:, :s, :, :d], dv[:, :s, :, :d]
