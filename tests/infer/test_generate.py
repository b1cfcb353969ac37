"""Greedy generation equals HF ``generate`` on the same converted tiny LLaVA."""
import jax
import numpy as np
import pytest
import torch

import tiny_hf
from llava_jax.checkpoint.convert.hf import load_hf_llava
from llava_jax.infer.sampler import generate, sample_logits


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  model = tiny_hf.llava("clip", "llama", seed=31)
  path = tmp_path_factory.mktemp("gen")
  model.save_pretrained(path)
  cfg, params = load_hf_llava(str(path))
  return model, cfg, params


def _left_pad(rows, pad=0):
  t = max(map(len, rows))
  ids = np.full((len(rows), t), pad, np.int32)
  mask = np.zeros((len(rows), t), np.int32)
  for i, r in enumerate(rows):
    ids[i, t - len(r):], mask[i, t - len(r):] = r, 1
  return ids, mask


@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_matches_hf_generate(tiny, batch):
  model, cfg, params = tiny
  n, img = cfg.num_image_tokens, cfg.image_token_id
  rows = [[1, 5] + [img] * n + [9, 10, 11], [1, 7, 8, 9], [1] + [img] * n + [12],
          [1, 20, 21, 22, 23, 24, 25]][:batch]
  ids, mask = _left_pad(rows)
  num_images = sum(r.count(img) for r in rows) // n
  px = tiny_hf.random_pixels(num_images, seed=batch)
  new = 12
  kwargs = dict(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                max_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=2)
  if num_images:
    kwargs["pixel_values"] = tiny_hf.to_torch_pixels(px)
  with torch.no_grad():
    ref = model.generate(**kwargs)[:, ids.shape[1]:].numpy()
  ours = np.asarray(generate(cfg, params, ids, px if num_images else None, mask,
                             max_new_tokens=new, eos_token_id=2))
  ref = np.pad(ref, ((0, 0), (0, new - ref.shape[1])), constant_values=0)  # HF stops early
  np.testing.assert_array_equal(ours, ref)


def test_sampling_is_seeded_and_respects_top_k():
  logits = jax.random.normal(jax.random.key(0), (64, 50))
  a = sample_logits(logits, jax.random.key(1), temperature=1.0, top_k=3)
  b = sample_logits(logits, jax.random.key(1), temperature=1.0, top_k=3)
  np.testing.assert_array_equal(a, b)
  top3 = np.argsort(-np.asarray(logits), axis=-1)[:, :3]
  assert all(int(t) in row for t, row in zip(np.asarray(a), top3))
  c = sample_logits(logits, jax.random.key(2), temperature=1.0, top_p=1e-6)
  np.testing.assert_array_equal(c, np.argmax(logits, -1))  # tiny top_p keeps only the argmax


def test_sampling_without_rng_is_an_error(tiny):
  _, cfg, params = tiny
  with pytest.raises(ValueError, match="explicit rng"):
    generate(cfg, params, np.ones((1, 3), np.int32), max_new_tokens=2, temperature=0.7)
