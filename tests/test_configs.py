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
