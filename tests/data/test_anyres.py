"""Anyres tiling equals transformers' LlavaNextImageProcessorPil / LlavaOnevisionImageProcessorPil.

The "Pil" classes are the numpy/PIL backends (the default ``LlavaNextImageProcessor``
needs torchvision, which the test extra does not install, and falls back to them).
"""

import logging

import numpy as np
import pytest
from PIL import Image

from llava_jax.data import anyres
from llava_jax.data import images as im

logging.getLogger("transformers").setLevel(logging.ERROR)
transformers = pytest.importorskip("transformers")

TOL = 1e-5  # never loosen: same PIL resizes on uint8, same float32 normalisation

# (height, width, mode): wide, tall, tiny, huge (both ways), alpha, greyscale, square
IMAGES = [
    (300, 800, "RGB"),
    (900, 250, "RGB"),
    (7, 5, "RGB"),
    (500, 3000, "RGB"),
    (3000, 500, "RGB"),
    (640, 480, "RGBA"),
    (333, 777, "L"),
    (400, 400, "RGB"),
]


def _image(h, w, mode, seed=0):
  """Noise (every resampling or rounding difference shows) with a gradient (so does a flipped tile)."""
  rng = np.random.default_rng(seed)
  a = (
      rng.integers(0, 200, (h, w, 4), dtype=np.uint8)
      + (np.arange(w) * 55 // max(w - 1, 1)).astype(np.uint8)[None, :, None]
  )
  if mode == "L":
    return Image.fromarray(a[..., 0], "L")
  return Image.fromarray(a if mode == "RGBA" else a[..., :3], mode)


FAMILIES = {
    # family: (HF processor factory, our ImageConfig, pinpoints)
    "llava_next": (
        lambda: transformers.LlavaNextImageProcessorPil(
            size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}
        ),
        im.image_config_for("clip", 336),
        anyres.LLAVA_NEXT_PINPOINTS,
    ),
    "onevision": (
        lambda: transformers.LlavaOnevisionImageProcessorPil(
            size={"height": 384, "width": 384}, image_mean=list(im.SIGLIP_MEAN), image_std=list(im.SIGLIP_STD)
        ),
        im.image_config_for("siglip", 384),
        anyres.ONEVISION_PINPOINTS,
    ),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
  make, cfg, pins = FAMILIES[request.param]
  proc = make()
  # Our pinpoint tables are transformers' defaults, not a copy that could drift.
  assert [list(p) for p in pins] == [list(p) for p in proc.image_grid_pinpoints]
  return proc, cfg, pins


def _hf(proc, img_or_list):
  out = proc(img_or_list, return_tensors="np")
  return out["pixel_values"].transpose(0, 1, 3, 4, 2), out["image_sizes"]


@pytest.mark.parametrize("h,w,mode", IMAGES, ids=lambda x: str(x))
def test_tiles_equal_hf(family, h, w, mode):
  proc, cfg, pins = family
  img = _image(h, w, mode)
  ref, ref_sizes = _hf(proc, img)
  ours, size = anyres.preprocess_anyres(img, cfg, pins, composite_alpha=True)
  assert ours.dtype == np.float32 and ours.shape == ref.shape[1:], (ours.shape, ref.shape)
  assert size == tuple(ref_sizes[0]) == (h, w)
  assert ours.shape[0] == anyres.num_tiles(size, pins, cfg.size) <= anyres.max_tiles(pins, cfg.size)
  err = np.abs(ours - ref[0]).max()
  print(f"{h}x{w} {mode}: {ours.shape[0]} tiles, max |diff| {err:.1e}")
  assert err <= TOL


def test_alpha_dropped_by_default_like_llava(family):
  """Default: LLaVA's convert('RGB') (HF on the converted image); composite_alpha=True: HF on RGBA."""
  proc, cfg, pins = family
  img = _image(200, 500, "RGBA")
  dropped, _ = anyres.preprocess_anyres(img, cfg, pins)
  ref, _ = _hf(proc, img.convert("RGB"))
  assert np.abs(dropped - ref[0]).max() <= TOL
  composited, _ = anyres.preprocess_anyres(img, cfg, pins, composite_alpha=True)
  assert np.abs(composited - dropped).max() > 0.1  # the flag matters for this image


def test_uint8_array_input_and_padded_batch(family):
  """A uint8 array equals its PIL image; pad_tiles gives HF's zero-padded batch layout."""
  proc, cfg, pins = family
  a, b = _image(300, 800, "RGB", seed=1), _image(1000, 1000, "RGB", seed=2)
  ref, ref_sizes = _hf(proc, [a, b])
  tiles = [anyres.preprocess_anyres(np.asarray(x), cfg, pins)[0] for x in (a, b)]
  budget = ref.shape[1]
  batch = np.stack([anyres.pad_tiles(t, budget) for t in tiles])
  assert np.abs(batch - ref).max() <= TOL
  assert [tuple(s) for s in ref_sizes] == [(300, 800), (1000, 1000)]
  with pytest.raises(ValueError, match=f"has {tiles[1].shape[0]} tiles, more than the budget of 2"):
    anyres.pad_tiles(tiles[1], 2)


def test_select_best_resolution_equals_hf_on_many_sizes():
  from transformers.image_processing_utils import select_best_resolution as hf_select

  rng = np.random.default_rng(0)
  sizes = [(int(h), int(w)) for h, w in rng.integers(1, 4000, (400, 2))] + [(336, 672), (49, 1), (1, 49), (384, 384)]
  for pins in (anyres.LLAVA_NEXT_PINPOINTS, anyres.ONEVISION_PINPOINTS):
    listed = [list(p) for p in pins]
    for s in sizes:
      assert anyres.select_best_resolution(s, pins) == tuple(hf_select(s, listed)), s


def test_bad_pinpoints_are_named():
  cfg = im.image_config_for("clip", 336)
  with pytest.raises(ValueError, match=r"pinpoint \[336, 600\] is not .* multiples of the tile size 336"):
    anyres.preprocess_anyres(_image(10, 10, "RGB"), cfg, [[336, 672], [336, 600]])
  with pytest.raises(ValueError, match="image_grid_pinpoints is empty"):
    anyres.preprocess_anyres(_image(10, 10, "RGB"), cfg, [])
  with pytest.raises(ValueError, match=r"expects uint8\[H, W, 3\]"):
    anyres.preprocess_anyres(np.zeros((4, 4, 3), np.float32), cfg, anyres.LLAVA_NEXT_PINPOINTS)


def test_onevision_multi_image_sample_equals_hf_square_mode():
  """Several images in one sample ([[a, b, c]]): transformers' OneVision processor pads each
  to a square with the mean colour and resizes it, one tile, no grid; so does
  preprocess_square."""
  make, cfg, _ = FAMILIES["onevision"]
  proc = make()
  imgs = [_image(300, 800, "RGB", seed=1), _image(900, 250, "RGB", seed=2), _image(400, 400, "L", seed=3)]
  out = proc([imgs], return_tensors="np")
  assert out["batch_num_images"].tolist() == [3]
  ref = out["pixel_values"].transpose(0, 1, 3, 4, 2)  # [3 images, padded tiles, S, S, 3]
  for k, img in enumerate(imgs):
    tiles, size = anyres.preprocess_square(img, cfg)
    assert tiles.shape == (1, 384, 384, 3) and size == tuple(out["image_sizes"][k]) == (img.size[1], img.size[0])
    err = np.abs(tiles[0] - ref[k, 0]).max()
    assert err <= TOL, (k, err)
    assert not ref[k, 1:].any()  # HF pads the batch with zero tiles: one real tile per image
