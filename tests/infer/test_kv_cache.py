"""KV cache: cached prefill + decode logits equal the uncached full forward at every step.

Tiny random LLaVAs (params ~ N(0, 0.1), norms 1 + N(0, 0.1), so attention is far from
uniform and a wrong mask or position shows up well above the 1e-4 tolerance).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llava_jax.infer import sampler
from llava_jax.models import llava as llava_lib
from llava_jax.models.configs import LLM_VARIANTS, llava_config
from llava_jax.models.llm import Decoder, init_cache

TOL = 1e-4

# (name, llm overrides): Llama (scanned), unscanned, Mistral sliding window smaller than
# the sequence, Qwen2 (qkv bias, tied), Gemma (embed scale, 1 + w norms, GeGLU).
FAMILIES = {
    "llama_scan": dict(scan=True),
    "llama_unrolled": dict(scan=False, remat="none"),
    "mistral_window": dict(sliding_window=5),
    "qwen2": dict(qkv_bias=True, tie_embeddings=True),
    "gemma": dict(embed_scale=True, norm_plus_one=True, act="gelu_tanh", tie_embeddings=True, head_dim=32),
}


def _random_params(cfg, seed):
  """Params of ``cfg``'s shapes filled with numpy noise (no init compile: fast)."""
  shapes = jax.eval_shape(lambda: llava_lib.init_params(cfg, jax.random.key(0)))
  rng = np.random.default_rng(seed)

  def fill(path, s):
    noise = 0.1 * rng.standard_normal(s.shape).astype(np.float32)
    name = jax.tree_util.keystr(path)
    return 1.0 + noise if "norm" in name and "scale" in name else noise

  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module", params=list(FAMILIES))
def model(request):
  llm = dataclasses.replace(LLM_VARIANTS["tiny"], **FAMILIES[request.param])
  cfg = llava_config("clip-tiny", llm, check_image_tokens=False)
  params = _random_params(cfg, seed=len(request.param))
  return request.param, cfg, params


def _batch(cfg, seed=0):
  """3 left-padded prompts (two with an image), lengths 12, 7, 3 + image tokens."""
  n, img = cfg.num_image_tokens, cfg.image_token_id
  rng = np.random.default_rng(seed)
  rows = [
      [1] + [img] * n + list(rng.integers(3, 200, 11)),
      list(rng.integers(3, 200, 7)),
      [1] + [img] * n + list(rng.integers(3, 200, 2)),
  ]
  t = max(map(len, rows))
  ids, mask = np.zeros((3, t), np.int32), np.zeros((3, t), np.int32)
  for i, r in enumerate(rows):
    ids[i, t - len(r) :], mask[i, t - len(r) :] = r, 1
  px = rng.normal(size=(2, cfg.vision.image_size, cfg.vision.image_size, 3)).astype(np.float32)
  return ids, mask, px


def _full_logits(cfg, params, ids, px, mask):
  return np.asarray(
      jax.jit(lambda p, i, x, m: llava_lib.Llava(cfg).apply({"params": p}, i, x, m))(params, ids, px, mask)
  )


def test_decode_logits_equal_full_forward_every_step(model):
  name, cfg, params = model
  ids, mask, px = _batch(cfg)
  b, p = ids.shape
  steps = 6
  new = np.random.default_rng(1).integers(3, 200, (b, steps)).astype(np.int32)
  full_ids = np.concatenate([ids, new], axis=1)
  full_mask = np.concatenate([mask, np.ones_like(new)], axis=1)
  ref = _full_logits(cfg, params, full_ids, px, full_mask)

  logits, cache, pos = sampler.prefill(cfg, params, ids, px, mask, cache_len=p + steps)
  np.testing.assert_array_equal(np.asarray(pos), mask.sum(1))
  errs = [np.abs(np.asarray(logits) - ref[:, p - 1]).max()]
  wrong = None
  for j in range(steps):
    if j == 2:  # the same step one position off must be visibly wrong
      wrong, _ = sampler.decode_step(cfg, params, new[:, j], cache, p + j, pos + 1)
    logits, cache = sampler.decode_step(cfg, params, new[:, j], cache, p + j, pos)
    pos = pos + 1
    errs.append(np.abs(np.asarray(logits) - ref[:, p + j]).max())
    if j == 2:
      assert np.abs(np.asarray(wrong) - ref[:, p + j]).max() > 100 * TOL
  print(f"{name}: max |logit diff| per step {['%.1e' % e for e in errs]}")
  assert max(errs) < TOL, errs
  np.testing.assert_array_equal(np.asarray(cache["segment_ids"]), full_mask)


def test_multi_token_continuation_chunk(model):
  """A prompt, then a 4-token chunk at cache_index (multi-turn chat) == full forward."""
  name, cfg, params = model
  c = cfg.llm
  rng = np.random.default_rng(2)
  ids = rng.integers(3, 200, (2, 13)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, :3] = 0  # left padding in row 1
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
  dec = Decoder(c)

  @jax.jit
  def run(p):
    embed = lambda i: dec.apply({"params": p}, i, method=Decoder.embed)
    full = dec.apply({"params": p}, embed(ids), pos, mask)
    cache = init_cache(c, 2, 16)
    a, cache = dec.apply({"params": p}, embed(ids[:, :9]), pos[:, :9], mask[:, :9], cache)
    b, cache = dec.apply({"params": p}, embed(ids[:, 9:]), pos[:, 9:], mask[:, 9:], cache, jnp.int32(9))
    return full, jnp.concatenate([a, b], axis=1), cache

  full, chunked, cache = run(params["llm"])
  valid = mask.astype(bool)
  err = np.abs(np.asarray(full) - np.asarray(chunked))[valid].max()
  assert err < TOL, f"{name}: {err:.2e}"
  assert cache["k"].shape == (c.num_layers, 2, 16, c.num_kv_heads, c.dim_per_head)
  np.testing.assert_array_equal(np.asarray(cache["segment_ids"])[:, :13], mask)
  assert not np.asarray(cache["segment_ids"])[:, 13:].any()


def test_cache_errors_are_specific():
  cfg = LLM_VARIANTS["tiny"]
  params = jax.tree.map(
      jnp.zeros_like,
      jax.eval_shape(
          lambda: Decoder(cfg).init(jax.random.key(0), jnp.ones((1, 2, cfg.hidden_size)), jnp.zeros((1, 2), jnp.int32))[
              "params"
          ]
      ),
  )
  params = jax.tree.map(lambda a: a.value if hasattr(a, "value") else a, params, is_leaf=lambda a: hasattr(a, "value"))
  x = jnp.zeros((1, 4, cfg.hidden_size))
  pos = jnp.zeros((1, 4), jnp.int32)
  with pytest.raises(ValueError, match="cache overflow: 4 new tokens at slot 3 need 7 slots"):
    Decoder(cfg).apply({"params": params}, x, pos, None, init_cache(cfg, 1, 6), 3)
  with pytest.raises(ValueError, match=r"expected \[L=2, B=1, S, K=2, D=16\]"):
    Decoder(cfg).apply({"params": params}, x, pos, None, init_cache(cfg, 2, 6))
