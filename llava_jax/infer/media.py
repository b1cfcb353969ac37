"""Images and videos of a prompt: where each ``<image>`` / ``<video>`` tag's media go.

A conversation's turns hold tags in the order the media are given: the k-th ``<image>``
is the k-th image, the k-th ``<video>`` the k-th video. A video is F frames sampled
uniformly from a file (``data.video.sample_frames``, F = ``num_frames`` or from ``fps``).
How a model sees it depends on its config:

- ``cfg.video_token_id`` set (OneVision, NeXT-Video): the frames are preprocessed as S x
  S images (``video_image_config``) into ``pixel_values_videos`` [V, F, S, S, 3], and
  the tag becomes ``models.video.num_video_tokens(cfg, F)`` video placeholders.
- no ``video_token_id`` (LLaVA-1.5, interleave-style models, the embedded demo trained on
  "Frames: <image> <image> <image>"): the tag becomes F ``<image>`` tags separated by
  spaces (LLaVA-Interleave's way, ``expand_videos_as_images``) and the frames are images,
  in place among the other images (``interleave``).
"""

from __future__ import annotations


import numpy as np

from llava_jax.data.media_tags import (  # noqa: F401  (re-exported: media.tag_order, ...)
    count_videos,
    expand_videos_as_images,
    interleave,
    tag_order,
)
from llava_jax.data.templates import VIDEO_TAG
from llava_jax.data.video import video_image_config  # noqa: F401  (re-exported)


def frames_per_video(video_frames, num_videos: int) -> list[int]:
  """``video_frames`` (None, an int for every video, or one int per video) -> [F_1, ...].

  Raises ValueError when the conversation's ``num_videos`` tags and the counts differ."""
  if video_frames is None:
    counts = []
  elif isinstance(video_frames, (int, np.integer)):
    counts = [int(video_frames)] * num_videos
  else:
    counts = [int(f) for f in video_frames]
  if len(counts) != num_videos:
    raise ValueError(
        f"the prompt has {num_videos} {VIDEO_TAG} tag(s) but frame counts for {len(counts)} video(s) were given "
        "(video_frames: each video's number of frames, in tag order)"
    )
  if any(f < 1 for f in counts):
    raise ValueError(f"every video needs at least one frame, got frame counts {counts}")
  return counts


def as_list(x) -> list:
  """None -> [], a list or tuple -> a list, anything else -> [x]."""
  return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


def load_videos(videos, num_frames: int | None = 8, fps: float | None = None) -> list[np.ndarray]:
  """Paths / encoded bytes / uint8[F, H, W, 3] frames / ``VideoFrames`` (or a list of
  them) -> a list of uint8[F, H, W, 3]; files are sampled by ``data.video.sample_frames``
  (``num_frames``, or ``fps`` when given). Raises ValueError / FileNotFoundError naming
  the file, as ``sample_frames`` does."""
  from llava_jax.data.video import VideoFrames, sample_frames

  out = []
  for v in as_list(videos):
    if isinstance(v, VideoFrames):
      v = v.frames
    elif not isinstance(v, np.ndarray):
      v = sample_frames(v, num_frames=None if fps else num_frames, fps=fps).frames
    if v.dtype != np.uint8 or v.ndim != 4 or v.shape[-1] != 3 or not len(v):
      raise ValueError(f"video frames must be uint8[F, H, W, 3] with F >= 1, got {v.dtype}{list(v.shape)}")
    out.append(v)
  return out
