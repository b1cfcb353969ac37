"""Image loading and preprocessing, numerically equal to the HF CLIP/SigLIP processors.

Three modes turn an image of any size into `float32[S, S, 3]` (NHWC, normalized):

- ``square``: resize the shortest edge to S (bicubic), center-crop S×S, as
  `CLIPImageProcessor` does (LLaVA with `image_aspect_ratio="square"`).
- ``pad``: paste the image centred on a square canvas filled with the mean
  colour (`expand2square`, LLaVA-1.5's `image_aspect_ratio="pad"`), then the
  ``square`` pipeline (a no-op crop on a square image).
- ``resize``: resize straight to S×S (bicubic), ignoring aspect ratio, as
  `SiglipImageProcessor` does.

The arithmetic follows the HF slow (PIL/numpy) processors step by step so the
numbers agree to float32 rounding: PIL resizes the uint8 image, the crop is
taken on uint8, then `x * (1/255)` in float64 cast to float32, then
`(x - mean) / std` in float32.

Colour conversion follows LLaVA, which opens every image with
`Image.open(path).convert("RGB")`: the alpha channel (RGBA, LA, P with a
transparent index) is dropped, not composited (transparent pixels show their
stored colour, often black). HF processors given an RGBA image composite it on
white instead; `composite_alpha=True` in `to_rgb` / `load_image` does that.
(Current HF processors also composite the pixels of a palette image's
transparent colour even after `convert("RGB")`, because PIL keeps the
`transparency` entry; the transformers LLaVA pinned did not, and neither do we:
`to_rgb` removes that entry.)
16-bit and float greyscale (`I;16*`, `I`, `F`) are the one deviation from
LLaVA: PIL's `convert("RGB")` clips them to 0/255, which destroys the image,
so they are scaled to 8 bits (÷257, ×255) first.
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Literal, Union

import numpy as np
from PIL import Image

# OpenAI CLIP statistics (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# SigLIP maps [0, 1] to [-1, 1] (transformers' IMAGENET_STANDARD_MEAN / _STD).
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

Mode = Literal["square", "pad", "resize"]
_MODES = ("square", "pad", "resize")
_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, io.IOBase]
ImageLike = Union[Image.Image, np.ndarray]


@dataclasses.dataclass(frozen=True)
class ImageConfig:
  """How raw images become model inputs.

  Attributes:
    size: output side S; `preprocess` returns float32[S, S, 3].
    mode: "square" (shortest-edge resize + center crop, CLIP), "pad"
      (expand2square with the mean colour, then as "square"), "resize"
      (direct S×S resize, SigLIP).
    mean, std: per-channel statistics in [0, 1] units, RGB order.
    resample: PIL filter name ("bicubic" for both CLIP and SigLIP).
    crop: center-crop after the shortest-edge resize (CLIP's
      `do_center_crop`). Needed by "square" (else the output is not square);
      a no-op for "pad"; unused by "resize".
  """

  size: int
  mode: Mode = "square"
  mean: tuple[float, float, float] = CLIP_MEAN
  std: tuple[float, float, float] = CLIP_STD
  resample: str = "bicubic"
  crop: bool = True

  def __post_init__(self):
    if self.mode not in _MODES:
      raise ValueError(f"ImageConfig.mode must be one of {_MODES}, got {self.mode!r}")
    if self.resample not in _RESAMPLE:
      raise ValueError(f"ImageConfig.resample must be one of {tuple(_RESAMPLE)}, got {self.resample!r}")
    if not isinstance(self.size, int) or self.size <= 0:
      raise ValueError(f"ImageConfig.size must be a positive int, got {self.size!r}")
    if len(self.mean) != 3 or len(self.std) != 3:
      raise ValueError(f"ImageConfig.mean/std need 3 values (RGB), got {self.mean!r} / {self.std!r}")
    if any(s <= 0 for s in self.std):
      raise ValueError(f"ImageConfig.std must be positive, got {self.std!r}")
    if self.mode == "square" and not self.crop:
      raise ValueError(
          "ImageConfig(mode='square', crop=False) would not give a square image; "
          "use mode='resize' to squash or mode='pad' to letterbox"
      )
    # Tuples (not lists) so the config stays hashable.
    object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
    object.__setattr__(self, "std", tuple(float(s) for s in self.std))

  @property
  def pad_color(self) -> tuple[int, int, int]:
    """uint8 RGB fill for "pad": LLaVA's `tuple(int(x * 255) for x in image_mean)`.

    `int` truncates: CLIP -> (122, 116, 104), SigLIP -> (127, 127, 127).
    """
    return tuple(int(x * 255) for x in self.mean)


def image_config_for(kind: Literal["clip", "siglip"], size: int, mode: Mode | None = None) -> ImageConfig:
  """The preprocessing of a vision tower family.

  Args:
    kind: "clip" (OpenAI CLIP statistics) or "siglip" (mean = std = 0.5).
    size: output side S.
    mode: "square" | "pad" | "resize"; None picks the family's own HF
      processor: "square" for CLIP, "resize" for SigLIP. LLaVA-1.5 uses
      ("clip", 336, "pad").
  """
  if kind == "clip":
    return ImageConfig(size=size, mode=mode or "square", mean=CLIP_MEAN, std=CLIP_STD)
  if kind == "siglip":
    return ImageConfig(size=size, mode=mode or "resize", mean=SIGLIP_MEAN, std=SIGLIP_STD)
  raise ValueError(f"unknown vision kind {kind!r}; expected 'clip' or 'siglip'")


def _high_depth_to_l(img: Image.Image) -> Image.Image:
  """Scale 16/32-bit integer or float greyscale to 8-bit "L" (PIL would clip instead)."""
  a = np.asarray(img)
  if img.mode == "F":
    a = np.nan_to_num(a.astype(np.float64)) * 255.0  # float greyscale assumed in [0, 1]
  else:
    a = a.astype(np.float64) / 257.0  # 16-bit range (PIL opens 16-bit PNGs as "I" or "I;16")
  return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image, *, composite_alpha: bool = False) -> Image.Image:
  """Any PIL mode -> "RGB".

  Args:
    img: PIL image in any mode (1, L, LA, P, PA, RGB, RGBA, CMYK, YCbCr, I;16, I, F, ...).
    composite_alpha: False (default, LLaVA's `.convert("RGB")`): drop alpha.
      True (HF processors' `convert_to_rgb`): composite on white.
  """
  if img.mode.startswith("I") or img.mode == "F":
    img = _high_depth_to_l(img)
  if composite_alpha:
    has_alpha = "A" in img.getbands() or img.info.get("transparency") is not None
    if has_alpha:
      rgba = img.convert("RGBA")
      white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
      return Image.alpha_composite(white, rgba).convert("RGB")
  out = img if img.mode == "RGB" else img.convert("RGB")
  if "transparency" in out.info:
    # PIL carries a palette's transparent colour through convert("RGB"); drop it
    # so no later consumer (e.g. an HF processor) composites those pixels.
    out = out.copy() if out is img else out
    out.info.pop("transparency")
  return out


def load_image(source: ImageSource, *, composite_alpha: bool = False) -> Image.Image:
  """Decode an image file (path, encoded bytes or a binary file object) to an RGB PIL image.

  A path may be local or on a bucket (`gs://…`, read whole through `llava_jax.storage`).
  Raises ValueError naming the source (a path, or the byte count) when it
  cannot be decoded; callers turn that into a `bad_image` rejection; a missing file
  raises FileNotFoundError (an OSError).
  """
  from llava_jax import storage

  if isinstance(source, (bytes, bytearray, memoryview)):
    name, fp = f"<{len(source)} bytes>", io.BytesIO(bytes(source))
  elif isinstance(source, io.IOBase):
    name, fp = repr(source), source
  elif storage.is_remote(source):
    name = os.fspath(source)
    fp = io.BytesIO(storage.read_bytes(name))  # one GET; FileNotFoundError if absent
  else:
    name, fp = os.fspath(source), os.fspath(source)
  try:
    with Image.open(fp) as img:
      img.load()  # decode now, so a truncated file fails here rather than later
      return to_rgb(img, composite_alpha=composite_alpha)
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ValueError(f"cannot decode image {name}: {type(e).__name__}: {e}") from e


def expand2square(img: Image.Image, background_rgb: tuple[int, int, int]) -> Image.Image:
  """LLaVA's letterbox: centre `img` on a max(W, H) square filled with `background_rgb`.

  The offset is `(long - short) // 2` (LLaVA's), so an odd margin puts the
  extra pixel at the bottom/right. A square input is returned unchanged.
  """
  width, height = img.size
  if width == height:
    return img
  side = max(width, height)
  canvas = Image.new(img.mode, (side, side), tuple(background_rgb))
  canvas.paste(img, (0, (side - height) // 2) if width > height else ((side - width) // 2, 0))
  return canvas


def _shortest_edge_size(width: int, height: int, size: int) -> tuple[int, int]:
  """(W, H) with the short side = size and the long side truncated, as HF's `get_resize_output_image_size`."""
  if width <= height:
    return size, int(size * height / width)
  return int(size * width / height), size


def preprocess(img: ImageLike, cfg: ImageConfig) -> np.ndarray:
  """One image -> normalized pixels.

  Args:
    img: PIL image (any mode, converted with `to_rgb`) or uint8[H, W, 3] /
      uint8[H, W] array.
    cfg: the ImageConfig.

  Returns:
    float32[S, S, 3] with S = cfg.size, `(x / 255 - mean) / std` per channel.
  """
  if isinstance(img, np.ndarray):
    if img.dtype != np.uint8 or img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[-1] != 3):
      raise ValueError(f"preprocess expects uint8[H, W, 3] or uint8[H, W], got {img.dtype}{list(img.shape)}")
    img = Image.fromarray(img)
  img = to_rgb(img)
  if min(img.size) < 1:
    raise ValueError(f"preprocess got an empty image of size {img.size}")
  resample = _RESAMPLE[cfg.resample]
  s = cfg.size
  if cfg.mode == "resize":
    img = img.resize((s, s), resample=resample)
  else:
    if cfg.mode == "pad":
      img = expand2square(img, cfg.pad_color)
    img = img.resize(_shortest_edge_size(*img.size, s), resample=resample)
    if cfg.crop:
      w, h = img.size
      top, left = (h - s) // 2, (w - s) // 2
      img = img.crop((left, top, left + s, top + s))
  x = (np.asarray(img, dtype=np.uint8).astype(np.float64) * (1 / 255)).astype(np.float32)
  return (x - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)


def preprocess_batch(images: list[ImageLike], cfg: ImageConfig) -> np.ndarray:
  """Several images -> float32[B, S, S, 3] (B = len(images), may be 0)."""
  out = np.empty((len(images), cfg.size, cfg.size, 3), np.float32)
  for i, img in enumerate(images):
    out[i] = preprocess(img, cfg)
  return out
