"""big_vision SigLIP / PaliGemma ``.npz`` loading, checked against HF PyTorch in float32.

The npz files are written here by hand from randomised HF models, with big_vision's key
names and layouts (independent of the loader's code). Tolerances: 1e-5 per block, 1e-4
whole model (never loosened).
"""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf

import tiny_hf
from llava_jax.checkpoint.convert.big_vision import load_paligemma_npz, load_siglip_npz
from llava_jax.models.llava import Llava
from llava_jax.models.llm import Decoder
from llava_jax.models.vit import EncoderLayer, VisionTransformer

HEADS = 4


def _np(t) -> np.ndarray:
  return t.detach().float().numpy().copy()


def _mha(q, qb, k, kb, v, vb, o, ob, heads) -> dict:
  """torch q/k/v [H*D, E] and out [E, H*D] -> flax MultiHeadDotProductAttention leaves."""
  e = q.shape[1]
  d = e // heads
  out = {}
  for name, w, b in (("query", q, qb), ("key", k, kb), ("value", v, vb)):
    out[f"{name}/kernel"] = w.T.reshape(e, heads, d)
    out[f"{name}/bias"] = b.reshape(heads, d)
  out["out/kernel"] = o.T.reshape(heads, d, o.shape[0])
  out["out/bias"] = ob
  return out


def _under(prefix: str, d: dict) -> dict:
  return {prefix + k: v for k, v in d.items()}


def siglip_to_big_vision(sd: dict, prefix: str, heads: int, scanned: bool) -> dict:
  """HF SiglipVisionModel weights (keys under ``prefix``) -> big_vision ``img/…`` npz keys."""
  g = lambda k: _np(sd[prefix + k])
  depth = len({k[len(prefix) :].split(".")[2] for k in sd if k.startswith(prefix + "encoder.layers.")})
  out = {
      "embedding/kernel": g("embeddings.patch_embedding.weight").transpose(2, 3, 1, 0),
      "embedding/bias": g("embeddings.patch_embedding.bias"),
      "pos_embedding": g("embeddings.position_embedding.weight")[None],
      "Transformer/encoder_norm/scale": g("post_layernorm.weight"),
      "Transformer/encoder_norm/bias": g("post_layernorm.bias"),
  }
  blocks = []
  for i in range(depth):
    s = f"encoder.layers.{i}."
    a = lambda n: (g(s + f"self_attn.{n}.weight"), g(s + f"self_attn.{n}.bias"))
    blk = {
        "LayerNorm_0/scale": g(s + "layer_norm1.weight"),
        "LayerNorm_0/bias": g(s + "layer_norm1.bias"),
        "LayerNorm_1/scale": g(s + "layer_norm2.weight"),
        "LayerNorm_1/bias": g(s + "layer_norm2.bias"),
        "MlpBlock_0/Dense_0/kernel": g(s + "mlp.fc1.weight").T,
        "MlpBlock_0/Dense_0/bias": g(s + "mlp.fc1.bias"),
        "MlpBlock_0/Dense_1/kernel": g(s + "mlp.fc2.weight").T,
        "MlpBlock_0/Dense_1/bias": g(s + "mlp.fc2.bias"),
    }
    blk.update(
        _under("MultiHeadDotProductAttention_0/", _mha(*a("q_proj"), *a("k_proj"), *a("v_proj"), *a("out_proj"), heads))
    )
    blocks.append(blk)
  if scanned:
    out.update({f"Transformer/encoderblock/{k}": np.stack([b[k] for b in blocks]) for k in blocks[0]})
  else:
    for i, b in enumerate(blocks):
      out.update(_under(f"Transformer/encoderblock_{i}/", b))
  if prefix + "head.probe" in sd:
    qkv_w = np.split(g("head.attention.in_proj_weight"), 3)
    qkv_b = np.split(g("head.attention.in_proj_bias"), 3)
    out.update(
        {
            "MAPHead_0/probe": g("head.probe"),
            "MAPHead_0/LayerNorm_0/scale": g("head.layernorm.weight"),
            "MAPHead_0/LayerNorm_0/bias": g("head.layernorm.bias"),
            "MAPHead_0/MlpBlock_0/Dense_0/kernel": g("head.mlp.fc1.weight").T,
            "MAPHead_0/MlpBlock_0/Dense_0/bias": g("head.mlp.fc1.bias"),
            "MAPHead_0/MlpBlock_0/Dense_1/kernel": g("head.mlp.fc2.weight").T,
            "MAPHead_0/MlpBlock_0/Dense_1/bias": g("head.mlp.fc2.bias"),
        }
    )
    out.update(
        _under(
            "MAPHead_0/MultiHeadDotProductAttention_0/",
            _mha(
                qkv_w[0],
                qkv_b[0],
                qkv_w[1],
                qkv_b[1],
                qkv_w[2],
                qkv_b[2],
                g("head.attention.out_proj.weight"),
                g("head.attention.out_proj.bias"),
                heads,
            ),
        )
    )
  return _under("params/img/", out)


@pytest.fixture(scope="module")
def hf_siglip():
  return tiny_hf.randomize_(tf.SiglipVisionModel(tiny_hf.siglip_vision_config()), seed=3)


def _write_npz(tmp_path, arrays: dict, name="ckpt.npz") -> str:
  path = str(tmp_path / name)
  np.savez(path, **arrays)
  return path


def _hf_vision_outputs(model, px):
  with torch.no_grad():
    out = model(pixel_values=tiny_hf.to_torch_pixels(px), output_hidden_states=True)
  return (_np(out.last_hidden_state), _np(out.pooler_output), [_np(h) for h in out.hidden_states])


@pytest.mark.parametrize("scanned_file,scan", [(False, False), (True, True), (True, False), (False, True)])
def test_siglip_matches_hf(hf_siglip, tmp_path, scanned_file, scan):
  npz = siglip_to_big_vision(hf_siglip.state_dict(), "", HEADS, scanned_file)
  cfg, params = load_siglip_npz(_write_npz(tmp_path, npz), scan=scan)
  assert (cfg.width, cfg.depth, cfg.mlp_dim, cfg.num_heads, cfg.patch_size, cfg.image_size) == (
      64,
      3,
      128,
      HEADS,
      7,
      28,
  )
  assert cfg.head and cfg.patch_bias and not cfg.class_token and cfg.scan == scan
  px = tiny_hf.random_pixels(2, seed=4)
  ref_last, ref_pooled, ref_hs = _hf_vision_outputs(hf_siglip, px)
  vit = VisionTransformer(cfg)
  last, pooled = vit.apply({"params": params}, px, method="tower")
  err_last = np.abs(np.asarray(last) - ref_last).max()
  err_pooled = np.abs(np.asarray(pooled) - ref_pooled).max()
  print(f"siglip scanned_file={scanned_file} scan={scan}: last {err_last:.2e} pooled {err_pooled:.2e}")
  assert err_last < 1e-4 and err_pooled < 1e-4
  # LLaVA features: last layer, all tokens (no class token to drop), before post-LN.
  feats = np.asarray(vit.apply({"params": params}, px))
  assert np.abs(feats - ref_hs[-1]).max() < 1e-4
  layers = params["encoder"]
  for i in range(cfg.depth):
    p = jax.tree.map(lambda a: a[i], layers["layers"]) if scan else layers[f"layers_{i}"]
    out, _ = EncoderLayer(cfg).apply({"params": p}, jnp.asarray(ref_hs[i]))
    err = np.abs(np.asarray(out) - ref_hs[i + 1]).max()
    assert err < 1e-5, f"block {i}: {err:.2e}"
  emb = vit.apply({"params": params}, px, 0, method="hidden_state")
  assert np.abs(np.asarray(emb) - ref_hs[0]).max() < 1e-5


def test_siglip_image_text_checkpoint_without_params_prefix(hf_siglip, caplog):
  npz = siglip_to_big_vision(hf_siglip.state_dict(), "", HEADS, scanned=True)
  rng = np.random.default_rng(0)
  tree = {k[len("params/") :]: v for k, v in npz.items()}
  tree.update(
      {
          "txt/Encoder_0/encoder_norm/scale": rng.normal(size=8).astype(np.float32),
          "txt/head/kernel": rng.normal(size=(8, 8)).astype(np.float32),
          "img/head/kernel": rng.normal(size=(64, 8)).astype(np.float32),
          "t": np.ones((1,), np.float32),
          "b": np.zeros((1,), np.float32),
      }
  )
  with caplog.at_level(logging.WARNING):
    cfg, params = load_siglip_npz(tree)
  assert "ignoring 5 keys" in caplog.text and "txt/head" in caplog.text and "img/head" in caplog.text
  px = tiny_hf.random_pixels(1, seed=5)
  ref_last, ref_pooled, _ = _hf_vision_outputs(hf_siglip, px)
  last, pooled = VisionTransformer(cfg).apply({"params": params}, px, method="tower")
  assert np.abs(np.asarray(last) - ref_last).max() < 1e-4
  assert np.abs(np.asarray(pooled) - ref_pooled).max() < 1e-4


@pytest.mark.parametrize("scanned", [False, True])
def test_siglip_missing_and_unknown_keys_are_named(hf_siglip, scanned):
  npz = siglip_to_big_vision(hf_siglip.state_dict(), "", HEADS, scanned)
  block = "encoderblock" if scanned else "encoderblock_1"
  missing = f"params/img/Transformer/{block}/LayerNorm_1/bias"
  broken = {k: v for k, v in npz.items() if k != missing}
  with pytest.raises(KeyError, match=f"img/Transformer/{block}/LayerNorm_1/bias"):
    load_siglip_npz(broken)
  unknown = dict(npz)
  unknown[f"params/img/Transformer/{block}/LayerScale_0/scale"] = np.ones((3, 64) if scanned else (64,), np.float32)
  with pytest.raises(KeyError, match=f"img/Transformer/{block}/LayerScale_0/scale"):
    load_siglip_npz(unknown)


def test_siglip_variant_cross_check(hf_siglip):
  npz = siglip_to_big_vision(hf_siglip.state_dict(), "", HEADS, scanned=False)
  with pytest.raises(ValueError, match="'width': \\(64, 768\\)"):
    load_siglip_npz(npz, variant="B/16")
  mu = tiny_hf.randomize_(
      tf.SiglipVisionModel(
          tf.SiglipVisionConfig(
              hidden_size=32,
              intermediate_size=128,
              num_hidden_layers=1,
              num_attention_heads=2,
              image_size=28,
              patch_size=7,
          )
      )
  )
  cfg, _ = load_siglip_npz(siglip_to_big_vision(mu.state_dict(), "", 2, False), variant="mu/7")
  assert (cfg.width, cfg.depth, cfg.mlp_dim, cfg.num_heads) == (32, 1, 128, 2)
  with pytest.raises(ValueError, match="patch_size"):
    load_siglip_npz(siglip_to_big_vision(mu.state_dict(), "", 2, False), variant="mu/14")


# ----------------------------------------------------------------------------- PaliGemma

LLM_WIDTH = 80  # differs from the ViT width (64), so a swapped projector axis cannot pass


def gemma_to_big_vision(sd: dict, prefix: str, cfg, scanned: bool, fused: bool) -> dict:
  """HF GemmaModel weights (keys under ``prefix``) -> big_vision ``llm/…`` npz keys."""
  g = lambda k: _np(sd[prefix + k])
  h, k_heads, d, e = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
  heads = lambda w, n: w.reshape(n, d, e).transpose(0, 2, 1)  # [n*D, E] -> [n, E, D]
  layers = []
  for i in range(cfg.num_hidden_layers):
    s = f"layers.{i}."
    q, k, v = (heads(g(s + f"self_attn.{n}_proj.weight"), n_h) for n, n_h in (("q", h), ("k", k_heads), ("v", k_heads)))
    lyr = {
        "attn/attn_vec_einsum/w": g(s + "self_attn.o_proj.weight").T.reshape(h, d, e),
        "mlp/gating_einsum": np.stack([g(s + "mlp.gate_proj.weight").T, g(s + "mlp.up_proj.weight").T]),
        "mlp/linear": g(s + "mlp.down_proj.weight").T,
        "pre_attention_norm/scale": g(s + "input_layernorm.weight"),
        "pre_ffw_norm/scale": g(s + "post_attention_layernorm.weight"),
    }
    if fused:
      lyr["attn/qkv_einsum/w"] = np.stack([q, k, v])
    else:
      lyr["attn/q_einsum/w"] = q
      lyr["attn/kv_einsum/w"] = np.stack([k, v])
    layers.append(lyr)
  out = {"embedder/input_embedding": g("embed_tokens.weight"), "final_norm/scale": g("norm.weight")}
  if scanned:
    out.update({f"layers/{k}": np.stack([l[k] for l in layers]) for k in layers[0]})
  else:
    for i, l in enumerate(layers):
      out.update(_under(f"layers_{i}/", l))
  return _under("params/llm/", out)


@pytest.fixture(scope="module", params=[("scanned", 2), ("blocks", 4)], ids=["scanned-gqa", "blocks-mha"])
def paligemma(request, tmp_path_factory):
  layout, kv_heads = request.param
  text = tiny_hf.text_config(
      "gemma", hidden_size=LLM_WIDTH, num_key_value_heads=kv_heads, use_bidirectional_attention=False
  )
  vision = tiny_hf.siglip_vision_config(vision_use_head=False)
  vocab = text.vocab_size
  cfg = tf.PaliGemmaConfig(
      vision_config=vision,
      text_config=text,
      image_token_index=vocab,
      projection_dim=LLM_WIDTH,
      hidden_size=LLM_WIDTH,
      vocab_size=vocab,
  )
  model = tiny_hf.randomize_(tf.PaliGemmaForConditionalGeneration(cfg), seed=7)
  sd = model.state_dict()
  npz = siglip_to_big_vision(sd, "model.vision_tower.", HEADS, scanned=True)
  npz["params/img/head/kernel"] = _np(sd["model.multi_modal_projector.linear.weight"]).T
  npz["params/img/head/bias"] = _np(sd["model.multi_modal_projector.linear.bias"])
  npz.update(gemma_to_big_vision(sd, "model.language_model.", text, layout == "scanned", fused=kv_heads == HEADS))
  path = _write_npz(tmp_path_factory.mktemp("paligemma"), npz)
  return model, text, path


def test_paligemma_llm_matches_hf_gemma(paligemma):
  model, text, path = paligemma
  cfg, params = load_paligemma_npz(path, llm_overrides={"scan": False, "remat": "none"})
  lm = tiny_hf.randomize_(tf.GemmaForCausalLM(text), seed=99)  # then overwritten
  lm_sd = {
      "model." + k[len("model.language_model.") :]: v
      for k, v in model.state_dict().items()
      if k.startswith("model.language_model.")
  }
  lm_sd["lm_head.weight"] = lm_sd["model.embed_tokens.weight"]
  lm.load_state_dict(lm_sd, strict=True)
  assert cfg.llm.num_kv_heads == text.num_key_value_heads and cfg.llm.tie_embeddings
  ids = np.random.default_rng(1).integers(3, text.vocab_size, size=(2, 9)).astype(np.int32)
  with torch.no_grad():
    ref = lm(torch.from_numpy(ids).long()).logits.numpy()
  pos = np.broadcast_to(np.arange(9, dtype=np.int32), ids.shape)
  out = Decoder(cfg.llm).apply({"params": params["llm"]}, ids, pos, method=lambda m, i, p: m(m.embed(i), p))
  err = np.abs(np.asarray(out) - ref).max()
  print(f"paligemma gemma logits: {err:.2e}")
  assert err < 1e-4


def test_paligemma_tower_and_projector(paligemma):
  model, _, path = paligemma
  cfg, params = load_paligemma_npz(path, fold_image_scale=False, vision_overrides={"scan": False})
  assert cfg.projector.kind == "linear" and cfg.vision.select_layer == -1
  assert cfg.num_image_tokens == 16 and not cfg.vision.head and cfg.vision.depth == 3
  px = tiny_hf.random_pixels(2, seed=6)
  tpx = tiny_hf.to_torch_pixels(px)
  with torch.no_grad():
    ref = _np(model.model.get_image_features(tpx).pooler_output)
    tower = model.model.vision_tower(tpx, output_hidden_states=True)
    # LLaVA's own choice (feature_norm=False): hidden_states[-1], before post_layernorm.
    ref_llava = _np(model.model.multi_modal_projector(tower.hidden_states[-1]))
  last, _ = VisionTransformer(cfg.vision).apply({"params": params["img"]}, px, method="tower")
  assert np.abs(np.asarray(last) - _np(tower.last_hidden_state)).max() < 1e-4
  assert cfg.vision.feature_norm  # PaliGemma projects the post-LayerNorm tower output
  feats = Llava(cfg).apply({"params": params}, px, method="embed_image")
  err = np.abs(np.asarray(feats) - ref).max()
  print(f"paligemma projected image features: {err:.2e}")
  assert err < 1e-4
  pre_cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, feature_norm=False))
  llava_feats = Llava(pre_cfg).apply({"params": params}, px, method="embed_image")
  assert np.abs(np.asarray(llava_feats) - ref_llava).max() < 1e-4


def test_paligemma_folded_scale_matches_hf_causal(paligemma):
  """With a causal mask (no token_type_ids) HF PaliGemma equals our modules + folded scale."""
  model, text, path = paligemma
  cfg, params = load_paligemma_npz(path)
  assert cfg.image_token_id == text.vocab_size
  rng = np.random.default_rng(2)
  n = cfg.num_image_tokens
  ids = np.concatenate(
      [np.full((2, n), cfg.image_token_id), rng.integers(3, text.vocab_size, size=(2, 7))], axis=1
  ).astype(np.int32)
  px = tiny_hf.random_pixels(2, seed=8)
  with torch.no_grad():
    ref = model(input_ids=torch.from_numpy(ids).long(), pixel_values=tiny_hf.to_torch_pixels(px)).logits.numpy()
  out = np.asarray(Llava(cfg).apply({"params": params}, ids, px))
  err = np.abs(out - ref).max()
  print(f"paligemma (folded scale) vs HF causal logits: {err:.2e}")
  assert err < 1e-4
  raw_cfg, raw = load_paligemma_npz(path, fold_image_scale=False)
  unfolded = np.asarray(Llava(raw_cfg).apply({"params": raw}, ids, px))
  assert np.abs(unfolded - ref).max() > 1e-2  # the scale is real, not a no-op


def test_paligemma_gemma2_is_rejected(paligemma):
  _, _, path = paligemma
  arrays = dict(np.load(path))
  extra, shape = "params/llm/layers/post_attention_norm/scale", (3, LLM_WIDTH)
  if "params/llm/layers_0/pre_ffw_norm/scale" in arrays:
    extra, shape = "params/llm/layers_0/post_attention_norm/scale", (LLM_WIDTH,)
  arrays[extra] = np.zeros(shape, np.float32)
  with pytest.raises(ValueError, match="Gemma 2"):
    load_paligemma_npz(arrays)
  del arrays[extra]
  del arrays["params/img/head/bias"]
  with pytest.raises(KeyError, match="img/head/bias"):
    load_paligemma_npz(arrays)
