"""Image preprocessing equals the HF slow CLIP/SigLIP processors (and LLaVA's pad pipeline) to 1e-5."""

import io
import logging

import numpy as np
import pytest
from PIL import Image

from llava_jax.data import images as im

logging.getLogger("transformers").setLevel(logging.ERROR)
transformers = pytest.importorskip("transformers")

TOL = 1e-5  # never loosen: the pipelines do the same float32 arithmetic


def _hf_clip(size, crop_size=None):
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

  c = crop_size or size
  return CLIPImageProcessorPil(
      size={"shortest_edge": size},
      crop_size={"height": c, "width": c},
      image_mean=list(im.CLIP_MEAN),
      image_std=list(im.CLIP_STD),
      resample=Image.Resampling.BICUBIC,
      do_center_crop=True,
  )


def _hf_siglip(size):
  from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

  return SiglipImageProcessorPil(
      size={"height": size, "width": size},
      image_mean=list(im.SIGLIP_MEAN),
      image_std=list(im.SIGLIP_STD),
      resample=Image.Resampling.BICUBIC,
  )


def _hf(proc, img):
  """HF output, CHW float32[1, 3, S, S] -> HWC float32[S, S, 3]."""
  out = np.asarray(proc(img, return_tensors="np")["pixel_values"])
  assert out.dtype == np.float32
  return out[0].transpose(1, 2, 0)


def _llava_open(data):
  """LLaVA's `Image.open(f).convert("RGB")`.

  PIL keeps a palette image's `transparency` entry (as an RGB colour) through
  `convert("RGB")`, and current HF processors then composite pixels of that
  colour on white; the transformers LLaVA pinned (4.3x) did a plain
  `convert("RGB")`. Dropping the entry reproduces LLaVA's numbers.
  """
  rgb = Image.open(io.BytesIO(data)).convert("RGB")
  rgb.info.pop("transparency", None)
  return rgb


def _random_image(rng, mode, w, h):
  """A random image of `mode`, round-tripped through PNG/JPEG/TIFF bytes like a file on disk."""
  rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  if mode == "L":
    img, fmt = Image.fromarray(rgb[..., 0], "L"), "PNG"
  elif mode == "P":
    img, fmt = Image.fromarray(rgb).quantize(colors=37), "PNG"
  elif mode == "P_transparent":
    img, fmt = Image.fromarray(rgb).quantize(colors=16), "PNG"
    img.info["transparency"] = 3
  elif mode == "RGBA":
    alpha = rng.integers(0, 256, (h, w, 1), dtype=np.uint8)
    img, fmt = Image.fromarray(np.concatenate([rgb, alpha], -1), "RGBA"), "PNG"
  elif mode == "LA":
    img, fmt = Image.fromarray(rgb[..., :2], "LA"), "PNG"
  elif mode == "CMYK":
    cmyk = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    img, fmt = Image.fromarray(cmyk, "CMYK"), "JPEG"
  else:
    img, fmt = Image.fromarray(rgb), "PNG"
  buf = io.BytesIO()
  img.save(buf, format=fmt, **({"transparency": 3} if mode == "P_transparent" else {}))
  return buf.getvalue()


# (mode, width, height): odd sizes, tall and wide, up- and down-scaling, already square.
CASES = [
    ("RGB", 37, 23),
    ("L", 19, 61),
    ("P", 50, 50),
    ("RGBA", 97, 31),
    ("CMYK", 24, 77),
    ("LA", 13, 14),
    ("P_transparent", 33, 45),
    ("RGB", 301, 117),
    ("RGB", 7, 5),
]


@pytest.mark.parametrize("size", [24, 33])
def test_square_equals_clip_processor(size):
  rng = np.random.default_rng(0)
  proc, cfg = _hf_clip(size), im.image_config_for("clip", size, "square")
  worst = 0.0
  for mode, w, h in CASES:
    data = _random_image(rng, mode, w, h)
    ours = im.preprocess(im.load_image(data), cfg)
    ref = _hf(proc, _llava_open(data))
    assert ours.shape == (size, size, 3) and ours.dtype == np.float32
    diff = float(np.abs(ours - ref).max())
    assert diff <= TOL, (mode, w, h, diff)
    worst = max(worst, diff)
  print(f"max |ours - CLIPImageProcessor| = {worst:.3g}")


@pytest.mark.parametrize("size", [24, 31])
def test_resize_equals_siglip_processor(size):
  rng = np.random.default_rng(1)
  proc, cfg = _hf_siglip(size), im.image_config_for("siglip", size)
  assert cfg.mode == "resize"
  worst = 0.0
  for mode, w, h in CASES:
    data = _random_image(rng, mode, w, h)
    ours = im.preprocess(im.load_image(data), cfg)
    ref = _hf(proc, _llava_open(data))
    diff = float(np.abs(ours - ref).max())
    assert diff <= TOL, (mode, w, h, diff)
    worst = max(worst, diff)
  print(f"max |ours - SiglipImageProcessor| = {worst:.3g}")


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P_transparent"])
def test_composite_alpha_equals_hf_on_raw_alpha_image(mode):
  """With composite_alpha=True we match what the HF processor does when handed the alpha image itself."""
  rng = np.random.default_rng(2)
  data = _random_image(rng, mode, 29, 40)
  raw = Image.open(io.BytesIO(data))
  ours = im.preprocess(im.load_image(data, composite_alpha=True), im.image_config_for("clip", 24))
  assert np.abs(ours - _hf(_hf_clip(24), raw)).max() <= TOL
  # ...and the default (LLaVA) drops alpha instead, which differs on these random alphas.
  dropped = im.preprocess(im.load_image(data), im.image_config_for("clip", 24))
  assert np.abs(dropped - ours).max() > 0.1


def _llava_expand2square(pil_img, background_color):
  """Verbatim logic of LLaVA's train.py `expand2square`, the reference."""
  width, height = pil_img.size
  if width == height:
    return pil_img
  elif width > height:
    result = Image.new(pil_img.mode, (width, width), background_color)
    result.paste(pil_img, (0, (width - height) // 2))
    return result
  else:
    result = Image.new(pil_img.mode, (height, height), background_color)
    result.paste(pil_img, ((height - width) // 2, 0))
    return result


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_pad_equals_llava_pipeline(kind):
  rng = np.random.default_rng(3)
  size = 28
  cfg = im.image_config_for(kind, size, "pad")
  proc = _hf_clip(size)
  proc.image_mean, proc.image_std = list(cfg.mean), list(cfg.std)
  for mode, w, h in CASES:
    data = _random_image(rng, mode, w, h)
    rgb = _llava_open(data)
    ref = _hf(proc, _llava_expand2square(rgb, tuple(int(x * 255) for x in proc.image_mean)))
    ours = im.preprocess(im.load_image(data), cfg)
    assert np.abs(ours - ref).max() <= TOL, (mode, w, h)


def test_pad_color_and_expand2square_geometry():
  assert im.image_config_for("clip", 336, "pad").pad_color == (122, 116, 104)
  assert im.image_config_for("siglip", 384, "pad").pad_color == (127, 127, 127)
  img = Image.new("RGB", (5, 2), (1, 2, 3))
  sq = np.asarray(im.expand2square(img, (9, 8, 7)))
  assert sq.shape == (5, 5, 3)
  # (5 - 2) // 2 = 1 row of padding on top, 2 at the bottom.
  assert (sq[0] == (9, 8, 7)).all() and (sq[1:3] == (1, 2, 3)).all() and (sq[3:] == (9, 8, 7)).all()
  tall = np.asarray(im.expand2square(Image.new("RGB", (2, 4), (1, 2, 3)), (0, 0, 0)))
  assert (tall[:, 0] == 0).all() and (tall[:, 1:3] == (1, 2, 3)).all() and (tall[:, 3] == 0).all()
  assert im.expand2square(img.resize((3, 3)), (0, 0, 0)).size == (3, 3)


def test_uint8_array_input_and_batch():
  rng = np.random.default_rng(4)
  a = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
  cfg = im.image_config_for("clip", 16)
  np.testing.assert_array_equal(im.preprocess(a, cfg), im.preprocess(Image.fromarray(a), cfg))
  batch = im.preprocess_batch([a, a[:, :10]], cfg)
  assert batch.shape == (2, 16, 16, 3) and batch.dtype == np.float32
  with pytest.raises(ValueError, match="uint8"):
    im.preprocess(a.astype(np.float32), cfg)


def test_high_bit_depth_is_scaled_not_clipped():
  a16 = np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000
  rgb = np.asarray(im.to_rgb(Image.fromarray(a16)))
  assert rgb.shape == (3, 4, 3) and (rgb[..., 0] == rgb[..., 2]).all()
  np.testing.assert_array_equal(rgb[..., 0], np.rint(a16 / 257).astype(np.uint8))
  f = np.asarray(im.to_rgb(Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))))
  np.testing.assert_array_equal(f[0, :, 0], [0, 128, 255])


def test_bad_inputs_raise_specific_errors():
  with pytest.raises(ValueError, match="cannot decode image <9 bytes>"):
    im.load_image(b"not a png")
  with pytest.raises(ValueError, match="cannot decode image .*missing.png"):
    im.load_image("/nonexistent/missing.png")
  with pytest.raises(ValueError, match="crop=False"):
    im.ImageConfig(size=8, mode="square", crop=False)
  with pytest.raises(ValueError, match="mode"):
    im.ImageConfig(size=8, mode="letterbox")
  with pytest.raises(ValueError, match="kind"):
    im.image_config_for("dino", 8)
