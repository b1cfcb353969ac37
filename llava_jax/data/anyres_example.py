"""Any-resolution images of one training example: the per-slot budget, tiles and gather layout.

An anyres model (``LlavaConfig.image_grid_pinpoints``: LLaVA-NeXT, OneVision) compiles
its train step once, for fixed shapes: every image slot holds P = ``cfg.tiles_per_image``
tiles (``model.anyres.max_tiles_per_image``) and packs to at most N =
``cfg.image_token_budget`` image tokens (``model.anyres.max_image_tokens``). A row of M
slots therefore costs M * P tiles through the tower whatever the images' sizes, and a
batch of mixed resolutions compiles once. An image whose best grid needs more tiles
or tokens than a slot holds (a wide panorama on OneVision's 6x6 grid under a 10-tile
budget) is, by ``data.over_budget``:

- ``"reject"`` (default): the sample is rejected as ``image_over_budget``, counted and
  logged with its id and what it needed, as every other bad record (``data.policy``);
- ``"downscale"``: the image is resized, keeping its aspect ratio (the tower's
  resampling filter), in steps of 10% of its sides until its grid fits, and trained at
  that size: the model sees the smaller image exactly as the HF processor would have.
  Each downscale is counted (``image_downscaled``) and logged with the sample id, the
  sizes and the grids. An image never fits only if even a 1x1-pixel version does not
  (a budget below the smallest pinpoint's grid): then it is rejected.

OneVision configs (``anyres_max_N``) take a sample of several images as transformers
does: each image is one tile, padded to a square, and packs to its base features plus
``image_newline`` (``models.anyres.square_images``); the budget never binds then.

Nothing is ever cropped. Tiles and token layout are those of inference
(``infer.loading.LoadedModel``): ``data.anyres.preprocess_anyres`` and
``models.anyres.feature_layout`` of the (possibly downscaled) size, so a model trained
here answers through the same arithmetic.

Keys an anyres example carries (M slots; unpadded examples for packing: the I images):

    pixel_values  float32[M, P, S, S, 3]  each image's tiles, base first, zero tiles after
    image_mask    bool[M]                 True on slots holding an image
    image_index   int32[M, N, K]          ``models.anyres.ImageLayout`` of each slot
    image_weight  float32[M, N, K]
    image_tokens  int32[M]                packed tokens per slot (0: empty slot)
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Literal

import numpy as np

from llava_jax.data.anyres import num_tiles, pad_tiles, preprocess_anyres

if TYPE_CHECKING:  # the train step imports LAYOUT_KEYS, and must not need PIL (benchmarks/accelerator.py)
  from llava_jax.data.images import ImageConfig

OverBudget = Literal["reject", "downscale"]
OVER_BUDGET_POLICIES = ("reject", "downscale")
LAYOUT_KEYS = ("image_index", "image_weight", "image_tokens")  # per-slot keys besides pixel_values / image_mask
_STEP = 0.9  # downscale: each try shrinks both sides to 90%
_MAX_TRIES = 200  # 0.9**200 ~ 7e-10: any image reaches 1x1 first


def sources_per_token(cfg) -> int:
  """K of the layout: 4 with OneVision's bilinear shrink, else 1."""
  from llava_jax.models.anyres import max_patches

  return 1 if max_patches(cfg) is None else 4


def over_budget(size: tuple[int, int], cfg) -> str | None:
  """None if an image of ``size`` (height, width) fits one slot of ``cfg``, else what it exceeds."""
  from llava_jax.data.anyres import grid_shape
  from llava_jax.models.anyres import num_image_tokens

  tiles = num_tiles(size, cfg.image_grid_pinpoints, cfg.vision.image_size)
  if tiles > cfg.tiles_per_image:
    rows, cols = grid_shape(size, cfg.image_grid_pinpoints, cfg.vision.image_size)
    return f"{tiles} tiles ({rows}x{cols} grid + base) > max_tiles_per_image={cfg.tiles_per_image}"
  tokens = num_image_tokens(size, cfg)
  if tokens > cfg.image_token_budget:
    return f"{tokens} image tokens > max_image_tokens={cfg.image_token_budget}"
  return None


def downscaled_size(size: tuple[int, int], cfg) -> tuple[int, int] | None:
  """The largest 0.9**k-scaled (height, width) of ``size`` that fits a slot; None if none does."""
  h, w = size
  for k in range(1, _MAX_TRIES + 1):
    f = _STEP**k
    new = (max(1, int(h * f)), max(1, int(w * f)))
    if over_budget(new, cfg) is None:
      return new
    if new == (1, 1):
      return None
  return None


def fit_size(size: tuple[int, int], cfg, policy: OverBudget) -> tuple[tuple[int, int] | None, str | None, str | None]:
  """Where an image of ``size`` (height, width) goes under the slot budget and ``policy``:
  (the size it is tiled at, a downscale note or None, an ``image_over_budget`` detail or
  None). The training pipeline and ``data.inspect`` both count by it."""
  why = over_budget(size, cfg)
  if why is None:
    return size, None, None
  fitted = downscaled_size(size, cfg) if policy == "downscale" else None
  if fitted is None:
    hint = "" if policy == "downscale" else " (data.over_budget='downscale' would shrink it to fit)"
    return None, None, f"{size[0]}x{size[1]} (HxW), needs {why}{hint}"
  return fitted, f"{size[0]}x{size[1]} needs {why}; downscaled to {fitted[0]}x{fitted[1]}", None


@dataclasses.dataclass(frozen=True)
class AnyresImages:
  """One example's anyres images (I of them), or why they cannot be used (``error``)."""

  pixel_values: np.ndarray | None = None  # float32[I, P, S, S, 3]
  image_index: np.ndarray | None = None  # int32[I, N, K]
  image_weight: np.ndarray | None = None  # float32[I, N, K]
  image_tokens: np.ndarray | None = None  # int32[I]
  downscaled: tuple[str, ...] = ()  # one note per downscaled image
  error: str | None = None  # the image_over_budget detail


def prepare_images(images, cfg, image_config: ImageConfig, policy: OverBudget = "reject") -> AnyresImages:
  """Decoded RGB PIL images of one example -> tiles and layout under ``cfg``'s budget.

  Args:
    images: PIL images (``images.load_image``), in the order of their placeholders.
    cfg: the anyres ``LlavaConfig``.
    image_config: the tower's preprocessing (tile side S = ``image_config.size``).
    policy: what an image over the budget gets (module docstring).
  """
  from llava_jax.data.anyres import preprocess_square
  from llava_jax.data.images import _RESAMPLE
  from llava_jax.models.anyres import feature_layout, square_images

  if policy not in OVER_BUDGET_POLICIES:
    raise ValueError(f"over_budget must be one of {OVER_BUDGET_POLICIES}, got {policy!r}")
  p, n, k = cfg.tiles_per_image, cfg.image_token_budget, sources_per_token(cfg)
  s = image_config.size
  out = AnyresImages(
      np.zeros((len(images), p, s, s, 3), np.float32),
      np.zeros((len(images), n, k), np.int32),
      np.zeros((len(images), n, k), np.float32),
      np.zeros((len(images),), np.int32),
  )
  notes = []
  square = square_images(cfg, len(images))  # OneVision, several images: one padded tile each
  for i, img in enumerate(images):
    if square:
      tiles, size = preprocess_square(img, image_config)
      out.pixel_values[i] = pad_tiles(tiles, p)
      index, weight = feature_layout(size, cfg, square=True)
      out.image_index[i, : len(index)], out.image_weight[i, : len(index)] = index, weight
      out.image_tokens[i] = len(index)
      continue
    size = (img.size[1], img.size[0])
    fitted, note, error = fit_size(size, cfg, policy)
    if error is not None:
      return AnyresImages(error=f"image {i} of {len(images)}, {error}")
    if note is not None:
      img = img.resize((fitted[1], fitted[0]), resample=_RESAMPLE[image_config.resample])
      notes.append(f"image {i} of {len(images)}: {note}")
    tiles, size = preprocess_anyres(img, image_config, cfg.image_grid_pinpoints)
    out.pixel_values[i] = pad_tiles(tiles, p)
    index, weight = feature_layout(size, cfg)
    out.image_index[i, : len(index)], out.image_weight[i, : len(index)] = index, weight
    out.image_tokens[i] = len(index)
  return dataclasses.replace(out, downscaled=tuple(notes))


def slot_arrays(images: AnyresImages, slots: int | None) -> dict[str, np.ndarray]:
  """The example keys of ``images`` (module docstring), padded with empty slots to ``slots``
  (None: unpadded, for packing)."""
  arrays = {
      "pixel_values": images.pixel_values,
      "image_index": images.image_index,
      "image_weight": images.image_weight,
      "image_tokens": images.image_tokens,
  }
  if slots is None:
    return arrays
  n = images.pixel_values.shape[0]
  padded = {k: np.concatenate([v, np.zeros((slots - n,) + v.shape[1:], v.dtype)]) for k, v in arrays.items()}
  padded["image_mask"] = np.arange(slots) < n
  return padded


def empty_slots(cfg, image_config: ImageConfig, slots: int) -> dict[str, np.ndarray]:
  """The image keys of a row with no images (``pipeline.empty_example``)."""
  empty = AnyresImages(
      np.zeros((0, cfg.tiles_per_image, image_config.size, image_config.size, 3), np.float32),
      np.zeros((0, cfg.image_token_budget, sources_per_token(cfg)), np.int32),
      np.zeros((0, cfg.image_token_budget, sources_per_token(cfg)), np.float32),
      np.zeros((0,), np.int32),
  )
  return slot_arrays(empty, slots)
