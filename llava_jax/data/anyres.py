"""Any-resolution ("anyres") image tiling of LLaVA-NeXT (v1.6) and LLaVA-OneVision.

An image of any size becomes ``1 + rows * cols`` tiles of the vision tower's side S:

1. ``select_best_resolution`` picks the grid pinpoint ``(H*, W*)`` (multiples of S) that
   keeps the most of the image's pixels and, on a tie, wastes the fewest;
2. the image is resized, keeping its aspect ratio, to fit ``(H*, W*)``
   (``resize_for_patching``: the fitted side exactly, the other rounded up), and padded
   with black, centred (an odd margin puts the extra pixel at the bottom/right);
3. the padded image is cut into S×S tiles, row-major;
4. the whole image, resized to S×S ignoring its aspect ratio, goes first ("base" tile).

Every tile then goes through ``llava_jax.data.images.preprocess`` with the tower's
``ImageConfig`` (a no-op resize/crop on an S×S tile, then ``(x / 255 - mean) / std``), so
the arithmetic is the one the rest of the project uses. The numbers equal
transformers' ``LlavaNextImageProcessorPil`` (NeXT: CLIP statistics, ``mode="square"``)
and ``LlavaOnevisionImageProcessorPil`` (OneVision: SigLIP statistics, ``mode="resize"``)
exactly (``tests/data/test_anyres.py``); both resize uint8 images with PIL (bicubic).

Colour conversion: as ``images.preprocess``, alpha is dropped by default (LLaVA's
``convert("RGB")``); HF processors composite it on white, which ``composite_alpha=True``
does. OneVision's multi-image mode (several images in one sample: each padded to a square,
one tile, no grid) is ``preprocess_square``.

The model re-assembles the tile features with ``llava_jax.models.anyres``, which needs
the original ``image_size`` this module returns.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:  # the geometry below is imported by the model (models/anyres), which must
  # not need PIL: an accelerator machine may lack it (benchmarks/accelerator.py)
  from PIL import Image

  from llava_jax.data.images import ImageConfig, ImageLike

Size = tuple[int, int]  # (height, width), as HF's image_sizes

# transformers' defaults: LlavaNextConfig / LlavaNextImageProcessor (S = 336) and
# LlavaOnevisionConfig / LlavaOnevisionImageProcessor ("anyres_max_9", S = 384, 1..6 x 1..6).
LLAVA_NEXT_PINPOINTS: tuple[Size, ...] = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
ONEVISION_PINPOINTS: tuple[Size, ...] = tuple((384 * i, 384 * j) for i in range(1, 7) for j in range(1, 7))


def check_pinpoints(grid_pinpoints: Sequence[Sequence[int]], tile: int) -> tuple[Size, ...]:
  """Validated ``((H, W), ...)``: a non-empty list of positive multiples of ``tile``."""
  points = tuple(tuple(int(x) for x in p) for p in grid_pinpoints)
  if not points:
    raise ValueError("image_grid_pinpoints is empty; expected [[height, width], ...]")
  for p in points:
    if len(p) != 2 or min(p) <= 0 or p[0] % tile or p[1] % tile:
      raise ValueError(
          f"image grid pinpoint {list(p)} is not a [height, width] pair of positive multiples of the "
          f"tile size {tile} (all pinpoints: {[list(q) for q in points]})"
      )
  return points


def select_best_resolution(original_size: Size, grid_pinpoints: Sequence[Sequence[int]]) -> Size:
  """The pinpoint ``(H, W)`` that keeps most of an ``(h, w)`` image, then wastes least.

  Float64 arithmetic and ``int`` truncation exactly as transformers' (and LLaVA-NeXT's)
  ``select_best_resolution``, whose ties and roundings decide the tile grid.
  """
  original_height, original_width = original_size
  best_fit = None
  max_effective, min_wasted = 0, float("inf")
  for height, width in grid_pinpoints:
    scale = min(width / original_width, height / original_height)
    downscaled_width, downscaled_height = int(original_width * scale), int(original_height * scale)
    effective = min(downscaled_width * downscaled_height, original_width * original_height)
    wasted = width * height - effective
    if effective > max_effective or (effective == max_effective and wasted < min_wasted):
      max_effective, min_wasted = effective, wasted
      best_fit = (int(height), int(width))
  if best_fit is None:
    raise ValueError(f"no grid pinpoint fits image size {original_size} (pinpoints {grid_pinpoints})")
  return best_fit


def resize_for_patching(original_size: Size, target: Size) -> Size:
  """``(h, w)`` the image takes inside ``target`` keeping its aspect ratio (HF's ``get_patch_output_size``)."""
  original_height, original_width = original_size
  target_height, target_width = target
  scale_w, scale_h = target_width / original_width, target_height / original_height
  if scale_w < scale_h:
    return min(math.ceil(original_height * scale_w), target_height), target_width
  return target_height, min(math.ceil(original_width * scale_h), target_width)


def grid_shape(image_size: Size, grid_pinpoints: Sequence[Sequence[int]], tile: int) -> Size:
  """``(rows, cols)`` of tiles an ``(h, w)`` image is cut into (HF's ``get_anyres_image_grid_shape``)."""
  height, width = select_best_resolution(image_size, grid_pinpoints)
  return height // tile, width // tile


def num_tiles(image_size: Size, grid_pinpoints: Sequence[Sequence[int]], tile: int) -> int:
  """Tiles of one image, the base tile included (HF's ``image_size_to_num_patches``)."""
  rows, cols = grid_shape(image_size, grid_pinpoints, tile)
  return 1 + rows * cols


def max_tiles(grid_pinpoints: Sequence[Sequence[int]], tile: int) -> int:
  """The most tiles any image can need: 1 + the largest pinpoint's grid."""
  return 1 + max((h // tile) * (w // tile) for h, w in grid_pinpoints)


def tile_images(img: Image.Image, grid_pinpoints: Sequence[Sequence[int]], tile: int, resample: str) -> list:
  """RGB PIL image -> [base, tile_0, ...]: S×S uint8 PIL images, the grid row-major."""
  from PIL import Image

  from llava_jax.data.images import _RESAMPLE

  width, height = img.size
  best = select_best_resolution((height, width), grid_pinpoints)
  new_h, new_w = resize_for_patching((height, width), best)
  filt = _RESAMPLE[resample]
  canvas = Image.new("RGB", (best[1], best[0]), (0, 0, 0))
  # HF pads with divmod(target - size, 2): the remainder goes after (bottom/right).
  canvas.paste(img.resize((new_w, new_h), resample=filt), ((best[1] - new_w) // 2, (best[0] - new_h) // 2))
  tiles = [img.resize((tile, tile), resample=filt)]
  for top in range(0, best[0], tile):
    for left in range(0, best[1], tile):
      tiles.append(canvas.crop((left, top, left + tile, top + tile)))
  return tiles


def preprocess_anyres(
    img: ImageLike,
    cfg: ImageConfig,
    grid_pinpoints: Sequence[Sequence[int]],
    *,
    composite_alpha: bool = False,
) -> tuple[np.ndarray, Size]:
  """One image -> its normalised tiles and its original size.

  Args:
    img: PIL image (any mode) or uint8[H, W, 3] / uint8[H, W] array.
    cfg: the vision tower's ``ImageConfig``; ``cfg.size`` is the tile side S.
    grid_pinpoints: ``[[H, W], ...]`` candidate resolutions, multiples of S (the model
      config's ``image_grid_pinpoints``).
    composite_alpha: composite transparency on white (HF processors) instead of dropping
      it (LLaVA).

  Returns:
    ``(tiles, (h, w))``: float32[1 + rows * cols, S, S, 3] (base tile first, NHWC,
    normalised as ``images.preprocess``) and the original image's (height, width).
  """
  from PIL import Image

  from llava_jax.data.images import preprocess, to_rgb

  if isinstance(img, np.ndarray):
    if img.dtype != np.uint8 or img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[-1] != 3):
      raise ValueError(f"preprocess_anyres expects uint8[H, W, 3] or uint8[H, W], got {img.dtype}{list(img.shape)}")
    img = Image.fromarray(img)
  img = to_rgb(img, composite_alpha=composite_alpha)
  if min(img.size) < 1:
    raise ValueError(f"preprocess_anyres got an empty image of size {img.size}")
  points = check_pinpoints(grid_pinpoints, cfg.size)
  tiles = tile_images(img, points, cfg.size, cfg.resample)
  out = np.empty((len(tiles), cfg.size, cfg.size, 3), np.float32)
  for i, t in enumerate(tiles):
    out[i] = preprocess(t, cfg)
  return out, (img.size[1], img.size[0])


def preprocess_square(img: ImageLike, cfg: ImageConfig, *, composite_alpha: bool = False) -> tuple[np.ndarray, Size]:
  """OneVision's multi-image mode (``models.anyres.square_images``): the image padded to a
  square with the mean colour (``int(x * 255)``, centred), resized to S x S, as one tile.

  Returns ``(tiles, (h, w))``: float32[1, S, S, 3] and the original (height, width), as
  ``preprocess_anyres``. Equal to ``LlavaOnevisionImageProcessorPil`` with several images
  per sample (``pad_to_square``, then resize; ``tests/data/test_anyres.py``).
  """
  import dataclasses

  from PIL import Image

  from llava_jax.data.images import preprocess, to_rgb

  if isinstance(img, np.ndarray):
    img = Image.fromarray(img)
  img = to_rgb(img, composite_alpha=composite_alpha)
  return preprocess(img, dataclasses.replace(cfg, mode="pad", crop=True))[None], (img.size[1], img.size[0])


def pad_tiles(tiles: np.ndarray, budget: int) -> np.ndarray:
  """float32[n, S, S, 3] -> float32[budget, S, S, 3], zero tiles appended (HF pads with zeros too).

  Raises ValueError when the image has more tiles than the budget (the model config's
  ``tiles_per_image``).
  """
  n = tiles.shape[0]
  if n > budget:
    raise ValueError(f"image has {n} tiles, more than the budget of {budget} tiles per image")
  return np.concatenate([tiles, np.zeros((budget - n,) + tiles.shape[1:], tiles.dtype)])
