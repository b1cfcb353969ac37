"""Greedy generation equals HF ``generate`` on the same converted tiny LLaVA; stop tokens,
early exit, seeded sampling, streaming and a 2x2x2 mesh give the expected tokens."""

import jax
import numpy as np
import pytest
import torch

import tiny_hf
from llava_jax.checkpoint.convert.hf import load_hf_llava
from llava_jax.infer import sampler
from llava_jax.infer.sampler import generate, generate_stream, sample_logits


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
    ids[i, t - len(r) :], mask[i, t - len(r) :] = r, 1
  return ids, mask


@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_matches_hf_generate(tiny, batch):
  model, cfg, params = tiny
  n, img = cfg.num_image_tokens, cfg.image_token_id
  rows = [[1, 5] + [img] * n + [9, 10, 11], [1, 7, 8, 9], [1] + [img] * n + [12], [1, 20, 21, 22, 23, 24, 25]][:batch]
  ids, mask = _left_pad(rows)
  num_images = sum(r.count(img) for r in rows) // n
  px = tiny_hf.random_pixels(num_images, seed=batch)
  new = 12
  kwargs = dict(
      input_ids=torch.from_numpy(ids).long(),
      attention_mask=torch.from_numpy(mask).long(),
      max_new_tokens=new,
      do_sample=False,
      pad_token_id=0,
      eos_token_id=2,
  )
  if num_images:
    kwargs["pixel_values"] = tiny_hf.to_torch_pixels(px)
  with torch.no_grad():
    ref = model.generate(**kwargs)[:, ids.shape[1] :].numpy()
  ours = np.asarray(generate(cfg, params, ids, px if num_images else None, mask, max_new_tokens=new, eos_token_id=2))
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


def _prompts(cfg, batch=4):
  n, img = cfg.num_image_tokens, cfg.image_token_id
  rows = [[1, 5] + [img] * n + [9, 10, 11], [1, 7, 8, 9], [1] + [img] * n + [12], [1, 20, 21, 22, 23, 24, 25]][:batch]
  ids, mask = _left_pad(rows)
  return ids, mask, tiny_hf.random_pixels(sum(r.count(img) for r in rows) // n, seed=7)


def test_stop_ids_pad_the_rest_and_the_loop_exits_early(tiny):
  _, cfg, params = tiny
  ids, mask, px = _prompts(cfg)
  new = 10
  free = np.asarray(generate(cfg, params, ids, px, mask, max_new_tokens=new))
  # Stop every row at its 3rd token: rows stop at different steps, none later than 3.
  stops = sorted(set(int(t) for t in free[:, 2]))
  first = [int(np.flatnonzero(np.isin(r, stops))[0]) for r in free]
  out, steps = sampler.generate(
      cfg,
      params,
      ids,
      px,
      mask,
      max_new_tokens=new,
      eos_token_id=stops[0],
      stop_token_ids=stops[1:],
      return_num_steps=True,
  )
  out = np.asarray(out)
  for r, f in enumerate(first):
    np.testing.assert_array_equal(out[r, : f + 1], free[r, : f + 1])
    assert (out[r, f + 1 :] == cfg.pad_token_id).all(), (r, out[r])
  assert int(steps) == max(first) + 1 < new  # decoded no further than the last row's stop
  _, steps = sampler.generate(cfg, params, ids, px, mask, max_new_tokens=new, return_num_steps=True)
  assert int(steps) == new


def test_seeded_sampling_is_reproducible(tiny):
  _, cfg, params = tiny
  ids, mask, px = _prompts(cfg)
  kw = dict(max_new_tokens=8, temperature=1.5, top_k=20, top_p=0.95)
  a = np.asarray(generate(cfg, params, ids, px, mask, rng=jax.random.key(3), **kw))
  b = np.asarray(generate(cfg, params, ids, px, mask, rng=jax.random.key(3), **kw))
  c = np.asarray(generate(cfg, params, ids, px, mask, rng=jax.random.key(4), **kw))
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()
  streamed = np.stack(list(generate_stream(cfg, params, ids, px, mask, rng=jax.random.key(3), **kw)), axis=1)
  np.testing.assert_array_equal(streamed, a)


def test_stream_yields_the_same_tokens_and_stops(tiny):
  _, cfg, params = tiny
  ids, mask, px = _prompts(cfg)
  ref = np.asarray(generate(cfg, params, ids, px, mask, max_new_tokens=9))
  stop = int(ref[0, 1])
  ref = np.asarray(generate(cfg, params, ids[:1], px[:1], mask[:1], max_new_tokens=9, eos_token_id=stop))
  chunks = list(generate_stream(cfg, params, ids[:1], px[:1], mask[:1], max_new_tokens=9, eos_token_id=stop))
  assert len(chunks) == 2 and all(c.shape == (1,) and c.dtype == np.int32 for c in chunks)
  np.testing.assert_array_equal(np.concatenate(chunks), ref[0, :2])


@pytest.mark.parametrize("batch", [4, 1])
def test_sharded_generate_equals_single_device(tiny, batch):
  from llava_jax import sharding
  from llava_jax.models.llava import Llava

  _, cfg, params = tiny
  ids, mask, px = _prompts(cfg, batch)
  ref = np.asarray(generate(cfg, params, ids, px, mask, max_new_tokens=6, eos_token_id=2))
  mesh = sharding.make_mesh((2, 2, 2))
  boxed = jax.eval_shape(lambda: Llava(cfg).init(jax.random.key(0), ids, px)["params"])
  placed = jax.device_put(params, sharding.param_shardings(boxed, mesh))
  out = generate(cfg, placed, ids, px, mask, max_new_tokens=6, eos_token_id=2, mesh=mesh)
  np.testing.assert_array_equal(np.asarray(out), ref)
  # The cache really is sharded: kv heads over "tensor", batch over data x fsdp.
  _, cache, _ = sampler.prefill(cfg, placed, ids, px, mask, cache_len=ids.shape[1] + 2, mesh=mesh)
  spec = cache["k"].sharding.spec
  assert spec[3] == "tensor" and (batch == 1 or spec[1] == ("data", "fsdp")), spec
