"""One training example: a LLaVA record -> fixed-shape arrays, or a `Rejected` saying why not.

    spec = ExampleSpec.for_model(cfg, tokenizer=tok, template="vicuna_v1", image_config=ic,
                                 max_len=2048, max_images=1)
    example = prepare_example(record, spec)      # dict of arrays, or tokenize.Rejected

`ExampleSpec` is what training and evaluation of one run share; `pipeline` maps
`prepare_example` over a source in grain workers and batches the results (its module
docstring lists the batch keys). A record names its media under "image"/"images" and
"video"/"videos" (`records`); each `<image>` / `<video>` tag of its conversation takes
the next one, in order (`media_tags`).

Images: LLaVA-1.5 configs give every image slot one S x S image (`images.preprocess`);
any-resolution configs (`ExampleSpec.anyres`) its tiles and token layout
(`anyres_example`, per-slot budget).

Videos (`ExampleSpec.video`, `data.video_frames` F > 0): each video file is decoded
with PyAV and F frames are sampled uniformly (`video.sample_frames`, transformers'
sampling); a fixed F keeps the shapes fixed, so `fps` sampling is for inference only.

- a model with a video token (`model.video`: OneVision, NeXT-Video) gets the frames in
  `pixel_values_videos` float32[V, F, S, S, 3] (V = `data.max_videos` slots,
  `video_mask` bool[V]), preprocessed as the HF video processors do
  (`video.video_image_config`), and the tag becomes `models.video.num_video_tokens(cfg, F)`
  placeholders of `cfg.video_token_id`;
- a model without one (LLaVA-1.5, the embedded demo) gets the video as its F frames,
  F `<image>` tags in the tag's place, each frame an image (`max_images` counts them),
  exactly as `python -m llava_jax.generate --video` shows it one.

LLaVA-Video-178K / OneVision video records mark the video with `<image>`; such a tag is
read as the video's (`media_tags.video_tags_from_images`).

Rejections (counted per reason, logged with the sample id; `pipeline` applies the
policy): `bad_record` (unreadable; both "image" and "images", or "video" and "videos"),
`image_count_mismatch` (more images or videos than slots; tags and media that differ in
number; a video for a run without `data.video_frames`), `bad_image`, `bad_video` (a
missing, unreadable or undecodable file, or one with fewer than F frames, named with
the decoder's message), `image_over_budget` (anyres), and every reason of
`tokenize.tokenize_conversation`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import grain
import numpy as np

from llava_jax.data import anyres_example
from llava_jax.data.grain_stages import EmptySlot
from llava_jax.data.images import ImageConfig, load_image, preprocess
from llava_jax.data.media_tags import expand_videos_as_images, interleave, video_tags_from_images
from llava_jax.data.records import RecordError, image_list, sample_id_of, video_list
from llava_jax.data.templates import Template
from llava_jax.data.tokenize import IGNORE, Rejected, RejectReason, TokenizedSample, tokenize_conversation
from llava_jax.models.video import VIDEO_KEYS  # video-token models with data.max_videos > 0
from llava_jax.tokenizer import Tokenizer

BATCH_KEYS = ("input_ids", "labels", "attention_mask", "positions", "pixel_values", "image_mask", "ids")


@dataclasses.dataclass(frozen=True)
class VideoSpec:
  """How an example's videos are read (see the module docstring).

  frames: F sampled per video. max_videos: video slots V (models with a video token).
  token_id, tokens: the placeholder and how many per video (`models.video`); None / 0:
  the model takes a video as its frames, as images. image_config: how a frame is
  preprocessed when it goes to `pixel_values_videos`.
  """

  frames: int
  max_videos: int = 0
  token_id: int | None = None
  tokens: int = 0
  image_config: ImageConfig | None = None

  def __post_init__(self):
    if self.frames < 1 or self.max_videos < 0:
      raise ValueError(f"need video frames >= 1 and max_videos >= 0; got {self.frames}, {self.max_videos}")
    if self.token_id is None and self.max_videos:
      raise ValueError(
          f"max_videos={self.max_videos} needs a model with a video token (model.video); without one a video is "
          "its frames, as images (max_images counts them)"
      )
    if self.token_id is not None and (self.tokens < 1 or self.image_config is None):
      raise ValueError("a video token needs its token count per video and the frames' image_config")

  @classmethod
  def for_model(cls, cfg, image_config: ImageConfig, frames: int, max_videos: int = 0) -> "VideoSpec":
    """F frames per video for `LlavaConfig` `cfg`: into video slots if it has a video token."""
    if cfg.video_token_id is None:
      return cls(frames, max_videos)
    from llava_jax.data.video import video_image_config
    from llava_jax.models.video import num_video_tokens

    return cls(
        frames, max_videos, cfg.video_token_id, num_video_tokens(cfg, frames), video_image_config(cfg, image_config)
    )


@dataclasses.dataclass(frozen=True)
class ExampleSpec:
  """What one example is: how a record is tokenized and its images preprocessed.

  tokenizer, template, image_token_id, num_image_tokens, max_len: as
  `tokenize.tokenize_conversation`; T = max_len. image_config: preprocessing;
  S = image_config.size. max_images: image slots M per example; a sample with more
  images is rejected (`image_count_mismatch`). Training and evaluation of one run share
  one (`for_model` takes the image token and its count from the model config).
  anyres: the anyres `LlavaConfig` whose tiling and token layout images follow
  (`anyres_example`; `num_image_tokens` is then per image, from its size), or None
  (LLaVA-1.5: one S x S image per slot). over_budget: "reject" | "downscale", for
  anyres images that need more tiles or tokens than a slot holds. video: how videos are
  read (`VideoSpec`), or None: a record with a video is rejected.
  """

  tokenizer: Tokenizer
  template: str | Template
  image_config: ImageConfig
  image_token_id: int
  num_image_tokens: int
  max_len: int
  max_images: int
  anyres: Any = None  # LlavaConfig with image_grid_pinpoints, or None
  over_budget: str = "reject"
  video: VideoSpec | None = None

  def __post_init__(self):
    if self.max_images < 0 or self.max_len < 1:
      raise ValueError(f"need max_images >= 0 and max_len >= 1; got {self.max_images}, {self.max_len}")
    if self.over_budget not in anyres_example.OVER_BUDGET_POLICIES:
      raise ValueError(f"over_budget must be one of {anyres_example.OVER_BUDGET_POLICIES}, got {self.over_budget!r}")
    if self.anyres is not None and not self.anyres.anyres:
      raise ValueError("ExampleSpec.anyres must be a LlavaConfig with image_grid_pinpoints (or None)")

  @classmethod
  def for_model(
      cls,
      cfg,
      *,
      tokenizer: Tokenizer,
      template: str | Template,
      image_config: ImageConfig,
      max_len: int,
      max_images: int,
      over_budget: str = "reject",
      video_frames: int = 0,
      max_videos: int = 0,
  ) -> "ExampleSpec":
    """The spec for a `LlavaConfig` `cfg` (its image token id and tokens per image; its
    tiling if it is an anyres config; its video token if it has one, when
    `video_frames` > 0)."""
    video = VideoSpec.for_model(cfg, image_config, video_frames, max_videos) if video_frames else None
    if max_videos and video is None:
      raise ValueError(f"max_videos={max_videos} needs video_frames > 0 (data.video_frames: frames per video)")
    return cls(
        tokenizer,
        template,
        image_config,
        cfg.image_token_id,
        cfg.num_image_tokens,
        max_len,
        max_images,
        anyres=cfg if cfg.anyres else None,
        over_budget=over_budget,
        video=video,
    )

  @property
  def video_slots(self) -> int:
    """V: video slots per example (0 unless the model has a video token)."""
    return self.video.max_videos if self.video is not None else 0

  def keys(self) -> tuple[str, ...]:
    """The keys of an example (and of a batch): `BATCH_KEYS`, the layout keys of anyres,
    the video keys with video slots."""
    return (
        BATCH_KEYS
        + (anyres_example.LAYOUT_KEYS if self.anyres is not None else ())
        + (VIDEO_KEYS if self.video_slots else ())
    )


def _decode(image):
  """A path / bytes (`images.load_image`), or a video frame (uint8[H, W, 3]) as a PIL image."""
  if isinstance(image, np.ndarray):
    from PIL import Image

    return Image.fromarray(image)
  return load_image(image)


def _read_videos(sid: str, videos: list, spec: ExampleSpec) -> list[np.ndarray] | Rejected:
  """Each video's F sampled frames, uint8[F, H, W, 3], or a `bad_video` rejection."""
  from llava_jax.data.video import sample_frames

  out = []
  for k, v in enumerate(videos):
    if v is None:
      return Rejected(sid, RejectReason.BAD_VIDEO, f"video {k} of {len(videos)} is missing (None)")
    try:
      out.append(sample_frames(v, num_frames=spec.video.frames).frames)
    except (ValueError, OSError) as e:  # sample_frames: ValueError naming the file; OSError: unreadable
      return Rejected(sid, RejectReason.BAD_VIDEO, f"video {k} of {len(videos)}: {e}")
  return out


def prepare_example(record: Mapping, spec: ExampleSpec, *, pad: bool = True) -> dict[str, Any] | Rejected:
  """One source record -> a padded example, or a Rejected saying why not.

  Args:
    record: `{"id", "conversations", "images": [path | bytes | None, ...]}`, optionally
      `"videos": [...]` (a `sources` record; LLaVA's "image" / "video" keys work too).
    spec: the example's tokenization, image preprocessing, T and M (`ExampleSpec`).
    pad: False returns the example unpadded, for packing: {"input_ids": int32[L],
      "labels": int32[L], "pixel_values": float32[I, S, S, 3], "ids": str} with L
      tokens and I images (and the layout / video keys for their I images / videos).

  Returns:
    {"input_ids": int32[T], "labels": int32[T], "attention_mask": int32[T],
    "positions": int32[T], "pixel_values": float32[M, S, S, 3], "image_mask": bool[M],
    "ids": str} with T = max_len (anyres and video keys: the module docstrings), or a
    Rejected(id, reason, detail) (the module docstring lists the reasons).
  """
  sid = sample_id_of(record)
  if record.get("error"):  # the source could not read it (sources.bad_record)
    return Rejected(sid, RejectReason.BAD_RECORD, str(record["error"]))
  try:
    images, videos = image_list(record), video_list(record)
  except RecordError as e:  # both "image" and "images" (or "video" and "videos")
    return Rejected(sid, RejectReason.BAD_RECORD, str(e))
  conversation = record.get("conversations")
  frames: list[np.ndarray] = []
  if videos:
    if spec.video is None:
      return Rejected(
          sid, RejectReason.IMAGE_COUNT_MISMATCH, f"{len(videos)} videos, but this run takes none (data.video_frames=0)"
      )
    if spec.video.token_id is not None and len(videos) > spec.video_slots:
      return Rejected(
          sid,
          RejectReason.IMAGE_COUNT_MISMATCH,
          f"{len(videos)} videos, more than the max_videos={spec.video_slots} slots per example",
      )
    if isinstance(conversation, list):
      conversation = video_tags_from_images(conversation, len(images), len(videos))
    frames = _read_videos(sid, videos, spec)
    if isinstance(frames, Rejected):
      return frames
    if spec.video.token_id is None and isinstance(conversation, list):  # the video is its frames, as images
      try:
        images = interleave(conversation, images, frames)
      except ValueError as e:
        return Rejected(sid, RejectReason.IMAGE_COUNT_MISMATCH, str(e))
      conversation, frames = expand_videos_as_images(conversation, [spec.video.frames] * len(frames)), []
  if len(images) > spec.max_images:
    return Rejected(
        sid,
        RejectReason.IMAGE_COUNT_MISMATCH,
        f"{len(images)} images, more than the max_images={spec.max_images} slots per example",
    )
  tiled = None
  if spec.anyres is not None:  # decoded first: the images' sizes set their token counts
    decoded = []
    for k, image in enumerate(images):
      if image is None:
        return Rejected(sid, RejectReason.BAD_IMAGE, f"image {k} of {len(images)} is missing (None)")
      try:
        decoded.append(_decode(image))
      except (ValueError, OSError) as e:
        return Rejected(sid, RejectReason.BAD_IMAGE, f"image {k} of {len(images)}: {e}")
    tiled = anyres_example.prepare_images(decoded, spec.anyres, spec.image_config, spec.over_budget)
    if tiled.error is not None:
      return Rejected(sid, RejectReason.IMAGE_OVER_BUDGET, tiled.error)
  with_video = spec.video is not None and spec.video.token_id is not None
  tokenized = tokenize_conversation(
      {"id": sid, "conversations": conversation, "images": images, "videos": frames},
      spec.tokenizer,
      spec.template,
      image_token_id=spec.image_token_id,
      num_image_tokens=spec.num_image_tokens if tiled is None else [int(n) for n in tiled.image_tokens],
      max_len=spec.max_len,
      video_token_id=spec.video.token_id if with_video else None,
      num_video_tokens=spec.video.tokens if with_video else 0,
  )
  if isinstance(tokenized, Rejected):
    return tokenized
  slots = spec.max_images if pad else None
  if tiled is not None:
    arrays = anyres_example.slot_arrays(tiled, slots)
  else:
    s = spec.image_config.size
    arrays = {"pixel_values": np.zeros((spec.max_images if pad else len(images), s, s, 3), np.float32)}
    # Images cut away by truncation are already rejected (truncated_image), so all are used.
    for k, image in enumerate(images):
      if image is None:  # a source that could not provide it
        return Rejected(sid, RejectReason.BAD_IMAGE, f"image {k} of {len(images)} is missing (None)")
      try:
        arrays["pixel_values"][k] = preprocess(_decode(image), spec.image_config)
      except (ValueError, OSError) as e:  # load_image: ValueError naming the file; OSError: unreadable
        return Rejected(sid, RejectReason.BAD_IMAGE, f"image {k} of {len(images)}: {e}")
  if spec.video_slots:
    arrays.update(_video_arrays(frames, spec, pad))
  if pad:
    out = pad_example(
        tokenized,
        max_len=spec.max_len,
        pad_id=spec.tokenizer.pad_id,
        pixel_values=arrays.pop("pixel_values"),
        num_images=len(images),
    )
    out.update(arrays)
  else:
    arrays.pop("image_mask", None)
    arrays.pop("video_mask", None)  # packing derives the masks from the slots it fills
    out = {
        "input_ids": np.asarray(tokenized.input_ids, np.int32),
        "labels": np.asarray(tokenized.labels, np.int32),
        **arrays,
        "ids": tokenized.sample_id,
    }
  if tiled is not None and tiled.downscaled:
    out["notes"] = tuple(("image_downscaled", note) for note in tiled.downscaled)
  return out


def _video_arrays(frames: list[np.ndarray], spec: ExampleSpec, pad: bool) -> dict[str, np.ndarray]:
  """pixel_values_videos float32[V, F, S, S, 3] (the videos, then zero slots) and video_mask bool[V]."""
  v = spec.video
  s = v.image_config.size
  out = np.zeros((spec.video_slots if pad else len(frames), v.frames, s, s, 3), np.float32)
  for k, video in enumerate(frames):
    for f, frame in enumerate(video):
      out[k, f] = preprocess(frame, v.image_config)
  return {"pixel_values_videos": out, "video_mask": np.arange(out.shape[0]) < len(frames)}


def pad_example(
    sample: TokenizedSample, *, max_len: int, pad_id: int, pixel_values: np.ndarray, num_images: int
) -> dict[str, Any]:
  """A TokenizedSample (L <= max_len tokens) -> fixed-length arrays (see `prepare_example`)."""
  n = len(sample.input_ids)
  input_ids = np.full((max_len,), pad_id, np.int32)
  labels = np.full((max_len,), IGNORE, np.int32)
  mask = np.zeros((max_len,), np.int32)
  positions = np.zeros((max_len,), np.int32)
  input_ids[:n], labels[:n], mask[:n], positions[:n] = sample.input_ids, sample.labels, 1, np.arange(n)
  image_mask = np.zeros((pixel_values.shape[0],), bool)
  image_mask[:num_images] = True
  return {
      "input_ids": input_ids,
      "labels": labels,
      "attention_mask": mask,
      "positions": positions,
      "pixel_values": pixel_values,
      "image_mask": image_mask,
      "ids": sample.sample_id,
  }


def empty_example(spec: ExampleSpec) -> dict[str, Any]:
  """An empty row: pad tokens, IGNORE labels, mask 0, no images or videos, id ""."""
  max_len, max_images, image_size, pad_id = spec.max_len, spec.max_images, spec.image_config.size, spec.tokenizer.pad_id
  row = {
      "input_ids": np.full((max_len,), pad_id, np.int32),
      "labels": np.full((max_len,), IGNORE, np.int32),
      "attention_mask": np.zeros((max_len,), np.int32),
      "positions": np.zeros((max_len,), np.int32),
      "pixel_values": np.zeros((max_images, image_size, image_size, 3), np.float32),
      "image_mask": np.zeros((max_images,), bool),
      "ids": "",
  }
  if spec.anyres is not None:
    row.update(anyres_example.empty_slots(spec.anyres, spec.image_config, max_images))
  if spec.video_slots:
    row.update(_video_arrays([], spec, pad=True))
  return row


@dataclasses.dataclass(frozen=True)
class PrepareExample(grain.transforms.Map):
  """`prepare_example` as a picklable grain transform (it runs in worker processes)."""

  spec: ExampleSpec
  pad: bool = True

  def map(self, record):
    if isinstance(record, EmptySlot):  # GlobalBatchRows past the end of a finite pass
      return record
    return prepare_example(record, self.spec, pad=self.pad)
