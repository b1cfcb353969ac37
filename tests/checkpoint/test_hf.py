"""HF LLaVA converter: round trip through transformers, both key layouts, sharded
directories, and key-coverage errors."""

import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers as tf

import tiny_hf
from llava_jax.checkpoint.convert import common
from llava_jax.checkpoint.convert.hf import load_hf_llava, save_hf_llava
from llava_jax.models import Llava, init_params, llava_config


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  model = tiny_hf.llava("clip", "llama", seed=21)
  path = tmp_path_factory.mktemp("hf_llava")
  model.save_pretrained(path)
  return model, str(path)


def _inputs(cfg):
  n = cfg.num_image_tokens
  ids = np.array([[3] + [cfg.image_token_id] * n + [5, 6, 7]], np.int32)
  return ids, tiny_hf.random_pixels(1, seed=9)


def _hf_logits(model, ids, px):
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(ids).long(), pixel_values=tiny_hf.to_torch_pixels(px)).logits.numpy()


@pytest.mark.parametrize("vision,llm,scan", [("clip-tiny", "tiny", True), ("siglip-tiny", "tiny", False)])
def test_save_loads_in_transformers_with_same_logits(tmp_path, vision, llm, scan):
  import dataclasses
  from llava_jax.models.configs import LLM_VARIANTS

  cfg = llava_config(vision, dataclasses.replace(LLM_VARIANTS[llm], scan=scan))
  params = jax.tree.map(np.asarray, init_params(cfg, jax.random.key(1)))
  # Non-trivial norms and biases so a dropped or transposed one shows up.
  params = jax.tree_util.tree_map_with_path(
      lambda p, a: a + 0.1 * np.random.default_rng(len(str(p))).normal(size=a.shape).astype(a.dtype), params
  )
  save_hf_llava(cfg, params, str(tmp_path))
  model, info = tf.LlavaForConditionalGeneration.from_pretrained(str(tmp_path), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  ids, px = _inputs(cfg)
  ours = np.asarray(Llava(cfg).apply({"params": params}, ids, px))
  assert np.abs(ours - _hf_logits(model.eval(), ids, px)).max() < 1e-4
  cfg2, params2 = load_hf_llava(str(tmp_path), llm_overrides={"scan": scan})
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_both_key_layouts_and_vision_model_prefix(hf_dir, tmp_path):
  model, path = hf_dir
  cfg, params = load_hf_llava(path)
  tensors = common.read_checkpoint_dir(path)
  assert any(k.startswith("language_model.model.") for k in tensors)  # transformers' save layout
  renames = [
      ("vision_tower.", "model.vision_tower.vision_model."),
      ("multi_modal_projector.", "model.multi_modal_projector."),
      ("language_model.model.", "model.language_model."),
      ("language_model.lm_head.", "lm_head."),
  ]

  def rename(k):
    for old, new in renames:
      if k.startswith(old):
        return new + k[len(old) :]
    return k

  common.write_safetensors_dir({rename(k): np.asarray(v) for k, v in tensors.items()}, str(tmp_path))
  (tmp_path / "config.json").write_text(open(os.path.join(path, "config.json")).read())
  cfg2, params2 = load_hf_llava(str(tmp_path))
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)
  ids, px = _inputs(cfg)
  assert np.abs(np.asarray(Llava(cfg).apply({"params": params2}, ids, px)) - _hf_logits(model, ids, px)).max() < 1e-4


def test_sharded_directories(hf_dir, tmp_path):
  model, path = hf_dir
  cfg, params = load_hf_llava(path)
  model.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
  assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
  _, from_hf = load_hf_llava(str(tmp_path / "hf"))
  jax.tree.map(np.testing.assert_array_equal, from_hf, params)
  save_hf_llava(cfg, params, str(tmp_path / "ours"), max_shard_bytes=100_000)
  index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1
  reloaded = tf.LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "ours")).eval()
  ids, px = _inputs(cfg)
  assert np.abs(_hf_logits(reloaded, ids, px) - _hf_logits(model, ids, px)).max() < 1e-5


def _rewrite(path, dst, edit):
  tensors = {k: np.asarray(v) for k, v in common.read_checkpoint_dir(path).items()}
  edit(tensors)
  common.write_safetensors_dir(tensors, dst)
  with open(os.path.join(path, "config.json")) as f:
    open(os.path.join(dst, "config.json"), "w").write(f.read())


def test_unknown_key_is_an_error_listing_it(hf_dir, tmp_path):
  _, path = hf_dir
  _rewrite(path, str(tmp_path), lambda t: t.update({"language_model.model.extra_adapter.weight": np.ones(3)}))
  with pytest.raises(KeyError, match="unexpected \\(1\\).*extra_adapter"):
    load_hf_llava(str(tmp_path))


def test_missing_key_is_an_error_listing_it(hf_dir, tmp_path):
  _, path = hf_dir
  _rewrite(path, str(tmp_path), lambda t: t.pop("language_model.model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(KeyError, match="missing \\(1\\).*layers.1.mlp.up_proj"):
    load_hf_llava(str(tmp_path))


def test_wrong_shape_is_an_error(hf_dir, tmp_path):
  _, path = hf_dir

  def shrink(t):
    t["multi_modal_projector.linear_2.bias"] = t["multi_modal_projector.linear_2.bias"][:-1]

  _rewrite(path, str(tmp_path), shrink)
  with pytest.raises(ValueError, match="shape mismatches.*projector/linear_2/bias"):
    load_hf_llava(str(tmp_path))


def test_no_safetensors_is_a_clear_error(tmp_path):
  (tmp_path / "config.json").write_text("{}")
  (tmp_path / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match="no .safetensors weights.*pytorch_model.bin"):
    common.read_checkpoint_dir(str(tmp_path))


def test_old_buffers_are_skipped(hf_dir, tmp_path):
  """Older transformers saved position_ids / inv_freq buffers with the weights."""
  _, path = hf_dir
  cfg, params = load_hf_llava(path)
  _rewrite(
      path,
      str(tmp_path),
      lambda t: t.update(
          {
              "vision_tower.embeddings.position_ids": np.arange(17)[None],
              "language_model.model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32),
          }
      ),
  )
  _, params2 = load_hf_llava(str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, params2, params)
