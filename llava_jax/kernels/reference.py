"""XLA reference attention: materialises the [T, S] scores. The oracle for every kernel.

Einsum letters: B batch, T query length, S key length, K kv heads, G query heads per kv
head (H = K * G), D head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Finite, so fully masked (padding) rows give a uniform softmax instead of NaN; -0.7*max
# leaves room to add to it without overflowing to -inf (as in MaxText/Pallas TPU kernels).
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def attention_mask(
    t: int,
    s: int,
    *,
    causal: bool,
    segment_ids=None,
    kv_segment_ids=None,
    prefix_len=None,
    sliding_window: int | None = None,
):
  """bool[B|1, T, S]: True where query t may attend key s.

  Causal alignment is bottom-right: query i sits at key position ``i + s - t``, so a
  query block that continues a cache of length ``s - t`` sees the whole cache.
  """
  q_pos = jnp.arange(t)[:, None] + (s - t)
  k_pos = jnp.arange(s)[None, :]
  mask = jnp.ones((1, t, s), bool)
  if causal:
    allowed = (k_pos <= q_pos)[None]
    if prefix_len is not None:
      allowed = allowed | (k_pos[None] < jnp.asarray(prefix_len)[:, None, None])
    mask = mask & allowed
  elif prefix_len is not None:
    raise ValueError("prefix_len only makes sense with causal=True")
  if sliding_window is not None:
    mask = mask & ((q_pos - k_pos) < sliding_window)[None]
  if segment_ids is not None or kv_segment_ids is not None:
    if kv_segment_ids is None:
      if t != s:
        raise ValueError(f"kv_segment_ids required when T ({t}) != S ({s})")
      kv_segment_ids = segment_ids
    if segment_ids is None:
      segment_ids = jnp.ones(kv_segment_ids.shape[:1] + (t,), kv_segment_ids.dtype)
    same = segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    mask = mask & same & (kv_segment_ids[:, None, :] != 0)
  return mask


def mha_reference(
    q,
    k,
    v,
    *,
    causal: bool = True,
    segment_ids=None,
    kv_segment_ids=None,
    prefix_len=None,
    logits_soft_cap: float | None = None,
    sliding_window: int | None = None,
):
  """Multi-head attention with GQA, in XLA.

  Args:
    q: float[B, T, H, D]; k, v: float[B, S, K, D] with H a multiple of K.
    segment_ids: int32[B, T], kv_segment_ids: int32[B, S]; attend only where equal and
      non-zero (0 marks padding; such query rows give unspecified, finite output).
    prefix_len: int32[B]; the first ``prefix_len`` keys are visible to every query.
  Returns:
    float[B, T, H, D] in q's dtype. Scores and softmax are computed in float32.
  """
  b, t, h, d = q.shape
  _, s, kh, _ = k.shape
  if h % kh:
    raise ValueError(f"query heads {h} must be a multiple of kv heads {kh}")
  qg = q.reshape(b, t, kh, h // kh, d)
  logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
  logits = logits.astype(jnp.float32) * (1.0 / np.sqrt(d))
  if logits_soft_cap is not None:
    logits = logits_soft_cap * jnp.tanh(logits / logits_soft_cap)
  mask = attention_mask(
      t,
      s,
      causal=causal,
      segment_ids=segment_ids,
      kv_segment_ids=kv_segment_ids,
      prefix_len=prefix_len,
      sliding_window=sliding_window,
  )
  logits = jnp.where(mask[:, None, None], logits, MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.reshape(b, t, h, d).astype(q.dtype)
