"""Host-side checks of ``sampler.generate``'s inputs, run before anything is compiled.

Image placeholders against the images (LLaVA-1.5 counts, or each anyres image's packed
count from its ``ImageLayout``), and video placeholders against ``pixel_values_videos``
(``models.video.num_video_tokens(cfg, F)`` per real video, row by row for [B, M] slots).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from llava_jax.models import anyres, video
from llava_jax.models.configs import LlavaConfig


def anyres_layout(cfg: LlavaConfig, input_ids, pixel_values, image_mask, image_layout, image_sizes):
  """The ``ImageLayout`` of an anyres prompt's images (built from ``image_sizes`` on the
  host when not given); None for LLaVA-1.5 configs, which take neither."""
  if not cfg.anyres:
    if image_layout is not None or image_sizes is not None:
      raise ValueError(
          "image_layout / image_sizes are for anyres configs (image_grid_pinpoints set: LLaVA-NeXT, OneVision); "
          "this config has none"
      )
    return None
  if image_layout is not None and image_sizes is not None:
    raise ValueError("pass image_layout or image_sizes, not both")
  if pixel_values is None:
    if image_layout is not None or image_sizes is not None:
      raise ValueError("image_layout / image_sizes given without pixel_values")
    return None
  if np.ndim(pixel_values) not in (5, 6):
    raise ValueError(
        f"anyres pixel_values must be float32[I, P, S, S, 3] or [B, M, P, S, S, 3] tiles "
        f"(data.anyres.preprocess_anyres + pad_tiles), got shape {np.shape(pixel_values)}"
    )
  if np.ndim(pixel_values) == 6 and np.shape(pixel_values)[0] != np.shape(input_ids)[0]:
    raise ValueError(
        f"pixel_values {np.shape(pixel_values)} has {np.shape(pixel_values)[0]} rows of image slots but input_ids "
        f"has {np.shape(input_ids)[0]} rows"
    )
  if image_layout is None:
    if image_sizes is None:
      raise ValueError(
          "an anyres config needs the images' original sizes: pass image_sizes int[I, 2] (or [B, M, 2]) "
          "(height, width), as data.anyres.preprocess_anyres returns them, or image_layout"
      )
    sizes = np.asarray(image_sizes).reshape(-1, 2)
    real = np.ones(len(sizes), bool) if image_mask is None else np.asarray(image_mask, bool).reshape(-1)
    if len(real) == len(sizes) and np.any(sizes[real] < 1):
      raise ValueError(
          f"image_sizes must be positive (height, width) wherever image_mask marks a real image, got {sizes.tolist()}"
      )
    image_layout = anyres.image_layout(image_sizes, cfg, image_mask)
  slots = int(np.prod(np.shape(pixel_values)[:-4]))
  if np.shape(image_layout.num_tokens)[0] != slots:
    raise ValueError(
        f"the image layout is for {np.shape(image_layout.num_tokens)[0]} images but pixel_values "
        f"{np.shape(pixel_values)} holds {slots} image slots"
    )
  return image_layout


def check_placeholders(
    cfg: LlavaConfig, ids, pixel_values, image_mask, image_layout=None, pixel_values_videos=None, video_mask=None
) -> LlavaConfig:
  """The placeholder/image count check on the host, before anything is compiled (inside
  jit it is a device callback, whose error arrives late, wrapped, and which on a mesh
  gathers the counts to one device on every call). Returns ``cfg`` without the in-jit
  check once checked here; inputs that are global arrays not all on this process keep it.
  Anyres configs: each image's count is ``image_layout.num_tokens`` (checked per row
  when the images come as [B, M] slots). Video configs: ``check_video_placeholders``."""
  from llava_jax.models.llava import check_image_tokens

  local = lambda x: not (isinstance(x, jax.Array) and not x.is_fully_addressable)
  counts = None if image_layout is None else image_layout.num_tokens
  if not (local(ids) and local(image_mask) and local(counts) and local(video_mask)):
    return cfg
  check_video_placeholders(cfg, ids, pixel_values_videos, video_mask)
  per_row = np.sum(np.asarray(ids) == cfg.image_token_id, axis=1)
  if cfg.anyres:
    counts = np.zeros(0, np.int32) if counts is None else np.asarray(counts).reshape(-1)
    if image_mask is not None and counts.size:
      counts = np.where(np.asarray(image_mask, bool).reshape(-1), counts, 0)
    per_slot = np.shape(pixel_values)[1] if pixel_values is not None and np.ndim(pixel_values) == 6 else None
    anyres.check_anyres_tokens(per_row, counts, per_slot)
  else:
    if image_mask is not None:
      num_images = int(np.sum(np.asarray(image_mask)))
    elif pixel_values is None:
      num_images = 0
    else:
      shape = np.shape(pixel_values)
      num_images = int(np.prod(shape[:2])) if len(shape) == 5 else shape[0]
    check_image_tokens(per_row, num_images, cfg.num_image_tokens)
  return dataclasses.replace(cfg, check_image_tokens=False) if cfg.check_image_tokens else cfg


def check_video_inputs(cfg: LlavaConfig, input_ids, pixel_values_videos, video_mask) -> None:
  """Shapes of ``pixel_values_videos`` (float32[V, F, S, S, 3] or [B, M, F, S, S, 3]) and
  ``video_mask`` (bool[V] or [B, M]); refuses videos for a config without ``video_token_id``."""
  if pixel_values_videos is None:
    if video_mask is not None:
      raise ValueError("video_mask given without pixel_values_videos")
    return
  if cfg.video_token_id is None:
    raise ValueError(
        "pixel_values_videos given, but this config has no video_token_id (a LLaVA-1.5 / interleave-style "
        "model): give the frames as images instead (LoadedModel.encode_prompt(..., video_frames=) turns each "
        "<video> into one <image> per frame for such a model)"
    )
  shape = np.shape(pixel_values_videos)
  if len(shape) not in (5, 6) or shape[-1] != 3:
    raise ValueError(
        f"pixel_values_videos must be float32[V, F, S, S, 3] or [B, M, F, S, S, 3] (frames per video F), "
        f"got shape {shape}"
    )
  if len(shape) == 6 and shape[0] != np.shape(input_ids)[0]:
    raise ValueError(
        f"pixel_values_videos {shape} has {shape[0]} rows of video slots but input_ids has "
        f"{np.shape(input_ids)[0]} rows"
    )
  if video_mask is not None and tuple(np.shape(video_mask)) != tuple(shape[: len(shape) - 4]):
    raise ValueError(f"video_mask shape {np.shape(video_mask)} does not match pixel_values_videos {shape} slots")


def check_video_placeholders(cfg: LlavaConfig, ids, pixel_values_videos, video_mask) -> None:
  """Each row's ``cfg.video_token_id`` count against its videos (``models.video``), on the host."""
  if cfg.video_token_id is None:
    return
  per_row = np.sum(np.asarray(ids) == cfg.video_token_id, axis=1)
  if pixel_values_videos is None:
    video.check_video_tokens(per_row, 0, None, 0)
    return
  shape = np.shape(pixel_values_videos)
  frames = shape[-4]
  tokens = video.num_video_tokens(cfg, frames)
  slots = int(np.prod(shape[: len(shape) - 4]))
  real = np.ones(slots, bool) if video_mask is None else np.asarray(video_mask, bool).reshape(-1)
  if len(shape) == 6:  # [B, M] slots: row b's placeholders are for row b's videos
    for b, n in enumerate(real.reshape(shape[0], shape[1]).sum(axis=1)):
      if per_row[b] != n * tokens:
        raise ValueError(
            f"sample {b} of the batch has {int(per_row[b])} video placeholder tokens but its videos need "
            f"{int(n)} x {tokens} = {int(n) * tokens} ({frames} frames each)"
        )
  video.check_video_tokens(per_row, int(real.sum()), frames, tokens)
