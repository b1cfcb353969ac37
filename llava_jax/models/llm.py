"""Decoder LLM: Llama/Vicuna, Mistral, Qwen2 and Gemma as config flags.

RMSNorm, RoPE (optionally Llama-3 scaled), SwiGLU/GeGLU MLP, grouped-query attention,
tied or untied embeddings. Param names follow HF (``embed_tokens``, ``decoder/layers``,
``self_attn/q_proj``, ``mlp/gate_proj``, ``norm``, ``lm_head``).

Einsum letters: B batch, T sequence, E embed, F mlp, H heads, K kv heads, D head dim,
V vocab.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llava_jax.kernels.attention import attention
from llava_jax.models.configs import LLMConfig
from llava_jax.models.layers import (
    ACT,
    ACT_HEADS,
    ACT_LOGITS,
    ACT_MLP,
    ACT_TOKENS,
    CACHE_AXES,
    LayerStack,
    RMSNorm,
    activation,
    apply_rope,
    dense,
    dtype_of,
    logical,
    rope_inv_freq,
)


def _norm(c: LLMConfig, name: str) -> RMSNorm:
  return RMSNorm(eps=c.rms_norm_eps, plus_one=c.norm_plus_one, dtype=dtype_of(c.dtype), name=name)


class Attention(nn.Module):
  cfg: LLMConfig

  @nn.compact
  def __call__(self, x, positions, segment_ids, kv_cache=None, cache_segment_ids=None, cache_index=None):
    """Self-attention, optionally reading and extending a KV cache.

    Args:
      x: float[B, T, E]; positions: int32[B, T]; segment_ids: int32[B, T] | None.
      kv_cache: None, or this layer's ``{"k", "v": float[B, S, K, D]}`` (S cache slots).
      cache_segment_ids: int32[B, S], the cache's slot ids before this call (0 = empty).
      cache_index: None to fill a fresh cache from slot 0 (prefill: attends only among the
        T new tokens), or an int32 scalar slot where the T new tokens go after the cached
        ones (decode / continuation: attends to the whole cache and causally among them).
    Returns:
      float[B, T, E] and the updated layer cache (None without a cache).
    """
    c, dt = self.cfg, dtype_of(self.cfg.dtype)
    d = c.dim_per_head
    q = dense((c.num_heads, d), ("embed", "heads", "head_dim"), name="q_proj", use_bias=c.qkv_bias, dtype=dt)(x)
    k = dense((c.num_kv_heads, d), ("embed", "kv_heads", "head_dim"), name="k_proj", use_bias=c.qkv_bias, dtype=dt)(x)
    v = dense((c.num_kv_heads, d), ("embed", "kv_heads", "head_dim"), name="v_proj", use_bias=c.qkv_bias, dtype=dt)(x)
    inv_freq = rope_inv_freq(d, c.rope_theta, c.rope_scaling)
    q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    q = nn.with_logical_constraint(q, ACT_HEADS)
    new_cache = None
    if kv_cache is None or cache_index is None:
      o = attention(q, k, v, causal=True, segment_ids=segment_ids, impl=c.attn_impl, sliding_window=c.sliding_window)
    else:
      o = _attend_to_cache(c, q, k, v, segment_ids, kv_cache, cache_segment_ids, cache_index)
    if kv_cache is not None:
      start = 0 if cache_index is None else cache_index
      new_cache = {
          name: nn.with_logical_constraint(
              jax.lax.dynamic_update_slice_in_dim(kv_cache[name], new.astype(kv_cache[name].dtype), start, axis=1),
              CACHE_AXES,
          )
          for name, new in (("k", k), ("v", v))
      }
    out = dense(c.hidden_size, ("heads", "head_dim", "embed"), axis=(-2, -1), name="o_proj", use_bias=False, dtype=dt)(
        o
    )
    return out, new_cache


def _attend_to_cache(c: LLMConfig, q, k, v, segment_ids, kv_cache, cache_segment_ids, cache_index):
  """Attention of T new tokens over [cache slots ; the T new keys].

  The new keys are appended after all S slots, so the dispatcher's bottom-right causal
  mask lets new token i see every cache slot and new keys 0..i; empty (future) and
  padding slots are hidden by their segment id 0. With a sliding window the cache is
  first rolled so slot ``cache_index - 1`` sits last, which makes key-index distances
  equal token distances (slots are shared by all rows, so the distance is exact for
  left-padded rows too).
  """
  b, t = q.shape[:2]
  ck, cv, cseg = kv_cache["k"], kv_cache["v"], cache_segment_ids
  if c.sliding_window is not None:
    shift = ck.shape[1] - cache_index
    ck, cv = jnp.roll(ck, shift, axis=1), jnp.roll(cv, shift, axis=1)
    cseg = jnp.roll(cseg, shift, axis=1)
  seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  keys = jnp.concatenate([ck, k.astype(ck.dtype)], axis=1)
  values = jnp.concatenate([cv, v.astype(cv.dtype)], axis=1)
  kv_seg = jnp.concatenate([cseg.astype(jnp.int32), seg], axis=1)
  return attention(
      q,
      keys.astype(q.dtype),
      values.astype(q.dtype),
      causal=True,
      segment_ids=seg,
      kv_segment_ids=kv_seg,
      impl=c.attn_impl,
      sliding_window=c.sliding_window,
  )


class MLP(nn.Module):
  cfg: LLMConfig

  @nn.compact
  def __call__(self, x):
    c, dt = self.cfg, dtype_of(self.cfg.dtype)
    gate = dense(c.intermediate_size, ("embed", "mlp"), name="gate_proj", use_bias=False, dtype=dt)(x)
    up = dense(c.intermediate_size, ("embed", "mlp"), name="up_proj", use_bias=False, dtype=dt)(x)
    h = nn.with_logical_constraint(activation(c.act)(gate) * up, ACT_MLP)
    return dense(c.hidden_size, ("mlp", "embed"), name="down_proj", use_bias=False, dtype=dt)(h)


class DecoderLayer(nn.Module):
  cfg: LLMConfig

  @nn.compact
  def __call__(self, x, positions, segment_ids, cache_segment_ids=None, cache_index=None, kv_cache=None):
    """One pre-norm block: float[B, T, E] -> (float[B, T, E], new layer cache or None)."""
    c = self.cfg
    h, new_cache = Attention(c, name="self_attn")(
        _norm(c, "input_layernorm")(x), positions, segment_ids, kv_cache, cache_segment_ids, cache_index
    )
    x = x + h
    x = x + MLP(c, name="mlp")(_norm(c, "post_attention_layernorm")(x))
    return nn.with_logical_constraint(x, ACT), new_cache


class Decoder(nn.Module):
  """Token embedding, decoder layers, final norm and LM head."""

  cfg: LLMConfig

  def setup(self):
    c = self.cfg
    self.embed_tokens = nn.Embed(
        c.vocab_size,
        c.hidden_size,
        dtype=dtype_of(c.dtype),
        param_dtype=jnp.float32,
        embedding_init=logical(nn.initializers.normal(0.02), ("vocab", "embed")),
    )
    self.decoder = LayerStack(DecoderLayer, c, depth=c.num_layers, scan=c.scan, remat=c.remat)
    self.norm = _norm(c, "norm")
    if not c.tie_embeddings:
      self.lm_head = dense(c.vocab_size, ("embed", "vocab"), name="lm_head", use_bias=False, dtype=dtype_of(c.dtype))

  def embed(self, input_ids):
    """int32[B, T] -> float[B, T, E] (unscaled; Gemma's sqrt(E) is applied in __call__)."""
    return self.embed_tokens(input_ids)

  def __call__(
      self,
      inputs_embeds,
      positions,
      segment_ids=None,
      cache=None,
      cache_index=None,
      *,
      last_only: bool = False,
      hidden_only: bool = False,
  ):
    """Decoder forward, optionally with a KV cache (see ``init_cache``).

    Args:
      inputs_embeds: float[B, T, E] (token embeddings with image features merged in).
      positions: int32[B, T] RoPE positions.
      segment_ids: int32[B, T] or None; 0 marks padding (never attended to).
      cache: None, or ``{"k", "v": float[L, B, S, K, D], "segment_ids": int32[B, S]}``.
        The T new tokens are written to slots ``[cache_index, cache_index + T)``; the
        caller keeps ``cache_index + T <= S`` (``dynamic_update_slice`` would clamp).
      cache_index: None: prefill an empty cache from slot 0 (attention among the T tokens
        only, the cheapest form); int32 scalar: continue a filled cache (decode steps,
        multi-turn chat), attending to the cached slots whose segment id is non-zero.
      last_only: return logits of the last position only (float32[B, 1, V]).
      hidden_only: return the last layer's output float[B, T, E] instead of logits (no
        cache); ``head`` turns any subset of its positions into logits.
    Returns:
      logits float32[B, T, V] without a cache; ``(logits, new_cache)`` with one.
    """
    c = self.cfg
    x = inputs_embeds.astype(dtype_of(c.dtype))
    if c.embed_scale:  # Gemma: the normaliser is rounded to the compute dtype first
      x = x * jnp.asarray(np.sqrt(c.hidden_size), x.dtype)
    x = nn.with_logical_constraint(x, ACT)
    new_cache = None
    if cache is None:
      x = self.decoder(x, positions, segment_ids)
    else:
      _check_cache(c, cache, x.shape, cache_index)
      seg = jnp.ones(x.shape[:2], jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
      x, kv = self.decoder(
          x, positions, seg, cache["segment_ids"], cache_index, layer_state={"k": cache["k"], "v": cache["v"]}
      )
      start = 0 if cache_index is None else cache_index
      new_seg = jax.lax.dynamic_update_slice_in_dim(cache["segment_ids"], seg, start, axis=1)
      new_cache = {
          "k": nn.with_logical_constraint(kv["k"], (None,) + CACHE_AXES),
          "v": nn.with_logical_constraint(kv["v"], (None,) + CACHE_AXES),
          "segment_ids": nn.with_logical_constraint(new_seg, ACT_TOKENS),
      }
    if hidden_only:
      if cache is not None:
        raise ValueError("hidden_only is for training forwards (no cache)")
      return x
    if last_only:
      x = x[:, -1:]
    logits = self.head(x)
    return logits if cache is None else (logits, new_cache)

  def head(self, x):
    """float[B, N, E] last-layer outputs -> float32[B, N, V] logits (final norm, LM head)."""
    x = self.norm(x)
    logits = self.embed_tokens.attend(x) if self.cfg.tie_embeddings else self.lm_head(x)
    return nn.with_logical_constraint(logits.astype(jnp.float32), ACT_LOGITS)


def init_cache(cfg: LLMConfig, batch: int, max_len: int, dtype=None) -> dict:
  """An empty KV cache: ``{"k", "v": zeros[L, B, S, K, D], "segment_ids": int32 zeros[B, S]}``.

  ``dtype`` defaults to the compute dtype ``cfg.dtype``; S = ``max_len`` slots, shared by
  all rows (left-padded prompts keep their padding slots, with segment id 0).
  """
  dt = jnp.dtype(dtype or cfg.dtype)
  shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.dim_per_head)
  axes = (None,) + CACHE_AXES
  return {
      "k": nn.with_logical_constraint(jnp.zeros(shape, dt), axes),
      "v": nn.with_logical_constraint(jnp.zeros(shape, dt), axes),
      "segment_ids": nn.with_logical_constraint(jnp.zeros((batch, max_len), jnp.int32), ACT_TOKENS),
  }


def _check_cache(c: LLMConfig, cache, x_shape, cache_index):
  """Shape checks (static) and, when the index is concrete, the slot range."""
  missing = {"k", "v", "segment_ids"} - set(cache)
  if missing:
    raise ValueError(f"cache needs keys k, v, segment_ids; missing {sorted(missing)}")
  b, t = x_shape[:2]
  want = (c.num_layers, b, None, c.num_kv_heads, c.dim_per_head)
  got = tuple(cache["k"].shape)
  if len(got) != 5 or any(w is not None and w != g for w, g in zip(want, got)):
    raise ValueError(
        f"cache k has shape {got}; expected [L={c.num_layers}, B={b}, S, K={c.num_kv_heads}, D={c.dim_per_head}]"
    )
  s = got[2]
  if cache["v"].shape != cache["k"].shape or tuple(cache["segment_ids"].shape) != (b, s):
    raise ValueError(
        f"cache v {cache['v'].shape} / segment_ids {cache['segment_ids'].shape} "
        f"do not match k {got} (segment_ids should be [{b}, {s}])"
    )
  start = 0 if cache_index is None else cache_index
  if not isinstance(start, jax.core.Tracer) and int(start) + t > s:
    raise ValueError(
        f"cache overflow: {t} new tokens at slot {int(start)} need {int(start) + t} slots, the cache has {s}"
    )


def init_llm(cfg: LLMConfig, rng, *, boxed: bool = False) -> dict:
  """Random params for a standalone decoder (embedding, layers, norm, head)."""
  ids = jnp.ones((1, 2), jnp.int32)
  pos = jnp.zeros((1, 2), jnp.int32)
  variables = Decoder(cfg).init(rng, ids, pos, method=lambda m, i, p: m(m.embed(i), p))
  return variables["params"] if boxed else nn.unbox(variables["params"])
