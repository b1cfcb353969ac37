"""Whole-LLaVA parity with HF ``LlavaForConditionalGeneration`` (CLIP+Llama, SigLIP+Qwen2),
loaded through ``load_hf_llava`` from a saved directory, plus the merge contract."""

import jax
import numpy as np
import pytest
import torch

import tiny_hf
from llava_jax.checkpoint.convert.hf import load_hf_llava
from llava_jax.models import Llava

PAIRS = [("clip", "llama"), ("siglip", "qwen2")]


@pytest.fixture(scope="module", params=PAIRS, ids=lambda p: "+".join(p))
def hf_llava(request, tmp_path_factory):
  vision, family = request.param
  model = tiny_hf.llava(vision, family, seed=11)
  path = tmp_path_factory.mktemp(f"{vision}_{family}")
  model.save_pretrained(path)
  cfg, params = load_hf_llava(str(path))
  return model, cfg, params


def make_batch(cfg, seed=0):
  """3 rows: two images interleaved with text, text only, one image; right padding."""
  rng = np.random.default_rng(seed)
  n, img = cfg.num_image_tokens, cfg.image_token_id
  txt = lambda k: list(rng.integers(3, 100, size=k))
  rows = [txt(3) + [img] * n + txt(4) + [img] * n + txt(2), txt(9), txt(1) + [img] * n + txt(5)]
  t = max(map(len, rows))
  ids = np.zeros((3, t), np.int32)
  mask = np.zeros((3, t), np.int32)
  for i, r in enumerate(rows):
    ids[i, : len(r)], mask[i, : len(r)] = r, 1
  return ids, mask, tiny_hf.random_pixels(3, seed=seed)


def hf_logits(model, ids, mask, px):
  with torch.no_grad():
    return model(
        input_ids=torch.from_numpy(ids).long(),
        attention_mask=torch.from_numpy(mask).long(),
        pixel_values=tiny_hf.to_torch_pixels(px),
    ).logits.numpy()


def test_logits_match_hf(hf_llava):
  model, cfg, params = hf_llava
  ids, mask, px = make_batch(cfg)
  ref = hf_logits(model, ids, mask, px)
  out = np.asarray(jax.jit(lambda p, i, x, m: Llava(cfg).apply({"params": p}, i, x, m))(params, ids, px, mask))
  valid = mask.astype(bool)
  err = np.abs(out[valid] - ref[valid]).max()
  print(f"{cfg.vision.kind}+{cfg.llm.qkv_bias and 'qwen2' or 'llama'}: max |logit diff| {err:.2e}")
  assert out.shape == ref.shape and err < 1e-4


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_any_batch_size_under_jit(hf_llava, batch):
  model, cfg, params = hf_llava
  n = cfg.num_image_tokens
  ids = np.tile(np.array([[5] + [cfg.image_token_id] * n + [6, 7]], np.int32), (batch, 1))
  px = tiny_hf.random_pixels(batch, seed=batch)
  out = jax.jit(lambda p, i, x: Llava(cfg).apply({"params": p}, i, x))(params, ids, px)
  ref = hf_logits(model, ids, np.ones_like(ids), px)
  assert out.shape == (batch, n + 3, cfg.llm.vocab_size)
  assert np.abs(np.asarray(out) - ref).max() < 1e-4


def test_text_only_batch(hf_llava):
  model, cfg, params = hf_llava
  ids = np.array([[4, 5, 6, 7]], np.int32)
  out = Llava(cfg).apply({"params": params}, ids)
  with torch.no_grad():
    ref = model(input_ids=torch.from_numpy(ids).long()).logits.numpy()
  assert np.abs(np.asarray(out) - ref).max() < 1e-4


def test_padding_image_slots_with_image_mask(hf_llava):
  """Fixed-shape batches: [B, M] image slots, text-only samples' slots marked padding."""
  model, cfg, params = hf_llava
  ids, mask, px = make_batch(cfg)  # row 0: 2 images, row 1: none, row 2: 1 image
  slots = np.zeros((3, 2) + px.shape[1:], np.float32)
  slots[0, 0], slots[0, 1], slots[2, 0] = px[0], px[1], px[2]
  slots[1] = 7.0  # garbage in padding slots must not leak into the output
  image_mask = np.array([[1, 1], [0, 0], [1, 0]], bool)
  fn = jax.jit(lambda p, i, x, m, im: Llava(cfg).apply({"params": p}, i, x, m, image_mask=im))
  out = np.asarray(fn(params, ids, slots, mask, image_mask))
  ref = hf_logits(model, ids, mask, px)
  valid = mask.astype(bool)
  assert np.abs(out[valid] - ref[valid]).max() < 1e-4
  with pytest.raises(Exception, match="but 2 images"):
    jax.block_until_ready(fn(params, ids, slots, mask, np.array([[1, 1], [0, 0], [0, 0]], bool)))


def test_placeholder_mismatch_eager_names_both_numbers(hf_llava):
  _, cfg, params = hf_llava
  ids, mask, px = make_batch(cfg)
  # make_batch has 3 images; an extra copy of row 0 adds placeholders for 2 more.
  with pytest.raises(
      ValueError,
      match=f"has {5 * cfg.num_image_tokens} image placeholder tokens.*"
      f"but 3 images x {cfg.num_image_tokens} features",
  ):
    Llava(cfg).apply({"params": params}, np.concatenate([ids, ids[:1]]), px, None)
  short = ids.copy()
  short[0, 3] = 9  # one placeholder fewer in sample 0
  with pytest.raises(ValueError, match=f"sample 0 .* {2 * cfg.num_image_tokens - 1} image placeholder"):
    Llava(cfg).apply({"params": params}, short, px, mask)


def test_placeholder_mismatch_under_jit_is_reported(hf_llava):
  _, cfg, params = hf_llava
  ids, mask, px = make_batch(cfg)
  fn = jax.jit(lambda p, i, x: Llava(cfg).apply({"params": p}, i, x))
  with pytest.raises(Exception, match="image placeholder/feature count mismatch"):
    jax.block_until_ready(fn(params, ids, px[:2]))


def test_sharded_forward_matches_single_device(hf_llava):
  from llava_jax import sharding

  _, cfg, params = hf_llava
  ids, mask, px = make_batch(cfg)
  ids, mask = np.concatenate([ids, ids[2:]]), np.concatenate([mask, mask[2:]])  # 4 rows
  px = np.concatenate([px, px[2:]])  # 4 images
  fn = lambda p, i, x, m: Llava(cfg).apply({"params": p}, i, x, m)
  ref = np.asarray(jax.jit(fn)(params, ids, px, mask))
  mesh = sharding.make_mesh((2, 2, 2))
  boxed = jax.eval_shape(lambda: Llava(cfg).init(jax.random.key(0), ids, px)["params"])
  with sharding.use_mesh(mesh):
    p = jax.device_put(params, sharding.param_shardings(boxed, mesh))
    put = lambda a: jax.device_put(a, sharding.batch_sharding(mesh, a.ndim))
    out = jax.jit(fn)(p, put(ids), put(px), put(mask))
  assert len(out.sharding.device_set) == 8
  valid = mask.astype(bool)
  assert np.abs(np.asarray(out)[valid] - ref[valid]).max() < 1e-5
