"""Sequence packing: several variable-length examples per fixed-shape training row.

Accelerators want fixed shapes, and padding every conversation to `max_len` spends
most of the step on padding when lengths vary (LLaVA-665k mixes one-line VQA answers
with long ShareGPT chats in 2048-token rows). With `PipelineConfig(..., pack=True)`
examples are packed first-fit into rows of `max_len` tokens and `max_images` image
slots (grain's `FirstFitPackIterDataset`), and the row carries what keeps the
examples apart:

    attention_mask  int32[T]   segment id per token: 1, 2, ... per example, 0 = padding;
                               attention only within a segment (`kernels.attention`)
    positions       int32[T]   0, 1, ... restarting at each example (RoPE positions)
    pixel_values    [M, S, S, 3]  the examples' images in token order, then zeros
    image_mask      bool[M]    True on the slots holding an image
    image_index ... anyres rows: each image's layout keys follow its slot (`anyres_example`)

`train.step.token_loss` never scores a prediction across a segment boundary, so a
packed row gives the same loss and gradients as its examples in separate rows
(tests/train/test_step.py; the packer itself: tests/data/test_pipeline.py). The iterator state (restored from checkpoints)
includes the packer's, so resumption is exact.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import grain
import numpy as np

from llava_jax.data.tokenize import IGNORE


def pack(
    ds: grain.IterDataset,
    *,
    max_len: int,
    max_images: int,
    pad_id: int,
    num_bins: int,
    seed: int,
    shuffle_bins: bool = True,
    image_keys: tuple[str, ...] = (),
    max_videos: int = 0,
) -> grain.IterDataset:
  """Packs unpadded examples (`prepare_example(record, spec, pad=False)`) into rows.

  Args:
    ds: examples {"input_ids": int32[L], "labels": int32[L],
      "pixel_values": float32[I, S, S, 3], "ids": str} with L <= max_len, I <= max_images.
    max_len, max_images: tokens T and image slots M per row.
    pad_id: token id of padding.
    num_bins: rows filled at once; an example goes into the first row with room for
      its tokens and images, and when one fits nowhere all rows are emitted. More
      rows: fuller rows, more examples held in memory.
    seed, shuffle_bins: the emitted rows are shuffled (seeded) so that rows filled
      late (short examples only) are not always last.
    image_keys: further per-image keys ([I, ...], like "pixel_values") packed into the
      same M slots (anyres: `anyres_example.LAYOUT_KEYS`).
    max_videos: video slots V per row; > 0: examples carry "pixel_values_videos"
      [Vi, F, S, S, 3] and rows get it [V, ...] with "video_mask" bool[V].

  Returns:
    an IterDataset of rows (see the module docstring; plus "input_ids", "labels"
    padded with pad_id / IGNORE and "ids", the examples' ids joined by ",").
  """
  if num_bins < 1:
    raise ValueError(f"num_bins must be >= 1, got {num_bins}")
  packed = grain.experimental.FirstFitPackIterDataset(
      ds,
      length_struct={"input_ids": max_len, "labels": max_len, "pixel_values": max_images}
      | {k: max_images for k in image_keys}
      | ({"pixel_values_videos": max_videos} if max_videos else {}),
      num_packing_bins=num_bins,
      seed=seed,
      shuffle_bins=shuffle_bins,
      meta_features=("ids",),
      padding_struct={"input_ids": pad_id, "labels": IGNORE, "pixel_values": 0}
      | {k: 0 for k in image_keys}
      | ({"pixel_values_videos": 0} if max_videos else {}),
  )
  return packed.map(functools.partial(to_row, image_keys=image_keys, videos=bool(max_videos)))


def to_row(packed: Mapping[str, Any], image_keys: tuple[str, ...] = (), videos: bool = False) -> dict[str, Any]:
  """grain's packed features -> the pipeline's row keys (see the module docstring)."""
  video = {}
  if videos:
    video = {
        "pixel_values_videos": packed["pixel_values_videos"].astype(np.float32),
        "video_mask": packed["pixel_values_videos_segment_ids"] != 0,
    }
  return {
      **{k: packed[k] for k in image_keys},
      **video,
      "input_ids": packed["input_ids"].astype(np.int32),
      "labels": packed["labels"].astype(np.int32),
      "attention_mask": packed["input_ids_segment_ids"].astype(np.int32),
      "positions": packed["input_ids_positions"].astype(np.int32),
      "pixel_values": packed["pixel_values"].astype(np.float32),
      "image_mask": packed["pixel_values_segment_ids"] != 0,
      "ids": ",".join(str(i) for i in packed["ids"]),
  }


def fill(attention_mask: np.ndarray) -> float:
  """Fraction of the batch's token slots holding example tokens (not padding)."""
  return float(np.count_nonzero(attention_mask)) / max(attention_mask.size, 1)
