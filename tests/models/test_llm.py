"""Decoder LLM parity with HF PyTorch (Llama, Llama-3 RoPE, Mistral, Qwen2, Gemma) in float32.

Loaded through ``load_hf_llm`` from a ``save_pretrained`` directory, as a user would.
Per-layer tolerance 1e-5, whole model 1e-4 (never loosened).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import tiny_hf
from llava_jax.checkpoint.convert.hf import load_hf_llm
from llava_jax.models.llm import Decoder, DecoderLayer

FAMILIES = ["llama", "llama3", "mistral", "qwen2", "gemma"]


@pytest.fixture(scope="module", params=FAMILIES)
def hf_lm(request, tmp_path_factory):
  model = tiny_hf.causal_lm(request.param, seed=FAMILIES.index(request.param))
  path = tmp_path_factory.mktemp(request.param)
  model.save_pretrained(path)
  return request.param, model, str(path)


def _ids(vocab, b=2, t=11, seed=0):
  return np.random.default_rng(seed).integers(3, vocab, size=(b, t)).astype(np.int32)


@pytest.mark.parametrize("scan", [False, True])
def test_whole_model_logits(hf_lm, scan):
  family, model, path = hf_lm
  cfg, params = load_hf_llm(path, scan=scan, remat="none" if not scan else "full")
  ids = _ids(cfg.vocab_size)
  with torch.no_grad():
    ref = model(torch.from_numpy(ids).long()).logits.numpy()
  pos = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape)
  apply = jax.jit(lambda p, i, q: Decoder(cfg).apply({"params": p}, i, q, method=lambda m, i, q: m(m.embed(i), q)))
  out = np.asarray(apply(params, ids, pos))
  err = np.abs(out - ref).max()
  print(f"{family} scan={scan}: max |logit diff| = {err:.2e}")
  assert out.shape == ref.shape and err < 1e-4


def test_each_layer(hf_lm):
  family, model, path = hf_lm
  cfg, params = load_hf_llm(path, scan=False, remat="none")
  ids = _ids(cfg.vocab_size, seed=1)
  with torch.no_grad():
    hs = [h.numpy() for h in model(torch.from_numpy(ids).long(), output_hidden_states=True).hidden_states]
  pos = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
  x0 = Decoder(cfg).apply({"params": params}, ids, method=lambda m, i: m.embed(i))
  if cfg.embed_scale:
    x0 = x0 * np.sqrt(cfg.hidden_size).astype(np.float32)
  np.testing.assert_allclose(np.asarray(x0), hs[0], atol=1e-5, rtol=0)
  # hs[L] is after the final norm in HF; every intermediate one is a single block's output.
  for i in range(cfg.num_layers - 1):
    layer_params = params["decoder"][f"layers_{i}"]
    out, _ = DecoderLayer(cfg).apply({"params": layer_params}, jnp.asarray(hs[i]), pos, None)
    err = np.abs(np.asarray(out) - hs[i + 1]).max()
    assert err < 1e-5, f"{family} layer {i}: {err:.2e}"


def test_padding_mask_matches_hf(hf_lm):
  family, model, path = hf_lm
  cfg, params = load_hf_llm(path)
  ids = _ids(cfg.vocab_size, seed=2)
  mask = np.ones_like(ids)
  mask[1, 7:] = 0  # right padding: HF positions equal ours on the valid tokens
  with torch.no_grad():
    ref = model(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()).logits.numpy()
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
  out = np.asarray(
      Decoder(cfg).apply({"params": params}, ids, pos, mask, method=lambda m, i, q, s: m(m.embed(i), q, s))
  )
  valid = mask.astype(bool)
  assert np.abs(out[valid] - ref[valid]).max() < 1e-4


def test_unknown_family_is_a_clear_error(tmp_path):
  import json

  (tmp_path / "config.json").write_text(json.dumps({"model_type": "falcon"}))
  from llava_jax.checkpoint.convert.hf import llm_config_from_hf

  with pytest.raises(ValueError, match="unsupported text model_type 'falcon'"):
    llm_config_from_hf({"model_type": "falcon"})
