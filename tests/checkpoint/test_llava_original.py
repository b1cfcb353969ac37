"""Original LLaVA checkpoints, checked against HF built from the same weights (float32,
whole model 1e-4, projector alone 1e-5): haotian-liu/LLaVA 1.5 against
LlavaForConditionalGeneration, LLaVA-NeXT (CLIP+Llama, anyres) and lmms-lab OneVision
(SigLIP+Qwen2, anyres_max_1 so the shrink runs) written in the LLaVA-NeXT repository's
layout against ``tests/models/test_llava_next.py``'s tiny LlavaNext / LlavaOnevision
models (imported, not copied), on wide, tall and small images."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
import transformers as tf
from PIL import Image
from safetensors.numpy import save_file

import sibling
import tiny_hf
from llava_jax.checkpoint.convert import hf
from llava_jax.checkpoint.convert import llava_original
from llava_jax.checkpoint.convert.llava_original import (
    IMAGE_TOKEN_INDEX,
    KNOWN_TOWERS,
    anyres_options,
    expand_image_placeholders,
    load_llava_original,
    load_llava_projector,
    prompt_options,
)
from llava_jax.data import anyres as data_anyres
from llava_jax.models import anyres
from llava_jax.models.configs import VISION_VARIANTS
from llava_jax.models.llava import Llava
from llava_jax.models.projector import Projector

llava_next = sibling.load("tests/models/test_llava_next.py")

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


def test_unexpected_key_is_an_error(parts, tmp_path):
  _, clip_dir, lm = parts
  proj = _projector("mlp2x_gelu", 3)
  proj_extra = {**proj, "mm_projector.4.weight": np.zeros((LLM_WIDTH, LLM_WIDTH), np.float32)}
  path = _write_original(tmp_path / "mlp3x", _original_config(lm.config, clip_dir), lm, proj_extra)
  with pytest.raises(KeyError, match="mm_projector.4.weight"):
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


# ----------------------------------------------------------------------------- LLaVA-NeXT / OneVision

# OneVision's pinpoints as a range string: every grid from 1x1 to 2x2 tiles of 28 px. The
# original reads pairs as [width, height], so ours (height, width) are the transposes, in
# the original order.
OV_RANGE = "(1x1),...,(2x2)"
OV_PINPOINTS = ((28, 28), (56, 28), (28, 56), (56, 56))


def _original_anyres_tensors(model, family: str, tower: bool = True) -> dict[str, np.ndarray]:
  """A HF LlavaNext / LlavaOnevision model's weights in the LLaVA-NeXT repository's layout:
  the LLM as its causal LM names it, ``mm_projector.0/.2``, ``image_newline`` and the tower
  under ``model.vision_tower.vision_tower.vision_model.`` (SigLIP without its head: the
  original's SigLipVisionTower replaces it by an Identity and deletes the last layer,
  which HF's 3-layer tower here already lacks)."""
  out = {}
  tied = model.config.text_config.tie_word_embeddings
  for k, v in model.state_dict().items():
    if k.startswith("model.language_model."):
      out["model." + k[len("model.language_model.") :]] = _np(v)
    elif k == "lm_head.weight":
      if not tied:
        out[k] = _np(v)
    elif k.startswith("model.multi_modal_projector."):
      rest = k[len("model.multi_modal_projector.") :]
      out["model.mm_projector." + rest.replace("linear_1.", "0.").replace("linear_2.", "2.")] = _np(v)
    elif k == "model.image_newline":
      out[k] = _np(v)
    elif k.startswith("model.vision_tower."):
      rest = k[len("model.vision_tower.") :]
      if tower and not (family == "llava_onevision" and rest.startswith("head.")):
        out["model.vision_tower.vision_tower.vision_model." + rest] = _np(v)
    else:
      raise AssertionError(f"unexpected HF key {k}")
  return out


def _original_anyres_config(model, family: str, tower: str) -> dict:
  """config.json as the LLaVA-NeXT repository writes it for v1.6 (Llama) / OneVision (Qwen2)."""
  text = model.config.text_config
  if family == "llava_next":
    return _original_config(
        text,
        tower,
        image_aspect_ratio="anyres",
        mm_patch_merge_type="spatial_unpad",
        image_grid_pinpoints=[[w, h] for h, w in llava_next.PINPOINTS],  # [width, height]
    )
  return _original_config(
      text,
      tower,
      architectures=["LlavaQwenForCausalLM"],  # lmms-lab: model_type "llava", a Qwen2 LLM
      tie_word_embeddings=True,
      use_sliding_window=False,
      image_aspect_ratio="anyres_max_1",
      mm_patch_merge_type="spatial_unpad",
      image_grid_pinpoints=OV_RANGE,
      mm_vision_select_layer=-2,  # as OneVision's config; its SigLIP tower does not read it
      mm_vision_select_feature="patch",
      mm_spatial_pool_mode="bilinear",  # video settings: a newline per grid row is not implemented,
      mm_spatial_pool_stride=2,  # so this model takes no video (test_llava_original_video.py: one_token)
      mm_newline_position="grid",
  )


@pytest.fixture(scope="module", params=["llava_next", "llava_onevision"])
def anyres_original(request, tmp_path_factory):
  """(family, HF model, image config, original checkpoint dir, tower dir, LlavaConfig, params)."""
  family = request.param
  model, _, image_cfg = llava_next._hf_model(family)
  tiny_hf.randomize_(model, seed=11)
  root = tmp_path_factory.mktemp(family)
  tower_dir = root / "tower"  # the hub tower's config.json: the architecture, not the weights
  if family == "llava_next":
    tiny_hf.clip_vision_config().save_pretrained(tower_dir)
    hub = "openai/clip-vit-large-patch14-336"
  else:
    full = tiny_hf.siglip_vision_config()
    full.num_hidden_layers = 4  # the original deletes the last one: HF's 3-layer tower
    full.save_pretrained(tower_dir)
    hub = "google/siglip-so400m-patch14-384"
    model.config.image_grid_pinpoints = [list(p) for p in OV_PINPOINTS]  # what OV_RANGE means
  path = root / "original"
  path.mkdir()
  save_file(_original_anyres_tensors(model, family), str(path / "model.safetensors"), metadata={"format": "pt"})
  (path / "config.json").write_text(json.dumps(_original_anyres_config(model, family, hub)))
  cfg, params = load_llava_original(str(path), vision_tower_path=str(tower_dir))
  return family, model, image_cfg, str(path), str(tower_dir), cfg, params


def _anyres_err(model, image_cfg, cfg, params, seed=0) -> tuple[float, list[int]]:
  """Max |logit diff| vs HF on a wide, a tall and a small image (within one tile: its grid
  is the first smallest pinpoint, so the pinpoints' order counts), one row each, ids
  written the original way (one -200 per image) and expanded by ``expand_image_placeholders``."""
  rng = np.random.default_rng(seed)
  small = Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))
  imgs = llava_next._images(seed) + [small]
  tiles = [data_anyres.preprocess_anyres(x, image_cfg, cfg.image_grid_pinpoints) for x in imgs]
  px = np.stack([data_anyres.pad_tiles(t, cfg.tiles_per_image) for t, _ in tiles])
  sizes = np.array([s for _, s in tiles])
  layout = anyres.image_layout(sizes, cfg)
  rows = [
      expand_image_placeholders([1, *rng.integers(3, 120, 2), IMAGE_TOKEN_INDEX, *rng.integers(3, 120, 3)], cfg, [s])
      for s in sizes
  ]
  assert [r.count(cfg.image_token_id) for r in rows] == layout.num_tokens.tolist()
  ids = np.zeros((len(rows), max(map(len, rows))), np.int32)
  mask = np.zeros_like(ids)
  for i, r in enumerate(rows):
    ids[i, : len(r)], mask[i, : len(r)] = r, 1
  hf_ids = np.where(ids == cfg.image_token_id, HF_IMAGE_TOKEN, ids)
  with torch.no_grad():
    ref = model(
        input_ids=torch.from_numpy(hf_ids).long(),
        attention_mask=torch.from_numpy(mask).long(),
        pixel_values=torch.from_numpy(px.transpose(0, 1, 4, 2, 3).copy()),  # HF takes the first tiles per size
        image_sizes=torch.from_numpy(sizes),
    ).logits.numpy()  # HF raises if the placeholder counts differ from its packed features
  out = np.asarray(llava_next._forward(cfg)(params, ids, px, mask, layout))
  valid = mask.astype(bool)
  return float(np.abs(out[valid] - ref[valid]).max()), layout.num_tokens.tolist()


def test_anyres_config_and_params(anyres_original):
  family, model, _, _, _, cfg, params = anyres_original
  np.testing.assert_array_equal(params["image_newline"], model.model.image_newline.detach().numpy())
  if family == "llava_next":
    assert cfg.image_grid_pinpoints == tuple(map(tuple, llava_next.PINPOINTS)) and cfg.vision_aspect_ratio is None
    assert (cfg.vision.kind, cfg.vision.depth, cfg.vision.select_layer, cfg.vision.select_feature) == (
        "clip",
        3,
        -2,
        "patch",
    )
    assert not cfg.llm.qkv_bias and not cfg.llm.tie_embeddings
  else:
    assert cfg.image_grid_pinpoints == OV_PINPOINTS and cfg.vision_aspect_ratio == "anyres_max_1"
    # SigLipVisionTower: 4 - 1 layers, no head, every token of the last one.
    assert (cfg.vision.kind, cfg.vision.depth, cfg.vision.head, cfg.vision.select_layer) == ("siglip", 3, False, -1)
    assert cfg.llm.qkv_bias and cfg.llm.tie_embeddings  # Qwen2 from architectures
    assert "head" not in params["img"]
  assert cfg.video_token_id is None and cfg.image_token_id == cfg.llm.vocab_size == 128
  # The model transformers' converter gives (whose OneVision tower keeps an unused head).
  ref = hf.llava_config_from_hf(model.config.to_dict())
  assert (cfg.llm, cfg.projector, cfg.image_grid_pinpoints) == (ref.llm, ref.projector, ref.image_grid_pinpoints)
  assert cfg.vision == dataclasses.replace(ref.vision, head=False)


def test_anyres_logits_match_hf(anyres_original):
  family, model, image_cfg, _, _, cfg, params = anyres_original
  err, tokens = _anyres_err(model, image_cfg, cfg, params)
  print(f"original {family} (anyres): tokens per image {tokens}, max |logit diff| = {err:.2e}")
  assert err < 1e-4


def test_siglip_tower_from_directory(anyres_original, tmp_path):
  """No tower in the checkpoint: the full hub tower (4 layers + head) is read from a
  directory and cut as the original cuts it."""
  family, model, image_cfg, path, _, _, _ = anyres_original
  if family != "llava_onevision":
    pytest.skip("the SigLIP tower is OneVision's")
  c4 = tiny_hf.siglip_vision_config()
  c4.num_hidden_layers = 4
  full = tiny_hf.randomize_(tf.SiglipVisionModel(c4), seed=12)  # layer 3 stays random: it must be dropped
  missing, unexpected = full.load_state_dict(model.model.vision_tower.state_dict(), strict=False)
  assert not unexpected and missing and all(k.startswith("encoder.layers.3.") for k in missing)
  full.save_pretrained(tmp_path / "siglip")
  plain = tmp_path / "plain"
  plain.mkdir()
  tensors = _original_anyres_tensors(model, family, tower=False)
  save_file(tensors, str(plain / "model.safetensors"), metadata={"format": "pt"})
  config = json.loads(open(os.path.join(path, "config.json")).read())
  (plain / "config.json").write_text(json.dumps({**config, "mm_vision_tower": str(tmp_path / "siglip")}))
  cfg, params = load_llava_original(str(plain))
  assert (cfg.vision.depth, cfg.vision.head) == (3, False)
  err, _ = _anyres_err(model, image_cfg, cfg, params, seed=1)
  print(f"original OneVision, SigLIP tower from a directory: max |logit diff| = {err:.2e}")
  assert err < 1e-4


def test_anyres_placeholders(anyres_original):
  family, _, _, _, _, cfg, _ = anyres_original
  wide, tall = llava_next.IMAGES
  n = [anyres.num_image_tokens(s, cfg) for s in (wide, tall)]
  ids = expand_image_placeholders([1, IMAGE_TOKEN_INDEX, 5, IMAGE_TOKEN_INDEX], cfg, [wide, tall])
  if family == "llava_onevision":  # two images in one sequence: OneVision's multi-image mode
    n = [anyres.num_image_tokens(s, cfg, square=True) for s in (wide, tall)]
    assert n == [cfg.vision.num_features + 1] * 2
  assert ids == [1] + [128] * n[0] + [5] + [128] * n[1]
  with pytest.raises(ValueError, match="one image size .* the ids have 1, image_sizes none"):
    expand_image_placeholders([1, IMAGE_TOKEN_INDEX], cfg)
  with pytest.raises(ValueError, match="the ids have 2, image_sizes 1"):
    expand_image_placeholders([IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX], cfg, [wide])


def test_real_onevision_and_next_configs():
  """Mapping of the real configs' fields: OneVision's 36 pinpoints (list or range string)
  and so400m tower as transformers' conversion has them; LLaVA-NeXT's pinpoints in the
  original order, which sends a small image to 2 rows x 1 column ([width 336, height 672])."""
  ov = {"image_aspect_ratio": "anyres_max_9", "mm_patch_merge_type": "spatial_unpad"}
  listed = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]  # as lmms-lab's config.json
  a = anyres_options({**ov, "image_grid_pinpoints": listed}, 384, "ov")
  b = anyres_options({**ov, "image_grid_pinpoints": "(1x1),...,(6x6)"}, 384, "ov")
  c = anyres_options({**ov, "image_grid_pinpoints": str(listed)}, 384, "ov")
  assert a == b == c and a["vision_aspect_ratio"] == "anyres_max_9"
  hf_points = hf.LLAVA_TYPES["llava_onevision"][1]["image_grid_pinpoints"]
  assert sorted(a["image_grid_pinpoints"]) == sorted(map(tuple, hf_points))
  so400m = llava_original._siglip_as_original(VISION_VARIANTS[KNOWN_TOWERS["google/siglip-so400m-patch14-384"]])
  hf_tower = {
      "model_type": "siglip_vision_model",
      "hidden_size": 1152,
      "intermediate_size": 4304,
      "num_hidden_layers": 26,
      "num_attention_heads": 16,
      "image_size": 384,
      "patch_size": 14,
      "vision_use_head": False,
  }
  assert so400m == hf.vision_config_from_hf(hf_tower, select_layer=-1, select_feature="cls_patch")
  assert so400m.num_features == 729
  nxt = {"image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad"}
  points = anyres_options(
      {**nxt, "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]}, 336, "next"
  )["image_grid_pinpoints"]
  assert points == ((672, 336), (336, 672), (672, 672), (336, 1008), (1008, 336))
  assert data_anyres.grid_shape((100, 100), points, 336) == (2, 1)
  assert data_anyres.grid_shape((400, 1000), points, 336) == (1, 3)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial"}, "mm_patch_merge_type 'spatial' is not"),
        ({"image_aspect_ratio": "anyres", "mm_patch_merge_type": "unires"}, "mm_patch_merge_type 'unires' is not"),
        ({"image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad_nobase"}, "'spatial_unpad_nobase'"),
        ({"image_aspect_ratio": "anyres"}, "image_aspect_ratio 'anyres' with mm_patch_merge_type 'flat'"),
        ({"image_aspect_ratio": "pad", "mm_patch_merge_type": "spatial_unpad"}, "'pad' with mm_patch_merge_type"),
        ({"image_aspect_ratio": "anyres_max_x", "mm_patch_merge_type": "spatial_unpad"}, "'anyres_max_x': expected"),
        ({"image_aspect_ratio": "highres"}, "image_aspect_ratio 'highres'"),
        (
            {
                "image_aspect_ratio": "anyres",
                "mm_patch_merge_type": "spatial_unpad",
                "image_grid_pinpoints": "(1x1),(2y2)",
            },
            r"image_grid_pinpoints '\(1x1\),\(2y2\)' is not a range",
        ),
        (
            {
                "image_aspect_ratio": "anyres",
                "mm_patch_merge_type": "spatial_unpad",
                "image_grid_pinpoints": "(3x3),(1x1)",
            },
            "holds no grid",
        ),
        (
            {
                "image_aspect_ratio": "anyres",
                "mm_patch_merge_type": "spatial_unpad",
                "image_grid_pinpoints": "[[28, 56",
            },
            "is not a list of pairs",
        ),
        (
            {"image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad", "image_grid_pinpoints": [[28]]},
            r"\[\[28\]\] is not a non-empty list of \[width, height\] pairs",
        ),
        ({"image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad"}, "no image_grid_pinpoints"),
    ],
)
def test_unsupported_anyres_configs_are_clear_errors(parts, tmp_path, fields, message):
  _, clip_dir, lm = parts
  path = _write_original(
      tmp_path / "llava", _original_config(lm.config, clip_dir, **fields), lm, _projector("mlp2x_gelu", 3)
  )
  with pytest.raises(ValueError, match=message) as err:
    load_llava_original(path)
  assert os.path.join(path, "config.json") in str(err.value)


def test_generate_cli_answers_from_an_original_anyres_checkpoint(anyres_original, tmp_path):
  """What a user types: ``python -m llava_jax.generate --checkpoint=<original LLaVA-NeXT /
  OneVision dir>``: it loads through load_llava_original (anyres), tiles the image and
  answers as ``load_model(...).answer`` does in process."""
  import shutil
  import subprocess
  import sys

  import tiny_checkpoint
  from PIL import Image

  from llava_jax.infer.loading import load_model
  from llava_jax.tokenizer import train_sentencepiece

  family, _, _, path, tower_dir, cfg, _ = anyres_original
  ckpt = tmp_path / "ckpt"
  shutil.copytree(path, ckpt)
  train_sentencepiece(tiny_checkpoint._sentences(), vocab_size=110).save(str(ckpt / "tokenizer.model"))
  config = json.loads((ckpt / "config.json").read_text())  # the tiny tower's architecture, as a local dir
  (ckpt / "config.json").write_text(json.dumps({**config, "mm_vision_tower": tower_dir}))
  image = tmp_path / "wide.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 100, 3), dtype=np.uint8)).save(image)
  loaded = load_model(str(ckpt), template="llava_v1")
  assert loaded.source == "llava_original" and loaded.cfg.anyres
  assert (loaded.cfg.vision, loaded.cfg.image_grid_pinpoints) == (cfg.vision, cfg.image_grid_pinpoints)
  want = loaded.answer([{"from": "human", "value": "<image>\nWhat is it?"}], Image.open(image), max_new_tokens=6)
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  out = subprocess.run(
      [sys.executable, "-m", "llava_jax.generate", f"--checkpoint={ckpt}", f"--image={image}"]
      + ["--prompt=What is it?", "--template=llava_v1", "--max_new_tokens=6"],
      cwd=root,
      env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"},
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().endswith(want.strip()), (out.stdout[-500:], want)
