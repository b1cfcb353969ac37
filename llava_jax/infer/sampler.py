"""Batched generation for LLaVA: greedy, temperature, top-k and top-p sampling.

This first version re-runs the decoder over a fixed-size [B, P + N] buffer every step
(no KV cache): exact and jit-compiled once, O((P+N)^2) per token. The KV-cache sampler
keeps this signature.

Einsum letters: B batch, P prompt length, N new tokens, E embed, V vocab.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from llava_jax.models.configs import LlavaConfig
from llava_jax.models.llava import Llava, default_positions


def sample_logits(logits, rng, *, temperature: float = 0.0, top_k: int | None = None,
                  top_p: float | None = None):
  """Picks one token per row. logits float32[B, V] -> int32[B]; greedy if temperature == 0."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (always at least one token).
    drop_sorted = (cum - jax.nn.softmax(sorted_logits, axis=-1)) >= top_p
    drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
    logits = jnp.where(drop, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def generate(cfg: LlavaConfig, params, input_ids, pixel_values=None, attention_mask=None, *,
             max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, eos_token_id: int | None = None, rng=None):
  """Generates ``max_new_tokens`` per prompt.

  Args:
    input_ids: int32[B, P], prompts left-padded (``attention_mask`` 0 on the left), with
      ``cfg.num_image_tokens`` image placeholders per image.
    pixel_values: float32[I, S, S, 3] normalised NHWC, or None.
    attention_mask: int[B, P] or None (no padding).
    temperature, top_k, top_p: sampling controls; greedy when temperature == 0.
    eos_token_id: a row stops after emitting it; later positions hold ``cfg.pad_token_id``.
    rng: PRNG key, required when sampling.
  Returns:
    int32[B, max_new_tokens].
  """
  if temperature > 0 and rng is None:
    raise ValueError("sampling (temperature > 0) needs an explicit rng key")
  if attention_mask is None:
    attention_mask = jnp.ones_like(input_ids)
  rng = jax.random.key(0) if rng is None else rng
  return _generate(cfg, params, jnp.asarray(input_ids, jnp.int32), pixel_values,
                   jnp.asarray(attention_mask, jnp.int32), rng, max_new_tokens=max_new_tokens,
                   temperature=float(temperature), top_k=top_k, top_p=top_p,
                   eos_token_id=eos_token_id)


@functools.partial(jax.jit, static_argnums=0, static_argnames=(
    "max_new_tokens", "temperature", "top_k", "top_p", "eos_token_id"))
def _generate(cfg, params, input_ids, pixel_values, attention_mask, rng, *, max_new_tokens,
              temperature, top_k, top_p, eos_token_id):
  model = Llava(cfg)
  b, p = input_ids.shape
  n = max_new_tokens
  prompt = model.apply({"params": params}, input_ids, pixel_values, method=Llava.embed_inputs)
  embeds = jnp.concatenate([prompt, jnp.zeros((b, n, prompt.shape[-1]), prompt.dtype)], axis=1)
  mask = jnp.concatenate([attention_mask, jnp.zeros((b, n), jnp.int32)], axis=1)
  tokens = jnp.full((b, n), cfg.pad_token_id, jnp.int32)
  done = jnp.zeros((b,), bool)

  def step(i, state):
    embeds, mask, tokens, done, rng = state
    logits = model.apply({"params": params}, embeds, default_positions(mask, mask), mask,
                         method=lambda m, e, q, s: m.llm(e, q, s))
    last = jax.lax.dynamic_index_in_dim(logits, p + i - 1, axis=1, keepdims=False)
    rng, sub = jax.random.split(rng)
    nxt = sample_logits(last, sub, temperature=temperature, top_k=top_k, top_p=top_p)
    nxt = jnp.where(done, cfg.pad_token_id, nxt)
    if eos_token_id is not None:
      done = done | (nxt == eos_token_id)
    tokens = tokens.at[:, i].set(nxt)
    new = model.apply({"params": params}, nxt[:, None], method=lambda m, t: m.llm.embed(t))
    embeds = jax.lax.dynamic_update_slice_in_dim(embeds, new.astype(embeds.dtype), p + i, axis=1)
    mask = mask.at[:, p + i].set(1)
    return embeds, mask, tokens, done, rng

  _, _, tokens, _, _ = jax.lax.fori_loop(0, n, step, (embeds, mask, tokens, done, rng))
  return tokens
