"""Where the media of a conversation go: ``<image>`` / ``<video>`` tags, in order.

The k-th ``<image>`` of a conversation (all turns, in order) is its k-th image, the k-th
``<video>`` its k-th video. Training (``data.example``) and inference
(``infer.media``, ``infer.loading``) read tags with these functions, so a sample is
laid out the same way in both. A model without a video token takes a video as its F
frames, written as F ``<image>`` tags separated by spaces (LLaVA-Interleave's way,
``expand_videos_as_images``), the frames in place among the images (``interleave``).

LLaVA-Video-178K and LLaVA-OneVision's video records name the video under "video" and
mark it with an ``<image>`` tag; ``video_tags_from_images`` reads such a tag as the
video's.
"""

from __future__ import annotations

import re
from typing import Sequence

from llava_jax.data.templates import IMAGE_TAG, VIDEO_TAG

_TAGS = re.compile(f"{re.escape(IMAGE_TAG)}|{re.escape(VIDEO_TAG)}")


def _text(turn) -> str:
  text = turn.get("value", turn.get("content"))
  return text if isinstance(text, str) else ""


def tag_order(conversation) -> list[str]:
  """The media tags of all turns in order: a list of ``IMAGE_TAG`` / ``VIDEO_TAG``."""
  return [m.group(0) for turn in conversation for m in _TAGS.finditer(_text(turn))]


def count_videos(conversation) -> int:
  return sum(_text(turn).count(VIDEO_TAG) for turn in conversation)


def expand_videos_as_images(conversation, frames: Sequence[int]) -> list[dict]:
  """The conversation with the k-th ``<video>`` replaced by ``frames[k]`` ``<image>`` tags
  separated by spaces (a copy; other keys kept)."""
  counter = iter(frames)
  out = []
  for turn in conversation:
    key = "value" if "value" in turn else "content"
    text = turn.get(key)
    if isinstance(text, str) and VIDEO_TAG in text:
      parts = text.split(VIDEO_TAG)
      text = parts[0] + "".join(" ".join([IMAGE_TAG] * next(counter)) + part for part in parts[1:])
      turn = {**turn, key: text}
    out.append(turn)
  return out


def interleave(conversation, images: Sequence, videos: Sequence) -> list:
  """Images and videos' frames as one image list in tag order (for a model that takes a
  video as its frames). Raises ValueError when the tags and the media differ in number."""
  order = tag_order(conversation)
  tags = (order.count(IMAGE_TAG), order.count(VIDEO_TAG))
  if tags != (len(images), len(videos)):
    raise ValueError(
        f"the prompt has {tags[0]} {IMAGE_TAG} and {tags[1]} {VIDEO_TAG} tag(s) but {len(images)} image(s) and "
        f"{len(videos)} video(s) were given; one tag per image and per video, in order"
    )
  images, videos = iter(images), iter(videos)
  out = []
  for tag in order:
    out.extend([next(images)] if tag == IMAGE_TAG else list(next(videos)))
  return out


def video_tags_from_images(conversation, num_images: int, num_videos: int) -> list:
  """LLaVA-Video's convention -> ours: a record with videos, no images and no ``<video>``
  tag marks its videos with ``<image>`` tags; those become ``<video>`` (a copy). Any other
  conversation is returned as it is."""
  if not num_videos or num_images or any(VIDEO_TAG in _text(t) for t in conversation):
    return list(conversation)
  out = []
  for turn in conversation:
    key = "value" if "value" in turn else "content"
    text = turn.get(key)
    out.append({**turn, key: text.replace(IMAGE_TAG, VIDEO_TAG)} if isinstance(text, str) else turn)
  return out
