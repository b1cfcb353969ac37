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
from llava_jax.models.layers import (LayerStack, RMSNorm, activation, apply_rope, dense,
                                     dtype_of, logical, rope_inv_freq)

ACT = ("act_batch", "act_seq", "act_embed")


def _norm(c: LLMConfig, name: str) -> RMSNorm:
  return RMSNorm(eps=c.rms_norm_eps, plus_one=c.norm_plus_one, dtype=dtype_of(c.dtype), name=name)


class Attention(nn.Module):
  cfg: LLMConfig

  @nn.compact
  def __call__(self, x, positions, segment_ids):
    """x float[B, T, E], positions int32[B, T], segment_ids int32[B, T] | None."""
    c, dt = self.cfg, dtype_of(self.cfg.dtype)
    d = c.dim_per_head
    q = dense((c.num_heads, d), ("embed", "heads", "head_dim"), name="q_proj",
              use_bias=c.qkv_bias, dtype=dt)(x)
    k = dense((c.num_kv_heads, d), ("embed", "kv_heads", "head_dim"), name="k_proj",
              use_bias=c.qkv_bias, dtype=dt)(x)
    v = dense((c.num_kv_heads, d), ("embed", "kv_heads", "head_dim"), name="v_proj",
              use_bias=c.qkv_bias, dtype=dt)(x)
    inv_freq = rope_inv_freq(d, c.rope_theta, c.rope_scaling)
    q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    q = nn.with_logical_constraint(q, ("act_batch", "act_seq", "act_heads", "act_head_dim"))
    o = attention(q, k, v, causal=True, segment_ids=segment_ids, impl=c.attn_impl,
                  sliding_window=c.sliding_window)
    return dense(c.hidden_size, ("heads", "head_dim", "embed"), axis=(-2, -1), name="o_proj",
                 use_bias=False, dtype=dt)(o)


class MLP(nn.Module):
  cfg: LLMConfig

  @nn.compact
  def __call__(self, x):
    c, dt = self.cfg, dtype_of(self.cfg.dtype)
    gate = dense(c.intermediate_size, ("embed", "mlp"), name="gate_proj", use_bias=False, dtype=dt)(x)
    up = dense(c.intermediate_size, ("embed", "mlp"), name="up_proj", use_bias=False, dtype=dt)(x)
    h = nn.with_logical_constraint(activation(c.act)(gate) * up, ("act_batch", "act_seq", "act_mlp"))
    return dense(c.hidden_size, ("mlp", "embed"), name="down_proj", use_bias=False, dtype=dt)(h)


class DecoderLayer(nn.Module):
  cfg: LLMConfig

  @nn.compact
  def __call__(self, x, positions, segment_ids):
    c = self.cfg
    x = x + Attention(c, name="self_attn")(_norm(c, "input_layernorm")(x), positions, segment_ids)
    x = x + MLP(c, name="mlp")(_norm(c, "post_attention_layernorm")(x))
    return nn.with_logical_constraint(x, ACT), None


class Decoder(nn.Module):
  """Token embedding, decoder layers, final norm and LM head."""
  cfg: LLMConfig

  def setup(self):
    c = self.cfg
    self.embed_tokens = nn.Embed(
        c.vocab_size, c.hidden_size, dtype=dtype_of(c.dtype), param_dtype=jnp.float32,
        embedding_init=logical(nn.initializers.normal(0.02), ("vocab", "embed")))
    self.decoder = LayerStack(DecoderLayer, c, depth=c.num_layers, scan=c.scan, remat=c.remat)
    self.norm = _norm(c, "norm")
    if not c.tie_embeddings:
      self.lm_head = dense(c.vocab_size, ("embed", "vocab"), name="lm_head", use_bias=False,
                           dtype=dtype_of(c.dtype))

  def embed(self, input_ids):
    """int32[B, T] -> float[B, T, E] (unscaled; Gemma's sqrt(E) is applied in __call__)."""
    return self.embed_tokens(input_ids)

  def __call__(self, inputs_embeds, positions, segment_ids=None):
    """Decoder forward.

    Args:
      inputs_embeds: float[B, T, E] (token embeddings with image features merged in).
      positions: int32[B, T] RoPE positions.
      segment_ids: int32[B, T] or None; 0 marks padding (never attended to).
    Returns:
      logits float32[B, T, V].
    """
    c = self.cfg
    x = inputs_embeds.astype(dtype_of(c.dtype))
    if c.embed_scale:  # Gemma: the normaliser is rounded to the compute dtype first
      x = x * jnp.asarray(np.sqrt(c.hidden_size), x.dtype)
    x = nn.with_logical_constraint(x, ACT)
    x = self.decoder(x, positions, segment_ids)
    x = self.norm(x)
    if c.tie_embeddings:
      logits = self.embed_tokens.attend(x)
    else:
      logits = self.lm_head(x)
    return nn.with_logical_constraint(logits.astype(jnp.float32),
                                      ("act_batch", "act_seq", "act_vocab"))


def init_llm(cfg: LLMConfig, rng, *, boxed: bool = False) -> dict:
  """Random params for a standalone decoder (embedding, layers, norm, head)."""
  ids = jnp.ones((1, 2), jnp.int32)
  pos = jnp.zeros((1, 2), jnp.int32)
  variables = Decoder(cfg).init(rng, ids, pos, method=lambda m, i, p: m(m.embed(i), p))
  return variables["params"] if boxed else nn.unbox(variables["params"])
