"""Every config file builds, names real variants, and its sweep yields valid overrides."""

import glob
import importlib.util
import os

import pytest

from llava_jax.models.configs import LLM_VARIANTS, VISION_VARIANTS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = sorted(f for f in glob.glob(f"{ROOT}/configs/*.py"))


def _load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_config_and_sweep(path):
  mod = _load(path)
  first_line = open(path).read().split("\n")[2]
  assert "python -m llava_jax.train --config=configs/" in first_line  # starts with its command
  c = mod.get_config()
  assert c.model.vision in VISION_VARIANTS and c.model.llm in LLM_VARIANTS
  assert c.train.steps > 0 and c.train.batch_size > 0 and c.optim.lr > 0
  for override in mod.sweep():
    for key in override:
      node = c
      for part in key.split(".")[:-1]:
        node = node[part]
      assert key.split(".")[-1] in node, key


def test_llava15_hyperparameters():
  s1, s2 = (
      _load(f"{ROOT}/configs/llava15_stage1.py").get_config(),
      _load(f"{ROOT}/configs/llava15_stage2.py").get_config(),
  )
  assert (s1.optim.lr, s1.train.batch_size, s1.data.max_len, s1.data.template) == (1e-3, 256, 2048, "plain")
  assert (s2.optim.lr, s2.train.batch_size, s2.data.template) == (2e-5, 128, "vicuna_v1")
  assert s1.optim.warmup_ratio == s2.optim.warmup_ratio == 0.03
  assert [r for r, _ in s1.optim.lr_rules] == [r"projector/.*"]
  assert [r for r, _ in s2.optim.lr_rules] == [r"projector/.*", r"llm/.*"]


def _lr_multipliers(c):
  """Learning-rate multiplier per top-level param group ("frozen" if none), by the config's rules."""
  import numpy as np

  from llava_jax.train import optim, setup

  leaf = np.zeros(1)
  groups = {"img": {"w": leaf}, "projector": {"w": leaf}, "llm": {"w": leaf}, "image_newline": leaf}
  labels = optim.lr_labels(groups, setup.optim_config(c))
  return {g: (v if isinstance(v, str) else v["w"]) for g, v in labels.items()}


def test_llava_next_recipe():
  from llava_jax.train.setup import model_config

  mod = _load(f"{ROOT}/configs/llava_next.py")
  c = mod.get_config()
  assert (c.model.vision, c.model.llm, c.data.template) == ("clip-L/14-336", "vicuna-7b", "vicuna_v1@llava_next")
  assert (c.optim.lr, c.train.batch_size, c.data.max_len, c.optim.warmup_ratio) == (2e-5, 128, 4096, 0.03)
  assert c.train.steps == -(-779_289 // 128) == 6089  # one epoch of LLaVA-NeXT-Data
  assert c.init.from_run_params == r"projector/.*"
  # vision tower at 2e-6, everything else (image_newline included) at 2e-5
  assert _lr_multipliers(c) == {"img": "lr=0.1", "projector": "lr=1", "llm": "lr=1", "image_newline": "lr=1"}
  cfg = model_config(c)  # no tokenizer: what llava_jax.compile builds
  assert cfg.anyres and cfg.vision_aspect_ratio is None  # spatial_unpad, no shrink
  assert (cfg.tiles_per_image, cfg.image_token_budget) == (5, 2928)  # base + 2x2; 576 + 48 * 49
  assert (cfg.vision.select_layer, cfg.vision.num_features) == (-2, 576)
  m = mod.get_config("llm=mistral-7b")
  assert m.data.template == "mistral_instruct@llava_next"
  mc = model_config(m)
  assert (mc.llm.rope_theta, mc.llm.sliding_window) == (1e6, None)  # Mistral-7B-Instruct-v0.2
  with pytest.raises(ValueError, match="llm='llama3-8b'"):
    mod.get_config("llm=llama3-8b")


def test_llava_onevision_recipe():
  from llava_jax.train.setup import model_config

  mod = _load(f"{ROOT}/configs/llava_onevision.py")
  c = mod.get_config()
  assert (c.model.vision, c.model.llm, c.data.template) == ("siglip-So400m/14-384", "qwen2-7b", "chatml_llava_next")
  assert (c.optim.lr, c.train.batch_size, c.optim.warmup_ratio) == (1e-5, 256, 0.03)
  assert c.data.over_budget == "downscale"
  assert _lr_multipliers(c) == {"img": "lr=0.2", "projector": "lr=1", "llm": "lr=1", "image_newline": "lr=1"}
  cfg = model_config(c)
  assert cfg.vision_aspect_ratio == "anyres_max_9" and len(cfg.image_grid_pinpoints) == 36  # 1x1 .. 6x6
  assert (cfg.tiles_per_image, cfg.image_token_budget) == (10, 7371)  # 3x3 + base; grids within 10 tiles
  assert c.data.max_len > cfg.image_token_budget
  # HF's OneVision tower: 26 of So400m's 27 layers, the last one's output, no class token
  assert (cfg.vision.select_layer, cfg.vision.num_layers_used, cfg.vision.num_features) == (-2, 26, 729)
  assert mod.get_config("stage=si,mid=/runs/mid").init.from_run_params == ".*"
  # The OneVision stage: from the si run, multi-image slots and one 32-frame video slot.
  ov = mod.get_config("stage=ov,si=/runs/si")
  assert (ov.init.from_run, ov.init.from_run_params, ov.optim.lr) == ("/runs/si", ".*", 1e-5)
  assert (ov.data.max_images, ov.data.video_frames, ov.data.max_videos) == (3, 32, 1)
  assert ov.data.train.endswith("llava_onevision_ov.json") and ov.train.steps == -(-1_600_000 // 256)
  ov_cfg = model_config(ov)
  from llava_jax.models.video import num_video_tokens

  assert (ov_cfg.video_pooling, ov_cfg.video_pool_stride) == ("bilinear", 2)
  assert num_video_tokens(ov_cfg, 32) == 32 * 14 * 14 + 1  # 196 per frame + one newline
  assert ov_cfg.video_token_id not in (None, ov_cfg.image_token_id)
  with pytest.raises(ValueError, match="si="):
    mod.get_config("stage=ov,mid=/runs/mid")
  with pytest.raises(ValueError, match="stage="):
    mod.get_config("stage=xx")
