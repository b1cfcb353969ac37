"""What a LLaVA record names: its id and its images. One rule for every reader.

A record names its images under one key:

    "image":  one path or a list of paths (LLaVA's own files, `llava_v1_5_mix665k.json`)
    "images": a list of paths or encoded bytes (our normalised records: what
              `sources.normalize_record` and the array_record shards return)

and its videos, likewise, under "video" (one path or a list: LLaVA-Video-178K,
LLaVA-OneVision's video data) or "videos" (a list: our normalised records).

A key whose value is None counts as absent. A record with both keys is ambiguous
(LLaVA never writes both, and neither list can be trusted over the other), so it is an
error, `RecordError` naming the record, which the readers turn into a `bad_record`
rejection (counted, logged, skipped or raised by the data policy) rather than guess.
"""

from __future__ import annotations

from typing import Mapping

IMAGE_KEYS = ("image", "images")
VIDEO_KEYS = ("video", "videos")


class RecordError(ValueError):
  """A record whose fields contradict each other (e.g. both "image" and "images")."""


def sample_id_of(record: Mapping) -> str:
  """The record's "id" (else "sample_id") as a string ("<no id>" if absent)."""
  return str(record.get("id", record.get("sample_id", "<no id>")))


def image_list(record: Mapping) -> list:
  """The images `record` names, as a list ([] if none); see the module docstring.

  Raises:
    RecordError: the record has both an "image" and an "images" value.
  """
  return _media(record, IMAGE_KEYS, "image")


def video_list(record: Mapping) -> list:
  """The videos `record` names ("video" or "videos"), as a list ([] if none).

  Raises:
    RecordError: the record has both a "video" and a "videos" value.
  """
  return _media(record, VIDEO_KEYS, "video")


def _media(record: Mapping, keys: tuple[str, str], kind: str) -> list:
  given = {k: _as_list(record[k]) for k in keys if record.get(k) is not None}
  if len(given) > 1:
    counts = " and ".join(f"{k!r} ({len(v)} {kind}{'s' * (len(v) != 1)})" for k, v in given.items())
    raise RecordError(f"record {sample_id_of(record)!r} has both {counts}; a record names its {kind}s under one key")
  return next(iter(given.values()), [])


def _as_list(images) -> list:
  return list(images) if isinstance(images, (list, tuple)) else [images]
