"""CLIP / SigLIP vision tower parity with HF PyTorch, through ``load_hf_vision``."""

import jax
import numpy as np
import pytest
import torch
import transformers as tf

import tiny_hf
from llava_jax.checkpoint.convert.hf import load_hf_vision
from llava_jax.models.vit import EncoderLayer, VisionTransformer


@pytest.fixture(scope="module", params=["clip", "siglip"])
def hf_tower(request, tmp_path_factory):
  if request.param == "clip":
    model = tf.CLIPVisionModel(tiny_hf.clip_vision_config())
  else:
    model = tf.SiglipVisionModel(tiny_hf.siglip_vision_config())
  tiny_hf.randomize_(model, seed=3)
  path = tmp_path_factory.mktemp(request.param)
  model.save_pretrained(path)
  return request.param, model, str(path)


def _run_hf(model, px):
  with torch.no_grad():
    return model(pixel_values=tiny_hf.to_torch_pixels(px), output_hidden_states=True)


@pytest.mark.parametrize("scan", [False, True])
def test_tower_outputs(hf_tower, scan):
  kind, model, path = hf_tower
  cfg, params = load_hf_vision(path, scan=scan)
  px = tiny_hf.random_pixels(3, seed=4)
  ref = _run_hf(model, px)
  last, pooled = jax.jit(lambda p, x: VisionTransformer(cfg).apply({"params": p}, x, method="tower"))(params, px)
  err_last = np.abs(np.asarray(last) - ref.last_hidden_state.numpy()).max()
  err_pool = np.abs(np.asarray(pooled) - ref.pooler_output.numpy()).max()
  print(f"{kind} scan={scan}: last_hidden {err_last:.2e} pooled {err_pool:.2e}")
  assert err_last < 1e-4 and err_pool < 1e-4


def test_each_layer(hf_tower):
  kind, model, path = hf_tower
  cfg, params = load_hf_vision(path)
  px = tiny_hf.random_pixels(2, seed=5)
  hs = [h.numpy() for h in _run_hf(model, px).hidden_states]
  x0 = VisionTransformer(cfg).apply({"params": params}, px, method="embed")
  np.testing.assert_allclose(np.asarray(x0), hs[0], atol=1e-5, rtol=0)
  for i in range(cfg.depth):
    out, _ = EncoderLayer(cfg).apply({"params": params["encoder"][f"layers_{i}"]}, hs[i])
    err = np.abs(np.asarray(out) - hs[i + 1]).max()
    assert err < 1e-5, f"{kind} layer {i}: {err:.2e}"


@pytest.mark.parametrize("select_layer", [-2, -1, 1])
def test_select_layer_computes_only_needed_layers(hf_tower, select_layer):
  kind, model, path = hf_tower
  feature = "patch" if kind == "clip" else "cls_patch"
  cfg, params = load_hf_vision(path, select_layer=select_layer, select_feature=feature, scan=True)
  px = tiny_hf.random_pixels(2, seed=6)
  want = _run_hf(model, px).hidden_states[select_layer].numpy()
  if kind == "clip":
    want = want[:, 1:]
  fn = lambda p: VisionTransformer(cfg).apply({"params": p}, px)
  got = np.asarray(fn(params))
  assert got.shape == want.shape == (2, cfg.num_features, cfg.width)
  assert np.abs(got - want).max() < 1e-4
  # Layers past the selected one are never run: their gradient is exactly zero, and the
  # compiled program has no FLOPs for them.
  grads = jax.grad(lambda p: fn(p).sum())(params)
  g = np.asarray(grads["encoder"]["layers"]["mlp"]["fc1"]["kernel"])
  used = cfg.num_layers_used
  assert np.all(g[used:] == 0) and np.all(np.abs(g[:used]).sum(axis=(1, 2)) > 0)


def test_cls_patch_keeps_class_token(hf_tower):
  kind, model, path = hf_tower
  px = tiny_hf.random_pixels(1, seed=7)
  cfg, params = load_hf_vision(path, select_layer=-2, select_feature="cls_patch")
  got = np.asarray(VisionTransformer(cfg).apply({"params": params}, px))
  want = _run_hf(model, px).hidden_states[-2].numpy()
  assert got.shape == want.shape and np.abs(got - want).max() < 1e-4
  patch_cfg, _ = load_hf_vision(path, select_layer=-2, select_feature="patch")
  patch = np.asarray(VisionTransformer(patch_cfg).apply({"params": params}, px))
  if kind == "clip":  # "patch" drops exactly the class token
    np.testing.assert_array_equal(patch, got[:, 1:])
  else:  # SigLIP has no class token: both selections are every patch token
    np.testing.assert_array_equal(patch, got)


def test_wrong_image_size_is_a_clear_error(hf_tower):
  _, _, path = hf_tower
  cfg, params = load_hf_vision(path)
  with pytest.raises(ValueError, match="expected \\[B, 28, 28, 3\\]"):
    VisionTransformer(cfg).apply({"params": params}, np.zeros((1, 3, 28, 28), np.float32))
