"""Video inputs: per-frame features pooled on their patch grid (LLaVA-OneVision, LLaVA-NeXT-Video).

A video is F frames, each an S x S image (``data.video.sample_frames`` then
``data.images.preprocess``). Every frame goes through the vision tower like an image; its
``p x p`` feature grid (p = S / patch) is then pooled to fewer tokens, and the video's
tokens are its frames' pooled tokens in order:

- ``video_pooling="bilinear"`` (OneVision, transformers'
  ``LlavaOnevisionModel.get_video_features`` / ``apply_pooling``): projector first, then a
  bilinear resize (``align_corners=False``, no antialias) of the grid to
  ``ceil(p / stride)`` per side (stride 2: 27x27 -> 14x14 at 384 px; a 2x2 mean for even
  p), frames concatenated and ``image_newline`` appended once per video:
  ``F * ceil(p / stride)**2 + 1`` tokens.
- ``"average"`` / ``"max"`` (NeXT-Video, ``LlavaNextVideoPooler``): ``stride x stride``
  average or max pooling of the tower's grid (floor), then the projector:
  ``F * (p // stride)**2`` tokens, no newline.

Contract: ``pixel_values_videos`` float32[V, F, S, S, 3] (or [B, M, F, S, S, 3], M video
slots per row, with ``video_mask`` bool[V] or [B, M] marking real ones); every video of a
batch has the same F (fixed shapes: sample the same ``num_frames`` for all).
``input_ids`` holds ``num_video_tokens(cfg, F)`` ids ``cfg.video_token_id`` per video, in
order (HF's processors expand ``<video>`` the same way); counts are checked.

Einsum letters: V videos, F frames per video, p grid side, q pooled side, C channels
(tower width or LLM embed).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from llava_jax.models.anyres import _linear_taps  # torch's bilinear taps, float32 roundings included

POOLINGS = ("bilinear", "average", "max")


VIDEO_KEYS = ("pixel_values_videos", "video_mask")  # a batch's videos: the model's arguments of those names


def check_config(cfg) -> None:
  """Validates a LlavaConfig's video fields (all None, or a token id, pooling and stride)."""
  fields = (cfg.video_token_id, cfg.video_pooling, cfg.video_pool_stride)
  if all(f is None for f in fields):
    return
  if any(f is None for f in fields):
    raise ValueError(
        f"video_token_id, video_pooling and video_pool_stride are set together (videos) or all None; got {fields}"
    )
  if cfg.video_pooling not in POOLINGS:
    raise ValueError(f"video_pooling {cfg.video_pooling!r}: expected one of {POOLINGS}")
  if not isinstance(cfg.video_pool_stride, int) or cfg.video_pool_stride < 1:
    raise ValueError(f"video_pool_stride must be a positive int, got {cfg.video_pool_stride!r}")
  if cfg.video_token_id == cfg.image_token_id:
    raise ValueError(f"video_token_id {cfg.video_token_id} is also the image_token_id")
  if cfg.video_pooling == "bilinear" and not cfg.anyres:
    raise ValueError("video_pooling='bilinear' (OneVision) appends image_newline: it needs an anyres config")
  v = cfg.vision
  side = v.image_size // v.patch_size
  if v.num_features != side * side:
    raise ValueError(
        f"video frames are pooled on their {side}x{side} patch grid, but the vision tower gives "
        f"{v.num_features} features per frame (select_feature={v.select_feature!r}); drop the class token"
    )
  if cfg.video_pooling != "bilinear" and side < cfg.video_pool_stride:
    raise ValueError(f"a {side}x{side} grid cannot be pooled with stride {cfg.video_pool_stride}")


def pooled_side(cfg) -> int:
  p = cfg.vision.image_size // cfg.vision.patch_size
  s = cfg.video_pool_stride
  return math.ceil(p / s) if cfg.video_pooling == "bilinear" else p // s


def num_video_tokens(cfg, num_frames: int) -> int:
  """Video placeholders a video of ``num_frames`` frames takes in ``input_ids``."""
  return int(num_frames) * pooled_side(cfg) ** 2 + int(cfg.video_pooling == "bilinear")


def pool_frames(features, cfg):
  """float[I, p * p, C] frame features -> float[I, q * q, C] (row-major grid, see the module docstring)."""
  i, n, c = features.shape
  p, q = math.isqrt(n), pooled_side(cfg)
  grid = features.reshape(i, p, p, c)
  if cfg.video_pooling == "bilinear":
    y0, y1, wy0, wy1 = _linear_taps(p, q)
    x0, x1, wx0, wx1 = _linear_taps(p, q)
    wx0, wx1 = (jnp.asarray(w, features.dtype)[None, None, :, None] for w in (wx0, wx1))
    wy0, wy1 = (jnp.asarray(w, features.dtype)[None, :, None, None] for w in (wy0, wy1))
    # torch's upsample_bilinear2d: h0 * (w0 * x00 + w1 * x01) + h1 * (w0 * x10 + w1 * x11).
    rows = lambda r: wx0 * grid[:, r][:, :, x0] + wx1 * grid[:, r][:, :, x1]
    out = wy0 * rows(y0) + wy1 * rows(y1)
  else:
    s = cfg.video_pool_stride
    blocks = grid[:, : q * s, : q * s].reshape(i, q, s, q, s, c)
    out = blocks.mean(axis=(2, 4)) if cfg.video_pooling == "average" else blocks.max(axis=(2, 4))
  return out.reshape(i, q * q, c)


def check_video_tokens(placeholders_per_row, num_videos, num_frames: int | None, tokens_per_video: int):
  """Raises ValueError unless the video placeholders hold exactly the given videos.

  Args:
    placeholders_per_row: int[B], video placeholder tokens in each sample.
    num_videos: real videos in ``pixel_values_videos`` (all samples, in order).
    num_frames: F, frames per video, or None without ``pixel_values_videos``;
    tokens_per_video: ``num_video_tokens(cfg, F)``.
  """
  counts = np.asarray(placeholders_per_row).reshape(-1)
  if num_frames is None:
    if counts.any():
      raise ValueError(
          f"the batch has {int(counts.sum())} video placeholder tokens (per sample {counts.tolist()}) but no "
          "pixel_values_videos"
      )
    return
  expected = int(num_videos) * tokens_per_video
  bad = [(b, int(n)) for b, n in enumerate(counts) if n % tokens_per_video]
  if bad:
    b, n = bad[0]
    raise ValueError(
        f"sample {b} of the batch has {n} video placeholder tokens, not a multiple of the {tokens_per_video} "
        f"tokens of a {num_frames}-frame video (rows with a remainder: {bad})"
    )
  if int(counts.sum()) != expected:
    raise ValueError(
        f"video placeholder/feature count mismatch: the batch has {int(counts.sum())} video placeholder tokens "
        f"(per sample {counts.tolist()}) but {int(num_videos)} videos x {tokens_per_video} tokens "
        f"({num_frames} frames) = {expected}"
    )
