"""Original haotian-liu/LLaVA checkpoints, checked against HF LlavaForConditionalGeneration
built from the same weights (float32, whole model 1e-4, projector alone 1e-5)."""

import json

import numpy as np
import pytest
import torch
import transformers as tf
from safetensors.numpy import save_file

import tiny_hf
from llava_jax.checkpoint.convert.llava_original import (
    IMAGE_TOKEN_INDEX,
    expand_image_placeholders,
    load_llava_original,
    load_llava_projector,
    prompt_options,
)
from llava_jax.models.llava import Llava
from llava_jax.models.projector import Projector

LLM_WIDTH = 48  # != CLIP width 64, so a transposed projector cannot pass
HF_IMAGE_TOKEN = 127


def _np(t) -> np.ndarray:
  return t.detach().float().numpy().copy()


def _original_config(lm_cfg, tower, **mm) -> dict:
  """config.json as original LLaVA (transformers 4.31 LlamaConfig fields + mm_*) writes it."""
  return {
      "architectures": ["LlavaLlamaForCausalLM"],
      "model_type": "llava",
      "vocab_size": lm_cfg.vocab_size,
      "hidden_size": lm_cfg.hidden_size,
      "intermediate_size": lm_cfg.intermediate_size,
      "num_hidden_layers": lm_cfg.num_hidden_layers,
      "num_attention_heads": lm_cfg.num_attention_heads,
      "num_key_value_heads": lm_cfg.num_key_value_heads,
      "hidden_act": "silu",
      "max_position_embeddings": lm_cfg.max_position_embeddings,
      "rms_norm_eps": lm_cfg.rms_norm_eps,
      "rope_scaling": None,
      "rope_theta": 10000.0,
      "tie_word_embeddings": False,
      "pad_token_id": 0,
      "bos_token_id": 1,
      "eos_token_id": 2,
      "mm_vision_tower": tower,
      "mm_hidden_size": 64,
      "mm_vision_select_layer": -2,
      "mm_vision_select_feature": "patch",
      "mm_projector_type": "mlp2x_gelu",
      "image_aspect_ratio": "pad",
      "mm_use_im_start_end": False,
      "mm_use_im_patch_token": False,
      "use_mm_proj": True,
      **mm,
  }


def _projector(kind: str, seed: int) -> dict:
  rng = np.random.default_rng(seed)
  w = lambda *s: (0.1 * rng.normal(size=s)).astype(np.float32)
  if kind == "linear":
    return {"mm_projector.weight": w(LLM_WIDTH, 64), "mm_projector.bias": w(LLM_WIDTH)}
  return {
      "mm_projector.0.weight": w(LLM_WIDTH, 64),
      "mm_projector.0.bias": w(LLM_WIDTH),
      "mm_projector.2.weight": w(LLM_WIDTH, LLM_WIDTH),
      "mm_projector.2.bias": w(LLM_WIDTH),
  }


def _write_original(path, config: dict, lm, proj: dict, tower=None):
  """An original-LLaVA directory: LLM keys as LlamaForCausalLM names them (model.*, lm_head),
  ``model.mm_projector…`` and optionally the tower under model.vision_tower.vision_tower."""
  path.mkdir(parents=True, exist_ok=True)
  tensors = {k: _np(v) for k, v in lm.state_dict().items()}
  # transformers 4.31 saved RoPE buffers with the weights; they must be ignored.
  tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(6, np.float32)
  tensors.update({"model." + k: v for k, v in proj.items()})
  if tower is not None:
    # LLaVA's CLIPVisionTower wraps a transformers-4.x CLIPVisionModel (``vision_model.``).
    tensors.update({"model.vision_tower.vision_tower.vision_model." + k: _np(v) for k, v in tower.state_dict().items()})
  save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
  (path / "config.json").write_text(json.dumps(config))
  return str(path)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
  clip = tiny_hf.randomize_(tf.CLIPVisionModel(tiny_hf.clip_vision_config()), seed=1)
  clip_dir = tmp_path_factory.mktemp("clip")
  clip.save_pretrained(clip_dir)
  lm = tiny_hf.causal_lm("llama", seed=2, hidden_size=LLM_WIDTH)
  return clip, str(clip_dir), lm


def _hf_llava(clip, lm, proj: dict) -> tf.LlavaForConditionalGeneration:
  cfg = tf.LlavaConfig(
      vision_config=tiny_hf.clip_vision_config(),
      text_config=tiny_hf.text_config("llama", hidden_size=LLM_WIDTH),
      image_token_index=HF_IMAGE_TOKEN,
      vision_feature_layer=-2,
      vision_feature_select_strategy="default",
  )
  model = tf.LlavaForConditionalGeneration(cfg).eval()
  sd = {"model.vision_tower." + k: v for k, v in clip.state_dict().items()}
  sd.update(
      {"model.language_model." + k[len("model.") :]: v for k, v in lm.state_dict().items() if k.startswith("model.")}
  )
  sd["lm_head.weight"] = lm.state_dict()["lm_head.weight"]
  for i, n in ((0, "linear_1"), (2, "linear_2")):
    for leaf in ("weight", "bias"):
      sd[f"model.multi_modal_projector.{n}.{leaf}"] = torch.from_numpy(proj[f"mm_projector.{i}.{leaf}"])
  model.load_state_dict(sd, strict=True)
  return model


def _original_ids(seed: int) -> list[list[int]]:
  rng = np.random.default_rng(seed)
  return [[1, *rng.integers(3, 120, 3), IMAGE_TOKEN_INDEX, *rng.integers(3, 120, 5)] for _ in range(2)]


def _compare_with_hf(cfg, params, hf_model, seed=0) -> float:
  ids = np.array([expand_image_placeholders(r, cfg) for r in _original_ids(seed)], np.int32)
  assert (ids == cfg.image_token_id).sum() == 2 * cfg.num_image_tokens
  px = tiny_hf.random_pixels(2, seed=seed + 10)
  hf_ids = np.where(ids == cfg.image_token_id, HF_IMAGE_TOKEN, ids)
  with torch.no_grad():
    ref = hf_model(input_ids=torch.from_numpy(hf_ids).long(), pixel_values=tiny_hf.to_torch_pixels(px)).logits.numpy()
  out = np.asarray(Llava(cfg).apply({"params": params}, ids, px))
  return float(np.abs(out - ref).max())


@pytest.mark.parametrize("overrides", [{}, {"scan": True}], ids=["layers", "scan"])
def test_mlp2x_matches_hf_llava(parts, tmp_path, overrides):
  clip, clip_dir, lm = parts
  proj = _projector("mlp2x_gelu", seed=3)
  path = _write_original(tmp_path / "llava", _original_config(lm.config, clip_dir), lm, proj)
  cfg, params = load_llava_original(path, vision_overrides=overrides, llm_overrides=overrides)
  assert cfg.image_token_id == lm.config.vocab_size == 128
  assert (cfg.vision.select_layer, cfg.vision.select_feature) == (-2, "patch")
  assert cfg.projector.kind == "mlp2x_gelu" and cfg.num_image_tokens == 16
  err = _compare_with_hf(cfg, params, _hf_llava(clip, lm, proj))
  print(f"original LLaVA mlp2x_gelu {overrides}: max |logit diff| = {err:.2e}")
  assert err < 1e-4


def test_explicit_tower_path_and_embedded_tower(parts, tmp_path):
  clip, clip_dir, lm = parts
  proj = _projector("mlp2x_gelu", seed=4)
  # mm_vision_tower names the hub model; the tower comes from vision_tower_path.
  config = _original_config(lm.config, "openai/clip-vit-large-patch14-336")
  path = _write_original(tmp_path / "plain", config, lm, proj)
  cfg, params = load_llava_original(path, vision_tower_path=clip_dir)
  assert _compare_with_hf(cfg, params, _hf_llava(clip, lm, proj), seed=1) < 1e-4
  # Tuned tower weights inside the checkpoint win over the directory's.
  tuned = tiny_hf.randomize_(tf.CLIPVisionModel(tiny_hf.clip_vision_config()), seed=5)
  path = _write_original(tmp_path / "tuned", config, lm, proj, tower=tuned)
  cfg, params = load_llava_original(path, vision_tower_path=clip_dir)
  err = _compare_with_hf(cfg, params, _hf_llava(tuned, lm, proj), seed=2)
  print(f"original LLaVA with embedded tower: max |logit diff| = {err:.2e}")
  assert err < 1e-4
  # Embedded weights but an unknown, non-local tower name: the architecture is unknown.
  config = _original_config(lm.config, "someone/unknown-clip")
  path = _write_original(tmp_path / "unknown", config, lm, proj, tower=tuned)
  with pytest.raises(FileNotFoundError, match="vision_tower_path"):
    load_llava_original(path)


def test_missing_tower_is_a_clear_error(parts, tmp_path):
  _, _, lm = parts
  config = _original_config(lm.config, "openai/clip-vit-large-patch14-336")
  path = _write_original(tmp_path / "llava", config, lm, _projector("mlp2x_gelu", 3))
  with pytest.raises(
      FileNotFoundError, match="'openai/clip-vit-large-patch14-336'.*not a local directory.*vision_tower_path"
  ):
    load_llava_original(path)


def test_linear_projector_cls_patch(parts, tmp_path):
  clip, clip_dir, lm = parts
  proj = _projector("linear", seed=6)
  config = _original_config(
      lm.config, clip_dir, mm_projector_type="linear", mm_vision_select_feature="cls_patch", mm_vision_select_layer=-1
  )
  path = _write_original(tmp_path / "llava", config, lm, proj)
  cfg, params = load_llava_original(path)
  assert cfg.projector.kind == "linear" and cfg.num_image_tokens == 17
  px = tiny_hf.random_pixels(2, seed=7)
  with torch.no_grad():
    hs = clip(pixel_values=tiny_hf.to_torch_pixels(px), output_hidden_states=True).hidden_states
  ref = _np(hs[-1]) @ proj["mm_projector.weight"].T + proj["mm_projector.bias"]
  feats = np.asarray(Llava(cfg).apply({"params": params}, px, method="embed_image"))
  assert np.abs(feats - ref).max() < 1e-4
  ids = np.array([expand_image_placeholders(r, cfg) for r in _original_ids(3)], np.int32)
  logits = np.asarray(Llava(cfg).apply({"params": params}, ids, px))
  assert logits.shape == (2, ids.shape[1], 128) and np.isfinite(logits).all()


def test_unexpected_key_and_anyres_are_errors(parts, tmp_path):
  _, clip_dir, lm = parts
  proj = _projector("mlp2x_gelu", 3)
  proj_extra = {**proj, "mm_projector.4.weight": np.zeros((LLM_WIDTH, LLM_WIDTH), np.float32)}
  path = _write_original(tmp_path / "mlp3x", _original_config(lm.config, clip_dir), lm, proj_extra)
  with pytest.raises(KeyError, match="mm_projector.4.weight"):
    load_llava_original(path)
  path = _write_original(
      tmp_path / "next",
      _original_config(lm.config, clip_dir, image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad"),
      lm,
      proj,
  )
  with pytest.raises(ValueError, match="anyres"):
    load_llava_original(path)


@pytest.mark.parametrize("prefix", ["model.", ""])
def test_stage1_projector(tmp_path, prefix):
  proj = _projector("mlp2x_gelu", seed=8)
  file = str(tmp_path / "mm_projector.safetensors")
  save_file({prefix + k: v for k, v in proj.items()}, file)
  cfg, params = load_llava_projector(file)
  assert (cfg.kind, cfg.in_dim, cfg.out_dim) == ("mlp2x_gelu", 64, LLM_WIDTH)
  x = np.random.default_rng(0).normal(size=(2, 5, 64)).astype(np.float32)
  ref = torch.nn.Sequential(torch.nn.Linear(64, LLM_WIDTH), torch.nn.GELU(), torch.nn.Linear(LLM_WIDTH, LLM_WIDTH))
  ref.load_state_dict({k[len("mm_projector.") :]: torch.from_numpy(v) for k, v in proj.items()})
  with torch.no_grad():
    want = ref(torch.from_numpy(x)).numpy()
  got = np.asarray(Projector(cfg).apply({"params": params}, x))
  assert np.abs(got - want).max() < 1e-5
  save_file({"mm_projector.weight": proj["mm_projector.0.weight"]}, file)
  cfg, params = load_llava_projector(file)
  assert cfg.kind == "linear" and not cfg.bias
  np.testing.assert_array_equal(params["linear_1"]["kernel"], proj["mm_projector.0.weight"].T)


def test_prompt_options_and_placeholders(parts, tmp_path):
  _, clip_dir, lm = parts
  d = _original_config(lm.config, clip_dir)
  assert prompt_options(d) == {
      "image_aspect_ratio": "pad",
      "mm_use_im_start_end": False,
      "mm_use_im_patch_token": False,
      "image_token_index": -200,
  }
  path = _write_original(tmp_path / "llava", d, lm, _projector("mlp2x_gelu", 3))
  cfg, _ = load_llava_original(path)
  ids = expand_image_placeholders([1, 5, IMAGE_TOKEN_INDEX, 7, IMAGE_TOKEN_INDEX], cfg)
  assert ids == [1, 5] + [128] * 16 + [7] + [128] * 16
