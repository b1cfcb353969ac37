"""Attention dispatcher used by the ViT and the LLM: ``impl`` in ``"xla" | "cudnn" | "pallas"``.

All implementations share one contract (see ``mha_reference``): q float[B, T, H, D],
k/v float[B, S, K, D], scale 1/sqrt(D), segment ids (0 = padding), optional
bidirectional prefix, GQA without repeating K/V.
"""

from __future__ import annotations

import functools

import jax
from jax.sharding import PartitionSpec as P

from llava_jax import sharding
from llava_jax.kernels.reference import attention_mask, mha_reference

IMPLS = ("xla", "cudnn", "pallas")


def attention(
    q,
    k,
    v,
    *,
    causal: bool = True,
    segment_ids=None,
    kv_segment_ids=None,
    prefix_len=None,
    impl: str = "xla",
    interpret: bool | None = None,
    logits_soft_cap: float | None = None,
    sliding_window: int | None = None,
):
  """Scaled dot-product attention. Returns float[B, T, H, D] in q's dtype.

  Args:
    q: float[B, T, H, D]. k, v: float[B, S, K, D], H a multiple of K.
    causal: bottom-right aligned causal mask (query i is at key position i + S - T).
    segment_ids: int32[B, T]; kv_segment_ids: int32[B, S] (defaults to segment_ids).
      Tokens attend only where ids are equal and non-zero.
    prefix_len: int32[B]; first tokens of each row attend bidirectionally (prefix-LM).
    impl: "xla" (reference, default on CPU), "cudnn" (jax.nn.dot_product_attention on
      GPU) or "pallas" (flash kernel).
    interpret: Pallas only. None runs interpret mode iff the platform compiled for is
      CPU: the devices of the enclosing mesh (``sharding.use_mesh``; an ahead-of-time
      TPU compile on a CPU host gets the Mosaic kernel), else the default backend (see
      ``flash_attention.target_platform``). False forces the compiled kernel (as
      ``jax.export(platforms=[...])`` needs).
    logits_soft_cap: optional ``cap * tanh(logits / cap)`` before masking (Gemma 2 style).
    sliding_window: optional local attention window (keys with q_pos - k_pos < window).
  """
  if impl == "xla":
    return mha_reference(
        q,
        k,
        v,
        causal=causal,
        segment_ids=segment_ids,
        kv_segment_ids=kv_segment_ids,
        prefix_len=prefix_len,
        logits_soft_cap=logits_soft_cap,
        sliding_window=sliding_window,
    )
  if impl == "cudnn":
    if logits_soft_cap is not None:
      raise ValueError("impl='cudnn' does not support logits_soft_cap; use 'xla' or 'pallas'")
    t, s = q.shape[1], k.shape[1]
    mask = None
    if segment_ids is not None or kv_segment_ids is not None or prefix_len is not None or sliding_window is not None:
      mask = attention_mask(
          t,
          s,
          causal=causal,
          segment_ids=segment_ids,
          kv_segment_ids=kv_segment_ids,
          prefix_len=prefix_len,
          sliding_window=sliding_window,
      )[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal and mask is None, implementation="cudnn")
  if impl == "pallas":
    from llava_jax.kernels import flash_attention  # imported lazily: Pallas import is slow

    kernel = functools.partial(
        flash_attention.flash_attention,
        causal=causal,
        interpret=interpret,
        logits_soft_cap=logits_soft_cap,
        sliding_window=sliding_window,
    )
    return _per_shard(kernel, q, k, v, segment_ids, kv_segment_ids, prefix_len)
  raise ValueError(f"unknown attention impl {impl!r}; expected one of {IMPLS}")


def _per_shard(kernel, q, k, v, segment_ids, kv_segment_ids, prefix_len):
  """Runs a Pallas kernel per shard under ``shard_map``.

  XLA cannot partition a Pallas custom call: under a sharded ``jit`` it would gather
  q/k/v onto every device. Attention is independent per batch row and per (kv) head, so
  each device runs the kernel on its own rows and heads. Batch goes over the mesh axes of
  ``act_batch`` and heads over those of ``act_heads``; heads stay whole when the kv heads
  don't divide (a query head must sit with its kv head).
  """
  mesh = sharding.context_mesh()
  call = lambda q, k, v, s, ks, pl: kernel(q, k, v, segment_ids=s, kv_segment_ids=ks, prefix_len=pl)
  if mesh is None or mesh.size == 1:
    return call(q, k, v, segment_ids, kv_segment_ids, prefix_len)
  batch_axes, head_axes = sharding.dividing_mesh_axes(
      mesh, ("act_batch", "act_heads"), ((q.shape[0],), (q.shape[2], k.shape[2]))
  )
  if batch_axes is None and head_axes is None:
    return call(q, k, v, segment_ids, kv_segment_ids, prefix_len)
  qkv = P(batch_axes, None, head_axes, None)
  rows = P(batch_axes, None)
  specs = (
      qkv,
      qkv,
      qkv,
      None if segment_ids is None else rows,
      None if kv_segment_ids is None else rows,
      None if prefix_len is None else P(batch_axes),
  )
  return jax.shard_map(call, mesh=mesh, in_specs=specs, out_specs=qkv, check_vma=False)(
      q, k, v, segment_ids, kv_segment_ids, prefix_len
  )
