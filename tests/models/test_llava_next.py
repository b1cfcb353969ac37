"""Anyres LLaVA parity with HF ``LlavaNextForConditionalGeneration`` (CLIP+Llama) and
``LlavaOnevisionForConditionalGeneration`` (SigLIP+Qwen2, ``anyres_max_N``), loaded through
``load_hf_llava`` from a saved directory; images preprocessed by both processors."""

import functools
import logging

import jax
import numpy as np
import pytest
import torch
import transformers as tf
from PIL import Image

import tiny_hf
from llava_jax.checkpoint.convert.hf import llava_config_from_hf, load_hf_llava, save_hf_llava
from llava_jax.data import anyres as data_anyres
from llava_jax.data import images as im
from llava_jax.models import Llava, LlavaConfig, anyres

logging.getLogger("transformers").setLevel(logging.ERROR)

PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]  # S = 28: at most 2x2 tiles
# (height, width): wide and tall; a 40x100 image is 1x3 tiles, unpadded to 4x10 features.
IMAGES = [(40, 100), (90, 30)]


def _hf_model(family):
  if family == "llava_next":
    cfg = tf.LlavaNextConfig(
        vision_config=tiny_hf.clip_vision_config(),
        text_config=tiny_hf.text_config("llama"),
        image_token_index=127,
        image_grid_pinpoints=PINPOINTS,
    )
    proc = tf.LlavaNextImageProcessorPil(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, image_grid_pinpoints=PINPOINTS
    )
    return tf.LlavaNextForConditionalGeneration(cfg), proc, im.image_config_for("clip", 28)
  # anyres_max_1: grids over ~1 tile of features are shrunk, so the bilinear path runs.
  cfg = tf.LlavaOnevisionConfig(
      vision_config=tiny_hf.siglip_vision_config(),
      text_config=tiny_hf.text_config("qwen2"),
      image_token_index=127,
      image_grid_pinpoints=PINPOINTS,
      vision_aspect_ratio="anyres_max_1",
  )
  proc = tf.LlavaOnevisionImageProcessorPil(
      size={"height": 28, "width": 28},
      image_grid_pinpoints=PINPOINTS,
      image_mean=list(im.SIGLIP_MEAN),
      image_std=list(im.SIGLIP_STD),
  )
  return tf.LlavaOnevisionForConditionalGeneration(cfg), proc, im.image_config_for("siglip", 28)


@pytest.fixture(scope="module", params=["llava_next", "llava_onevision"])
def hf_anyres(request, tmp_path_factory):
  model, proc, image_cfg = _hf_model(request.param)
  tiny_hf.randomize_(model, seed=5)
  path = tmp_path_factory.mktemp(request.param)
  model.save_pretrained(path)
  cfg, params = load_hf_llava(str(path))
  return model, proc, image_cfg, cfg, params


def _images(seed=0):
  rng = np.random.default_rng(seed)
  return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in IMAGES]


def _batch(cfg, counts, seed=0, length=None):
  """One row per image: text, the image's placeholders, text; right padding (to ``length``)."""
  rng = np.random.default_rng(seed)
  rows = [list(rng.integers(3, 100, 2)) + [cfg.image_token_id] * int(n) + list(rng.integers(3, 100, 3)) for n in counts]
  return _pad_rows(rows, length)


def _pad_rows(rows, length=None):
  """Token rows -> right-padded ids and mask, int32[len(rows), length or the longest]."""
  ids = np.zeros((len(rows), length or max(map(len, rows))), np.int32)
  mask = np.zeros_like(ids)
  for i, r in enumerate(rows):
    ids[i, : len(r)], mask[i, : len(r)] = r, 1
  return ids, mask


def _hf_logits(model, ids, mask, hf_in):
  """HF logits of our ids on HF-processed images (``batch_num_images`` when the processor gives it)."""
  extra = {"batch_num_images": torch.from_numpy(hf_in["batch_num_images"])} if "batch_num_images" in hf_in else {}
  with torch.no_grad():
    return model(
        input_ids=torch.from_numpy(ids).long(),
        attention_mask=torch.from_numpy(mask).long(),
        pixel_values=torch.from_numpy(hf_in["pixel_values"]),
        image_sizes=torch.from_numpy(hf_in["image_sizes"]),
        **extra,
    ).logits.numpy()


@functools.cache  # one compiled forward per config
def _forward(cfg):
  return jax.jit(lambda p, i, x, m, lay: Llava(cfg).apply({"params": p}, i, x, m, image_layout=lay))


def test_config_from_hf(hf_anyres):
  model, _, _, cfg, params = hf_anyres
  assert cfg.image_grid_pinpoints == tuple(map(tuple, PINPOINTS))
  assert cfg.vision_aspect_ratio == getattr(model.config, "vision_aspect_ratio", None)
  assert cfg.tiles_per_image == 1 + 2 * 2 and params["image_newline"].shape == (cfg.llm.hidden_size,)
  np.testing.assert_array_equal(params["image_newline"], model.model.image_newline.detach().numpy())


def test_logits_match_hf_with_both_processors(hf_anyres):
  model, proc, image_cfg, cfg, params = hf_anyres
  imgs = _images()
  hf_in = proc(imgs, return_tensors="np")
  tiles = [data_anyres.preprocess_anyres(x, image_cfg, cfg.image_grid_pinpoints) for x in imgs]
  px = np.stack([data_anyres.pad_tiles(t, cfg.tiles_per_image) for t, _ in tiles])
  sizes = np.array([s for _, s in tiles])
  ref_px = hf_in["pixel_values"].transpose(0, 1, 3, 4, 2)
  assert np.abs(px[:, : ref_px.shape[1]] - ref_px).max() <= 1e-5 and not px[:, ref_px.shape[1] :].any()
  np.testing.assert_array_equal(sizes, hf_in["image_sizes"])

  layout = anyres.image_layout(sizes, cfg)
  ids, mask = _batch(cfg, layout.num_tokens)
  ref = _hf_logits(model, ids, mask, hf_in)  # HF raises if our placeholder counts differ from its packed features
  out = np.asarray(_forward(cfg)(params, ids, px, mask, layout))
  valid = mask.astype(bool)
  err = np.abs(out[valid] - ref[valid]).max()
  print(f"{type(model).__name__}: tokens per image {layout.num_tokens.tolist()}, max |logit diff| {err:.2e}")
  assert out.shape == ref.shape and err < 1e-4


# Wide, tall, tiny, huge, square, and sizes whose unpadding rounds (odd margins).
PACK_SIZES = [
    (40, 100),
    (90, 30),
    (7, 5),
    (500, 3000),
    (3000, 500),
    (56, 56),
    (33, 97),
    (101, 29),
    (28, 83),
    (25, 100),
    (100, 25),
]


def _pack_both(model, cfg, sizes, seed=0):
  """HF's pack_image_features vs ours on the same random tile features: (ours, ref) per image."""
  g = torch.Generator().manual_seed(seed)
  n, e, tiles = cfg.vision.num_features, cfg.llm.hidden_size, cfg.tiles_per_image
  feats = [
      torch.randn(data_anyres.num_tiles(s, cfg.image_grid_pinpoints, cfg.vision.image_size), n, e, generator=g)
      for s in sizes
  ]
  newline = torch.randn(e, generator=g)
  kw = (
      {"vision_aspect_ratio": cfg.vision_aspect_ratio}
      if cfg.vision_aspect_ratio
      else {"vision_feature_select_strategy": "default"}
  )
  with torch.no_grad():
    ref, lens = model.model.pack_image_features(feats, torch.tensor(sizes), image_newline=newline, **kw)
  padded = np.zeros((len(sizes), tiles, n, e), np.float32)
  for i, f in enumerate(feats):
    padded[i, : f.shape[0]] = f.numpy()
  layout = anyres.image_layout(np.array(sizes), cfg)
  np.testing.assert_array_equal(layout.num_tokens, lens.numpy())
  out = np.asarray(jax.jit(anyres.pack_image_features)(padded, newline.numpy(), layout))
  assert not out[np.arange(out.shape[1])[None] >= layout.num_tokens[:, None]].any()  # padding is zero
  return [(out[i, : len(r)], r.numpy()) for i, r in enumerate(ref)]


def test_pack_image_features_matches_hf(hf_anyres):
  model, _, _, cfg, _ = hf_anyres
  pairs = _pack_both(model, cfg, PACK_SIZES)
  err = max(np.abs(a - b).max() for a, b in pairs)
  print(f"{type(model).__name__} pack_image_features: max |diff| {err:.1e}")
  assert err < 1e-5


def test_onevision_anyres_max_9_at_real_geometry():
  """OneVision's own pinpoints (384 px tiles of 27x27) and anyres_max_9, read from its config."""
  hf_cfg = tf.LlavaOnevisionConfig(
      vision_config=tf.SiglipVisionConfig(
          hidden_size=16,
          intermediate_size=16,
          num_hidden_layers=1,
          num_attention_heads=2,
          image_size=384,
          patch_size=14,
      ),
      text_config=tiny_hf.text_config(
          "qwen2", hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1
      ),
  )
  model = tf.LlavaOnevisionForConditionalGeneration(hf_cfg).eval()
  cfg = llava_config_from_hf(hf_cfg.to_dict())
  assert cfg.vision_aspect_ratio == "anyres_max_9" and cfg.tiles_per_image == 37
  sizes = [(300, 800), (2000, 2100), (500, 3000), (7, 5), (1000, 400), (200, 1900), (1900, 190)]
  pairs = _pack_both(model, cfg, sizes)
  err = max(np.abs(a - b).max() for a, b in pairs)
  print(f"OneVision anyres_max_9 pack: tokens {[len(b) for _, b in pairs]}, max |diff| {err:.1e}")
  assert err < 1e-5 and max(len(b) for _, b in pairs) <= cfg.image_token_budget


def test_mixed_resolutions_compile_once_and_slots(hf_anyres):
  """[B, M] image slots with empty ones; other sizes reuse the compiled function; HF's logits."""
  model, proc, image_cfg, cfg, params = hf_anyres
  traces = []
  fn = jax.jit(
      lambda p, i, x, m, lay, imask: traces.append(1)
      or Llava(cfg).apply({"params": p}, i, x, m, image_mask=imask, image_layout=lay)
  )
  rng = np.random.default_rng(7)
  for sizes in ([(40, 100), (90, 30)], [(56, 56), (7, 5)]):
    imgs = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    tiles = [
        data_anyres.pad_tiles(
            data_anyres.preprocess_anyres(x, image_cfg, cfg.image_grid_pinpoints)[0], cfg.tiles_per_image
        )
        for x in imgs
    ]
    px = np.zeros((2, 2) + tiles[0].shape, np.float32)
    px[0, 0], px[1, 0] = tiles
    px[1, 1] = 3.0  # an empty slot's garbage must not leak
    image_mask = np.array([[1, 0], [1, 0]], bool)
    layout = anyres.image_layout(np.array([[sizes[0], (1, 1)], [sizes[1], (1, 1)]]), cfg, image_mask)
    # Fixed shapes throughout (rows padded to a budget), so the second batch reuses the first's compile.
    ids, mask = _batch(cfg, layout.num_tokens.reshape(2, 2).sum(1), length=cfg.image_token_budget + 8)
    out = np.asarray(fn(params, ids, px, mask, layout, image_mask))
    hf_in = proc(imgs, return_tensors="pt")
    with torch.no_grad():
      ref = model(
          input_ids=torch.from_numpy(ids).long(),
          attention_mask=torch.from_numpy(mask).long(),
          pixel_values=hf_in["pixel_values"],
          image_sizes=hf_in["image_sizes"],
      ).logits.numpy()
    assert np.abs(out[mask == 1] - ref[mask == 1]).max() < 1e-4
  assert len(traces) == 1
  bad = ids.copy()
  bad[1, 2] = 9  # one placeholder short in row 1
  with pytest.raises(ValueError, match="sample 1 of the batch has .* image placeholder tokens but its images pack to"):
    Llava(cfg).apply({"params": params}, bad, px, mask, image_mask=image_mask, image_layout=layout)
  with pytest.raises(Exception, match="sample 1 of the batch has"):  # under jit: the host callback
    jax.block_until_ready(fn(params, bad, px, mask, layout, image_mask))
  assert len(traces) == 1


def test_text_only_batch(hf_anyres):
  model, _, _, cfg, params = hf_anyres
  ids = np.array([[4, 5, 6, 7]], np.int32)
  out = Llava(cfg).apply({"params": params}, ids)
  with torch.no_grad():
    ref = model(input_ids=torch.from_numpy(ids).long()).logits.numpy()
  assert np.abs(np.asarray(out) - ref).max() < 1e-4


def test_sharded_forward_matches_hf(hf_anyres):
  """On a (2, 2, 2) mesh (image_newline, tiles and layout sharded like the rest) the logits are HF's."""
  from llava_jax import sharding

  model, proc, image_cfg, cfg, params = hf_anyres
  sizes = [(40, 100), (90, 30), (56, 56), (7, 5)]  # 4 rows: the batch splits over data x fsdp
  rng = np.random.default_rng(3)
  imgs = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
  tiles = [data_anyres.preprocess_anyres(x, image_cfg, cfg.image_grid_pinpoints)[0] for x in imgs]
  px = np.stack([data_anyres.pad_tiles(t, cfg.tiles_per_image) for t in tiles])
  layout = anyres.image_layout(np.array(sizes), cfg)
  ids, mask = _batch(cfg, layout.num_tokens)
  hf_in = proc(imgs, return_tensors="pt")
  with torch.no_grad():
    ref = model(
        input_ids=torch.from_numpy(ids).long(),
        attention_mask=torch.from_numpy(mask).long(),
        pixel_values=hf_in["pixel_values"],
        image_sizes=hf_in["image_sizes"],
    ).logits.numpy()
  fn = lambda p, i, x, m, lay: Llava(cfg).apply({"params": p}, i, x, m, image_layout=lay)
  mesh = sharding.make_mesh((2, 2, 2))
  boxed = jax.eval_shape(lambda: Llava(cfg).init(jax.random.key(0), ids, px, image_layout=layout)["params"])
  with sharding.use_mesh(mesh):
    p = jax.device_put(params, sharding.param_shardings(boxed, mesh))
    put = lambda a: jax.device_put(a, sharding.batch_sharding(mesh, a.ndim))
    out = jax.jit(fn)(p, put(ids), put(px), put(mask), jax.tree.map(put, layout))
  assert len(out.sharding.device_set) == 8
  valid = mask.astype(bool)
  err = np.abs(np.asarray(out)[valid] - ref[valid]).max()
  print(f"{type(model).__name__} on 8 devices: max |logit diff| {err:.2e}")
  assert err < 1e-4


def test_save_hf_llava_loads_in_transformers(hf_anyres, tmp_path):
  model, _, _, cfg, params = hf_anyres
  save_hf_llava(cfg, params, str(tmp_path))
  again = type(model).from_pretrained(str(tmp_path)).eval()
  assert type(again.config) is type(model.config)
  assert again.config.image_grid_pinpoints == PINPOINTS
  ref = {k: v for k, v in model.state_dict().items()}
  got = again.state_dict()
  assert sorted(got) == sorted(ref)
  assert max((got[k] - ref[k]).abs().max().item() for k in ref) == 0
  cfg2, params2 = load_hf_llava(str(tmp_path))
  assert cfg2 == cfg
  assert jax.tree.all(jax.tree.map(np.array_equal, params2, params))


def test_config_dict_round_trip_and_llava15_unchanged(hf_anyres):
  cfg = hf_anyres[3]
  import json

  assert LlavaConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
  plain = LlavaConfig().to_dict()
  assert not {"image_grid_pinpoints", "vision_aspect_ratio", "max_tiles_per_image", "max_image_tokens"} & set(plain)
  with pytest.raises(ValueError, match="need image_grid_pinpoints"):
    LlavaConfig(vision_aspect_ratio="anyres_max_9")
  with pytest.raises(ValueError, match="packs to .* image tokens, more than max_image_tokens=20"):
    anyres.image_layout([(40, 100)], LlavaConfig.from_dict({**cfg.to_dict(), "max_image_tokens": 20}))


def test_onevision_multi_image_row_matches_hf(hf_anyres):
  """A row of two images (OneVision's multi-image mode: each one padded square tile plus
  image_newline) beside a row of one anyres image, as transformers' processor and model
  take ``[[a, b], [c]]`` (``batch_num_images`` [2, 1]); our slots' mode comes from the rows."""
  model, proc, image_cfg, cfg, params = hf_anyres
  if cfg.vision_aspect_ratio is None:
    pytest.skip("LLaVA-NeXT tiles every image; the multi-image mode is OneVision's")
  a, b = _images()
  c = _images(seed=1)[0]
  hf_in = proc([[a, b], [c]], return_tensors="np")
  assert hf_in["batch_num_images"].tolist() == [2, 1]
  px = np.zeros((2, 2, cfg.tiles_per_image, 28, 28, 3), np.float32)
  sizes = np.zeros((2, 2, 2), np.int32)
  for k, img in enumerate((a, b)):
    t, sizes[0, k] = data_anyres.preprocess_square(img, image_cfg)
    px[0, k] = data_anyres.pad_tiles(t, cfg.tiles_per_image)
  t, sizes[1, 0] = data_anyres.preprocess_anyres(c, image_cfg, cfg.image_grid_pinpoints)
  px[1, 0] = data_anyres.pad_tiles(t, cfg.tiles_per_image)
  image_mask = np.array([[True, True], [True, False]])
  square = anyres.square_flags(cfg, image_mask)
  assert square.tolist() == [[True, True], [False, False]]
  layout = anyres.image_layout(sizes, cfg, image_mask, square)
  counts = layout.num_tokens.reshape(2, 2)
  assert counts[0].tolist() == [cfg.vision.num_features + 1] * 2  # base features + newline each
  rng = np.random.default_rng(3)
  text = lambda n: list(rng.integers(3, 100, n))
  rows = [
      text(2) + [cfg.image_token_id] * int(counts[0, 0]) + text(2) + [cfg.image_token_id] * int(counts[0, 1]) + text(3),
      text(2) + [cfg.image_token_id] * int(counts[1, 0]) + text(3),
  ]
  ids, mask = _pad_rows(rows)
  ref = _hf_logits(model, ids, mask, hf_in)
  out = np.asarray(Llava(cfg).apply({"params": params}, ids, px, mask, image_mask=image_mask, image_layout=layout))
  valid = mask.astype(bool)
  err = np.abs(out[valid] - ref[valid]).max()
  print(f"OneVision multi-image row: tokens {counts.tolist()}, max |logit diff| {err:.2e}")
  assert err < 1e-4
