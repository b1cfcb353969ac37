"""Attention dispatcher used by the ViT and the LLM: ``impl`` in ``"xla" | "cudnn" | "pallas"``.

All implementations share one contract (see ``mha_reference``): q float[B, T, H, D],
k/v float[B, S, K, D], scale 1/sqrt(D), segment ids (0 = padding), optional
bidirectional prefix, GQA without repeating K/V.
"""
from __future__ import annotations

import jax

from llava_jax.kernels.reference import attention_mask, mha_reference

IMPLS = ("xla", "cudnn", "pallas")


def attention(q, k, v, *, causal: bool = True, segment_ids=None, kv_segment_ids=None,
              prefix_len=None, impl: str = "xla", interpret: bool | None = None,
              logits_soft_cap: float | None = None, sliding_window: int | None = None):
  """Scaled dot-product attention. Returns float[B, T, H, D] in q's dtype.

  Args:
    q: float[B, T, H, D]. k, v: float[B, S, K, D], H a multiple of K.
    causal: bottom-right aligned causal mask (query i is at key position i + S - T).
    segment_ids: int32[B, T]; kv_segment_ids: int32[B, S] (defaults to segment_ids).
      Tokens attend only where ids are equal and non-zero.
    prefix_len: int32[B]; first tokens of each row attend bidirectionally (prefix-LM).
    impl: "xla" (reference, default on CPU), "cudnn" (jax.nn.dot_product_attention on
      GPU) or "pallas" (flash kernel).
    interpret: Pallas only. None runs interpret mode iff the default backend is CPU;
      False forces the compiled kernel (as ``jax.export(platforms=[...])`` needs).
    logits_soft_cap: optional ``cap * tanh(logits / cap)`` before masking (Gemma 2 style).
    sliding_window: optional local attention window (keys with q_pos - k_pos < window).
  """
  if impl == "xla":
    return mha_reference(q, k, v, causal=causal, segment_ids=segment_ids,
                         kv_segment_ids=kv_segment_ids, prefix_len=prefix_len,
                         logits_soft_cap=logits_soft_cap, sliding_window=sliding_window)
  if impl == "cudnn":
    if logits_soft_cap is not None:
      raise ValueError("impl='cudnn' does not support logits_soft_cap; use 'xla' or 'pallas'")
    t, s = q.shape[1], k.shape[1]
    mask = None
    if (segment_ids is not None or kv_segment_ids is not None or prefix_len is not None
        or sliding_window is not None):
      mask = attention_mask(t, s, causal=causal, segment_ids=segment_ids,
                            kv_segment_ids=kv_segment_ids, prefix_len=prefix_len,
                            sliding_window=sliding_window)[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal and mask is None,
                                        implementation="cudnn")
  if impl == "pallas":
    from llava_jax.kernels import flash_attention  # imported lazily: Pallas import is slow
    return flash_attention.flash_attention(
        q, k, v, causal=causal, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
        prefix_len=prefix_len, interpret=interpret, logits_soft_cap=logits_soft_cap,
        sliding_window=sliding_window)
  raise ValueError(f"unknown attention impl {impl!r}; expected one of {IMPLS}")
