"""Any-resolution feature packing (LLaVA-NeXT ``spatial_unpad``, OneVision ``anyres_max_N``).

An image is ``1 + rows * cols`` tiles (``llava_jax.data.anyres``). After the tower and
projector each tile is ``n = (S / patch)**2`` features; transformers'
``pack_image_features`` then lays the grid tiles out as one ``(rows * p) x (cols * p)``
feature map (p = S / patch), crops the rows or columns that were black padding
(``unpad_image``, back to the original aspect ratio), for OneVision shrinks it bilinearly
(``align_corners=False``, no antialias) when it holds more than ~N tiles' worth of
features, appends ``image_newline`` after every row, and puts the base tile's ``n``
features first.

Which source features make each output token depends only on the image's original size,
with float64 roundings (``select_best_resolution``, ``round(x, 7)``, ``//`` by a square
root) that must be reproduced exactly. So it is computed on the host, once per image, by
``image_layout``, as a fixed-shape gather: output token ``t`` of image ``i`` is
``sum_k weight[i, t, k] * table_i[index[i, t, k]]`` over the image's table of
``P * n`` tile features plus ``image_newline`` (row ``P * n``). NeXT needs one source per
token (K = 1), OneVision's bilinear shrink four (K = 4). The model does the gather.

Contract (fixed shapes, so a batch of mixed resolutions compiles once):

- ``pixel_values``: float32[I, P, S, S, 3] (or [B, M, P, S, S, 3], M image slots per
  row), P = ``cfg.tiles_per_image`` (``max_tiles_per_image``, default the largest
  pinpoint's grid + 1); an image's tiles first, zero tiles after
  (``data.anyres.pad_tiles``).
- ``image_layout``: ``ImageLayout(index int32[I, N, K], weight float32[I, N, K],
  num_tokens int32[I])`` from ``image_layout(image_sizes, cfg)``, N =
  ``cfg.image_token_budget`` (``max_image_tokens``, default the most any size can need).
  Tokens past ``num_tokens`` are padding (weight 0); an empty image slot has
  ``num_tokens = 0``.
- ``input_ids`` holds ``num_tokens[i]`` image placeholders for image i, in order (HF's
  processor expands ``<image>`` the same way; ``num_image_tokens(size, cfg)`` says how
  many). Counts are checked as for LLaVA-1.5.

Einsum letters: I images, P tiles per image, n features per tile, N packed tokens per
image, K sources per token, E LLM embed.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from llava_jax.data.anyres import Size, check_pinpoints, grid_shape
from llava_jax.data.anyres import max_tiles as _max_tiles


class ImageLayout(NamedTuple):
  """Where each packed image token comes from (see the module docstring)."""

  index: np.ndarray  # int32[I, N, K] into the image's [P * n + 1] table
  weight: np.ndarray  # float32[I, N, K]; 0 for padding tokens
  num_tokens: np.ndarray  # int32[I]


def max_patches(cfg) -> int | None:
  """N of ``vision_aspect_ratio = "anyres_max_N"``; None without a shrink (NeXT)."""
  ratio = cfg.vision_aspect_ratio
  if ratio is None:
    return None
  # transformers parses int(ratio.strip("anyres_max_")); the prefix is checked here instead.
  if not ratio.startswith("anyres_max_") or not ratio[len("anyres_max_") :].isdigit():
    raise ValueError(f"vision_aspect_ratio {ratio!r}: expected 'anyres_max_<N>' (OneVision) or None (NeXT)")
  return int(ratio[len("anyres_max_") :])


def check_config(cfg) -> tuple[Size, ...]:
  """Validates a LlavaConfig's anyres fields; returns the pinpoints as a tuple of (H, W)."""
  v = cfg.vision
  side = v.image_size // v.patch_size
  if v.num_features != side * side:
    raise ValueError(
        f"anyres packs tiles of {side}x{side} features, but the vision tower gives {v.num_features} per tile "
        f"(select_feature={v.select_feature!r}); drop the class token (vision_feature_select_strategy 'default')"
    )
  points = check_pinpoints(cfg.image_grid_pinpoints, v.image_size)
  n = max_patches(cfg)
  if n is not None and n < 1:
    raise ValueError(f"vision_aspect_ratio {cfg.vision_aspect_ratio!r}: N must be at least 1")
  for name in ("max_tiles_per_image", "max_image_tokens"):
    value = getattr(cfg, name)
    if value is not None and (not isinstance(value, int) or value < 1):
      raise ValueError(f"{name} must be a positive int or None, got {value!r}")
  return points


def max_tiles(cfg) -> int:
  """The most tiles (base included) any image needs under ``cfg``'s pinpoints."""
  return _max_tiles(cfg.image_grid_pinpoints, cfg.vision.image_size)


def max_tokens(cfg) -> int:
  """An upper bound on the packed tokens of any image that fits the tile budget (the default
  token budget): only pinpoints whose grid fits ``cfg.tiles_per_image`` count."""
  v = cfg.vision
  p = v.image_size // v.patch_size
  points = [
      (h, w)
      for h, w in cfg.image_grid_pinpoints
      if 1 + (h // v.image_size) * (w // v.image_size) <= cfg.tiles_per_image
  ]
  if not points:
    raise ValueError(
        f"max_tiles_per_image={cfg.tiles_per_image} holds no pinpoint's grid (the smallest needs "
        f"{_max_tiles([min(cfg.image_grid_pinpoints, key=lambda q: q[0] * q[1])], v.image_size)} tiles)"
    )
  rows = max(h // v.image_size for h, _ in points) * p
  full = max((h // v.image_size * p) * (w // v.image_size * p + 1) for h, w in points)
  n = max_patches(cfg)
  if n is not None:
    # Unshrunk: h * w <= 1.1**2 * n * p**2; shrunk: h' * w' <= n * p**2; plus one newline a row.
    full = min(full, math.floor(1.21 * n * p * p) + rows)
  return v.num_features + full


def _unpad_box(original: Size, height: int, width: int) -> tuple[int, int, int, int]:
  """(top, bottom, left, right) of the un-padded part of a height x width feature grid.

  transformers' ``unpad_image``, float64 roundings included.
  """
  original_height, original_width = original
  if original_width / original_height > width / height:
    new_height = int(round(original_height * (width / original_width), 7))
    pad = (height - new_height) // 2
    return pad, height - pad, 0, width
  new_width = int(round(original_width * (height / original_height), 7))
  pad = (width - new_width) // 2
  return 0, height, pad, width - pad


def _linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """torch ``interpolate(mode="bilinear", align_corners=False)`` along one axis, in float32.

  Returns (i0, i1, w0, w1), each [out_size]: output o = w0 * x[i0] + w1 * x[i1].
  The source coordinate ``scale * (o + 0.5) - 0.5`` is rounded once, as the fused
  multiply-add PyTorch's CPU kernel compiles it to: rounding the product first moves
  lambda by ~1e-5 at coordinates ~100 (measured 7e-6 on OneVision-sized grids).
  """
  scale = np.float32(in_size) / np.float32(out_size)
  exact = np.float64(scale) * (np.arange(out_size, dtype=np.float64) + 0.5) - 0.5  # exact in float64
  src = np.maximum(exact.astype(np.float32), np.float32(0))
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  lam = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
  i1 = np.where(i0 < in_size - 1, i0 + 1, i0)
  return i0, i1, np.float32(1) - lam, lam


def square_images(cfg, images_in_sample: int) -> bool:
  """OneVision's multi-image mode: in a sample of several images (``anyres_max_N``
  configs) each image is one tile, padded to a square (``data.anyres.preprocess_square``),
  and packs to its ``n`` base features plus ``image_newline`` (transformers:
  ``batch_num_images[i] > 1`` -> no patching). LLaVA-NeXT tiles every image."""
  return max_patches(cfg) is not None and images_in_sample > 1


def square_flags(cfg, image_mask) -> np.ndarray:
  """bool[B, M]: which slots of [B, M] rows (``image_mask``) take OneVision's multi-image mode."""
  mask = np.asarray(image_mask, bool)
  counts = mask.sum(axis=-1, keepdims=True)
  return mask & (counts > 1) if max_patches(cfg) is not None else np.zeros_like(mask)


def feature_layout(image_size: Size, cfg, square: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """One image's gather: (index int32[T, K], weight float32[T, K]), T its packed tokens.

  Args:
    image_size: the original (height, width), as ``data.anyres.preprocess_anyres`` returns.
    cfg: an anyres ``LlavaConfig``.
    square: the image is one padded square tile (``square_images``): its base features
      then ``image_newline``.
  """
  v = cfg.vision
  tile, p, n = v.image_size, v.image_size // v.patch_size, v.num_features
  budget_tiles = cfg.tiles_per_image
  if square:
    k = 1 if max_patches(cfg) is None else 4
    index, weight = np.zeros((n + 1, k), np.int32), np.zeros((n + 1, k), np.float32)
    index[:n, 0], index[n, 0], weight[:, 0] = np.arange(n), budget_tiles * n, 1
    return index, weight
  rows, cols = grid_shape(tuple(int(x) for x in image_size), cfg.image_grid_pinpoints, tile)
  if 1 + rows * cols > budget_tiles:
    raise ValueError(
        f"image of size {tuple(image_size)} needs {1 + rows * cols} tiles ({rows}x{cols} + base), more than "
        f"max_tiles_per_image={budget_tiles}"
    )
  top, bottom, left, right = _unpad_box(image_size, rows * p, cols * p)
  h, w = bottom - top, right - left
  ys, xs = np.arange(top, bottom), np.arange(left, right)  # source grid rows / columns
  taps_y = (ys, ys, np.ones(h, np.float32), np.zeros(h, np.float32))
  taps_x = (xs, xs, np.ones(w, np.float32), np.zeros(w, np.float32))
  n_max = max_patches(cfg)
  k = 1 if n_max is None else 4
  if n_max is not None:
    ratio = math.sqrt(h * w / (n_max * p**2))
    if ratio > 1.1:
      out_h, out_w = int(h // ratio), int(w // ratio)
      iy0, iy1, wy0, wy1 = _linear_taps(h, out_h)
      ix0, ix1, wx0, wx1 = _linear_taps(w, out_w)
      taps_y, taps_x = (top + iy0, top + iy1, wy0, wy1), (left + ix0, left + ix1, wx0, wx1)
  (y0, y1, wy0, wy1), (x0, x1, wx0, wx1) = taps_y, taps_x

  def source(y, x):  # grid position -> row of the [P * n + 1] table
    return (1 + (y // p) * cols + x // p) * n + (y % p) * p + x % p

  grid_idx = [source(y[:, None], x[None, :]) for y in (y0, y1) for x in (x0, x1)]
  grid_w = [a[:, None] * b[None, :] for a in (wy0, wy1) for b in (wx0, wx1)]
  grid_idx, grid_w = np.stack(grid_idx[:k], -1), np.stack(grid_w[:k], -1)  # [h', w', K]
  newline = np.zeros((grid_idx.shape[0], 1, k), np.int64)
  newline[..., 0] = budget_tiles * n
  newline_w = np.zeros((grid_idx.shape[0], 1, k), np.float32)
  newline_w[..., 0] = 1
  grid_idx = np.concatenate([grid_idx, newline], axis=1).reshape(-1, k)
  grid_w = np.concatenate([grid_w, newline_w], axis=1).reshape(-1, k)
  base_idx = np.zeros((n, k), np.int64)
  base_idx[:, 0] = np.arange(n)
  base_w = np.zeros((n, k), np.float32)
  base_w[:, 0] = 1
  return np.concatenate([base_idx, grid_idx]).astype(np.int32), np.concatenate([base_w, grid_w])


def num_image_tokens(image_size: Size, cfg, square: bool = False) -> int:
  """Image placeholders an image of ``image_size`` (height, width) takes in ``input_ids``
  (``square``: OneVision's multi-image mode, ``square_images``)."""
  return feature_layout(image_size, cfg, square)[0].shape[0]


def image_layout(image_sizes, cfg, image_mask=None, square=None) -> ImageLayout:
  """Host-side gather layout of a batch of images.

  Args:
    image_sizes: int[I, 2] (or [B, M, 2]) original (height, width) of each image.
    cfg: an anyres ``LlavaConfig``.
    image_mask: bool[I] (or [B, M]); False marks an empty slot (its sizes are ignored).
    square: bool[I] (or [B, M]): images in OneVision's multi-image mode (``square_flags``);
      None: none.
  Returns:
    ``ImageLayout`` with N = ``cfg.image_token_budget``; flattened to I images.
  """
  sizes = np.asarray(image_sizes).reshape(-1, 2)
  mask = np.ones(len(sizes), bool) if image_mask is None else np.asarray(image_mask, bool).reshape(-1)
  if mask.shape[0] != sizes.shape[0]:
    raise ValueError(f"image_mask has {mask.shape[0]} slots but image_sizes has {sizes.shape[0]} images")
  flat_square = np.zeros(len(sizes), bool) if square is None else np.asarray(square, bool).reshape(-1)
  if flat_square.shape[0] != sizes.shape[0]:
    raise ValueError(f"square has {flat_square.shape[0]} slots but image_sizes has {sizes.shape[0]} images")
  budget, k = cfg.image_token_budget, 1 if max_patches(cfg) is None else 4
  index = np.zeros((len(sizes), budget, k), np.int32)
  weight = np.zeros((len(sizes), budget, k), np.float32)
  counts = np.zeros(len(sizes), np.int32)
  for i, (size, real) in enumerate(zip(sizes, mask)):
    if not real:
      continue
    idx, w = feature_layout((int(size[0]), int(size[1])), cfg, bool(flat_square[i]))
    if idx.shape[0] > budget:
      raise ValueError(
          f"image {i} of size {tuple(int(s) for s in size)} packs to {idx.shape[0]} image tokens, more than "
          f"max_image_tokens={budget}"
      )
    index[i, : idx.shape[0]], weight[i, : idx.shape[0]], counts[i] = idx, w, idx.shape[0]
  return ImageLayout(index, weight, counts)


def pack_image_features(tile_features, image_newline, layout: ImageLayout):
  """Tile features -> packed image tokens (transformers' ``pack_image_features``).

  Args:
    tile_features: float[I, P, n, E] projected features of every tile slot.
    image_newline: float[E].
    layout: ``ImageLayout`` of the same I images (index/weight [I, N, K]).
  Returns:
    float[I, N, E]; tokens past ``layout.num_tokens`` are zero.
  """
  i, p, n, e = tile_features.shape
  newline = jnp.broadcast_to(image_newline.astype(tile_features.dtype), (i, 1, e))
  table = jnp.concatenate([tile_features.reshape(i, p * n, e), newline], axis=1)
  index, weight = jnp.asarray(layout.index), jnp.asarray(layout.weight).astype(tile_features.dtype)
  gather = jax.vmap(lambda t, idx: t[idx])  # [P*n+1, E], [N] -> [N, E]
  out = weight[:, :, 0, None] * gather(table, index[:, :, 0])
  for k in range(1, index.shape[-1]):  # K gathers of [I, N, E], never an [I, N, K, E] buffer
    out = out + weight[:, :, k, None] * gather(table, index[:, :, k])
  return out


def check_anyres_tokens(placeholders_per_row, num_tokens, images_per_row: int | None = None):
  """Raises ValueError unless the placeholders equal the images' packed token counts.

  Args:
    placeholders_per_row: int[B], image placeholders in each sample.
    num_tokens: int[I], packed tokens per image slot (0 for empty slots).
    images_per_row: M when images come as [B, M] slots (checked row by row), else None
      (only the batch total is known).
  """
  rows = np.asarray(placeholders_per_row).reshape(-1)
  counts = np.asarray(num_tokens).reshape(-1)
  if images_per_row is not None:
    want = counts.reshape(rows.shape[0], images_per_row).sum(axis=1)
    bad = [(b, int(g), int(w)) for b, (g, w) in enumerate(zip(rows, want)) if g != w]
    if bad:
      b, got, expected = bad[0]
      raise ValueError(
          f"sample {b} of the batch has {got} image placeholder tokens but its images pack to {expected} "
          f"(per image {counts.reshape(rows.shape[0], -1)[b].tolist()}); rows that differ (row, got, want): {bad}"
      )
  if int(rows.sum()) != int(counts.sum()):
    raise ValueError(
        f"image placeholder/feature count mismatch: the batch has {int(rows.sum())} image placeholder tokens "
        f"(per sample {rows.tolist()}) but its anyres images pack to {int(counts.sum())} image features "
        f"(per image {counts.tolist()})"
    )
