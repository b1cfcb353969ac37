"""Pallas flash attention (TPU and GPU kernels, interpret mode on CPU) against mha_reference.

Errors are ``max|kernel - reference| / max|reference|`` over rows that see at least one
key (the contract leaves fully masked rows unspecified; the kernel must keep them finite).
Shapes are tiny and blocks are 32 so that every case has several query and key blocks,
ragged tails and skipped blocks.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llava_jax.kernels import flash_common as fc
from llava_jax.kernels.attention import attention
from llava_jax.kernels.flash_attention import BlockSizes, flash_attention
from llava_jax.kernels.reference import attention_mask, mha_reference

# Relative tolerances (error / max|reference|); never loosened to make a test pass.
F32_OUT_TOL = 1e-5
F32_GRAD_TOL = 2e-5
BF16_OUT_TOL = 2e-2
BF16_GRAD_TOL = 2e-2
TOLERANCES = {jnp.float32: (F32_OUT_TOL, F32_GRAD_TOL), jnp.bfloat16: (BF16_OUT_TOL, BF16_GRAD_TOL)}

BLOCKS = BlockSizes.uniform(32)


@dataclasses.dataclass(frozen=True)
class Case:
  t: int = 70
  s: int = 70
  h: int = 4
  k: int = 2
  d: int = 64
  dtype: type = jnp.float32
  causal: bool = True
  segments: bool = False
  prefix: bool = False
  soft_cap: float | None = None
  window: int | None = None


CASES = {
    "causal_mha": Case(k=4),
    "bidirectional_gqa2": Case(causal=False),
    "segments_padding_gqa4": Case(h=8, k=2, segments=True),
    "prefix_segments_mqa": Case(k=1, segments=True, prefix=True),
    "softcap_gqa2": Case(soft_cap=4.0),
    "decode_like_t_ne_s_segments": Case(t=40, s=90, h=8, k=2, segments=True),
    "decode_single_token_mqa": Case(t=3, s=70, k=1),
    "sliding_window_prefix": Case(window=24, prefix=True),
    "head_dim_256": Case(t=40, s=40, h=2, k=1, d=256),
    "bf16_segments_gqa2": Case(dtype=jnp.bfloat16, segments=True),
    "bf16_softcap_prefix_mqa": Case(dtype=jnp.bfloat16, k=1, soft_cap=4.0, prefix=True),
    "bf16_bidirectional_t_ne_s": Case(dtype=jnp.bfloat16, t=40, s=90, causal=False, d=128),
}
# The GPU kernel runs a subset: the same shared math, its own tiling and loops.
GPU_CASES = (
    "causal_mha",
    "segments_padding_gqa4",
    "prefix_segments_mqa",
    "softcap_gqa2",
    "decode_like_t_ne_s_segments",
    "sliding_window_prefix",
    "head_dim_256",
    "bf16_segments_gqa2",
)


def _segment_ids(batch: int, length: int):
  """int32[B, L] with several segments, trailing padding (row 0), leading padding (row 1)."""
  rows = [
      np.r_[np.full(length * 3 // 7, 1), np.full(length * 2 // 7, 2)],
      np.r_[np.zeros(length // 7), np.full(length // 3, 1), np.full(length, 3)],
  ]
  ids = np.zeros((batch, length), np.int32)
  for b in range(batch):
    row = rows[b % 2][:length]
    ids[b, : len(row)] = row
  return jnp.asarray(ids)


def _inputs(case: Case, batch: int = 2):
  kq, kk, kv, kc = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(kq, (batch, case.t, case.h, case.d), jnp.float32).astype(case.dtype)
  k = jax.random.normal(kk, (batch, case.s, case.k, case.d), jnp.float32).astype(case.dtype)
  v = jax.random.normal(kv, (batch, case.s, case.k, case.d), jnp.float32).astype(case.dtype)
  kwargs = dict(causal=case.causal, logits_soft_cap=case.soft_cap, sliding_window=case.window)
  if case.segments:
    kv_ids = _segment_ids(batch, case.s)
    kwargs.update(segment_ids=kv_ids[:, case.s - case.t :], kv_segment_ids=kv_ids)
  if case.prefix:
    kwargs.update(prefix_len=jnp.array([case.s // 3, case.s - 5][:batch], jnp.int32))
  rows = attention_mask(
      case.t,
      case.s,
      causal=case.causal,
      segment_ids=kwargs.get("segment_ids"),
      kv_segment_ids=kwargs.get("kv_segment_ids"),
      prefix_len=kwargs.get("prefix_len"),
      sliding_window=case.window,
  ).any(-1)
  valid = jnp.broadcast_to(rows, (batch, case.t))[:, :, None, None]
  ct = jax.random.normal(kc, q.shape, jnp.float32) * valid
  return (q, k, v), kwargs, valid, ct


def _out_and_grads(fn, args, ct):
  @jax.jit
  def run(q, k, v):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(ct.astype(out.dtype)))

  return run(*args)


def _rel_err(x, ref):
  x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
  return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30))


@pytest.mark.parametrize("backend,name", [("tpu", n) for n in CASES] + [("gpu", n) for n in GPU_CASES])
def test_matches_reference(backend, name):
  case = CASES[name]
  args, kwargs, valid, ct = _inputs(case)
  out_tol, grad_tol = TOLERANCES[case.dtype]
  kernel = lambda q, k, v: flash_attention(  # noqa: E731
      q, k, v, interpret=True, backend=backend, block_sizes=BLOCKS, **kwargs
  )
  got = _out_and_grads(kernel, args, ct)
  want = _out_and_grads(lambda q, k, v: mha_reference(q, k, v, **kwargs), args, ct)

  for x in got:
    assert np.isfinite(np.asarray(x, np.float32)).all(), "kernel produced NaN/inf"
  out, ref_out = got[0], want[0]
  assert out.dtype == case.dtype and out.shape == args[0].shape
  err = _rel_err(jnp.where(valid, out, 0), jnp.where(valid, ref_out, 0))
  assert err <= out_tol, f"forward error {err:.2e} > {out_tol:.0e}"
  # Rows that see no key return exactly 0 (and so contribute no gradient).
  assert not np.any(np.where(valid, 0, np.asarray(out, np.float32)))
  for label, g, ref_g, primal in zip(("dq", "dk", "dv"), got[1:], want[1:], args):
    assert g.dtype == primal.dtype and g.shape == primal.shape
    err = _rel_err(g, ref_g)
    assert err <= grad_tol, f"{label} error {err:.2e} > {grad_tol:.0e}"


def test_fully_masked_batch_row_is_zero_with_zero_grads():
  """A whole batch row of padding (segment 0): finite, zero output, zero gradients."""
  q, k, v = (jax.random.normal(key, (2, 40, 2, 64)) for key in jax.random.split(jax.random.key(1), 3))
  seg = jnp.stack([jnp.ones(40, jnp.int32), jnp.zeros(40, jnp.int32)])
  fn = lambda q, k, v: flash_attention(  # noqa: E731
      q, k, v, segment_ids=seg, interpret=True, backend="tpu", block_sizes=BLOCKS
  )
  out, dq, dk, dv = _out_and_grads(fn, (q, k, v), jnp.ones(q.shape))
  for x in (out, dq, dk, dv):
    assert np.isfinite(np.asarray(x)).all()
    assert not np.any(np.asarray(x[1]))
  assert np.any(np.asarray(out[0]))


def test_dispatcher_grad_through_platform_dependent_default():
  """attention(impl="pallas") with no backend: CPU lowering takes the interpret branch;
  jax.grad of a scalar loss through jit matches the reference."""
  (q, k, v), kwargs, _, ct = _inputs(Case(t=40, s=40, h=4, k=2, segments=True))

  def loss(impl):
    return lambda q, k, v: jnp.sum(attention(q, k, v, impl=impl, **kwargs) * ct)

  got = jax.jit(jax.grad(loss("pallas"), argnums=(0, 1, 2)))(q, k, v)
  want = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
  for g, ref_g in zip(got, want):
    assert _rel_err(g, ref_g) <= F32_GRAD_TOL


MASK_CONFIGS = [
    dict(causal=True),
    dict(causal=False),
    dict(causal=True, prefixed=True),
    dict(causal=True, sliding_window=20),
    dict(causal=False, sliding_window=9),
    dict(causal=True, sliding_window=33, prefixed=True),
]


@pytest.mark.parametrize("config", MASK_CONFIGS, ids=lambda c: "-".join(map(str, c.items())))
@pytest.mark.parametrize("t,s,block_q,block_k", [(70, 70, 16, 32), (24, 100, 8, 16), (100, 40, 32, 8)])
def test_block_ranges_cover_every_visible_pair(config, t, s, block_q, block_k):
  """Skipped blocks (kv_block_range / q_block_range) hold no visible pair, checked
  against the reference mask; and something is skipped when the mask is sparse."""
  prefixed = config.get("prefixed", False)
  prefix_len = jnp.array([13, 0, s], jnp.int32)
  info = fc.MaskInfo(
      causal=config["causal"], q_offset=s - t, kv_len=s, sliding_window=config.get("sliding_window"), prefixed=prefixed
  )
  tp, sp = fc.round_up(t, block_q), fc.round_up(s, block_k)
  nq, nk = tp // block_q, sp // block_k
  skipped = 0
  for b in range(3):
    prefix = prefix_len[b] if prefixed else None
    mask = np.asarray(
        attention_mask(
            t,
            s,
            causal=info.causal,
            prefix_len=prefix_len[b : b + 1] if prefixed else None,
            sliding_window=info.sliding_window,
        )
    )[0]
    mask = np.pad(mask, ((0, tp - t), (0, sp - s)))  # padding is never needed
    needed = mask.reshape(nq, block_q, nk, block_k).any(axis=(1, 3))
    for i, j in itertools.product(range(nq), range(nk)):
      lo, hi = info.kv_block_range(i * block_q, block_q, block_k, nk, prefix)
      in_kv_range = bool(lo <= j < hi)
      lo, hi = info.q_block_range(j * block_k, block_q, block_k, nq, prefix)
      in_q_range = bool(lo <= i < hi)
      if needed[i, j]:
        assert in_kv_range and in_q_range, (b, i, j)
      skipped += not in_kv_range
  sparse = info.causal or info.sliding_window is not None
  assert (skipped > 0) == sparse


def test_block_sizes_validation_and_defaults():
  assert BlockSizes.default("tpu").block_q % 128 == 0
  assert BlockSizes.default("gpu").block_k & (BlockSizes.default("gpu").block_k - 1) == 0
  with pytest.raises(ValueError, match="block_k"):
    BlockSizes(128, 0, 128, 128, 128, 128)
  with pytest.raises(ValueError, match="no default block sizes"):
    BlockSizes.default("metal")
  q = jnp.zeros((1, 256, 2, 64))
  with pytest.raises(ValueError, match="multiple of 128"):
    flash_attention(q, q, q, backend="tpu", interpret=False, block_sizes=BlockSizes.uniform(96))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(k_heads=3), "multiple of kv heads"),
        (dict(prefix_len=jnp.array([3]), causal=False), "causal=True"),
        (dict(segment_ids=jnp.ones((1, 8), jnp.int32), s=12), "kv_segment_ids required"),
        (dict(backend="cuda"), "unknown backend"),
    ],
)
def test_argument_errors(kwargs, match):
  kwargs = dict(kwargs)
  kh, s = kwargs.pop("k_heads", 2), kwargs.pop("s", 8)
  q, kv = jnp.zeros((1, 8, 4, 64)), jnp.zeros((1, s, kh, 64))
  with pytest.raises(ValueError, match=match):
    flash_attention(q, kv, kv, **kwargs)
