"""The grain input pipeline: LLaVA records -> fixed-shape, checkpointable training batches.

    example = ExampleSpec(tokenizer=tok, template="llava_v1", image_config=image_config_for("clip", 336, "pad"),
                          image_token_id=32000, num_image_tokens=576, max_len=2048, max_images=1)
    it = make_dataset(ArrayRecordLlavaSource(dir), PipelineConfig(example, batch_size=32, seed=0))
    batch = next(it)                     # dict of numpy arrays (keys below)
    state = it.get_state()               # JSON-able; store it with the checkpoint
    it.counts()                          # {"bad_image": 3, "template_mismatch": 0, ...}

Everything but the source is one frozen `PipelineConfig`: what an example is
(`ExampleSpec`, shared by training and evaluation), how batches are drawn, where this
process reads, and how. Variants are `dataclasses.replace` of it.

Stages (grain 0.2 `MapDataset` / `IterDataset`; the process-aware ones are in
`grain_stages`):

    MapDataset.source(source)            records {"id", "conversations", "images"}
      .shuffle(seed).repeat(num_epochs)  one global order, the same on every process, reshuffled per epoch
      GlobalBatchRows                    this process's rows of each global batch (see below)
      .map(PrepareExample)               decode + preprocess images, tokenize: an example or a Rejected
      .to_iter_dataset(ReadOptions)      threads; .mp_prefetch() if worker_count > 0 (processes)
    _CountRejected                       main process: counts, logs, skips or raises per policy
      [packing.pack(...)]                pack=True: several examples per row (see `packing`)
      .batch(batch_size, collate)        fixed shapes

Several processes (a pod). `batch_size` is the global batch G; with P processes each
yields its own G / P rows of every global batch: process p's j-th element is element
(j // b) * G + p * b + j % b of the global order (b = G / P). Without rejections the
global batch k therefore holds the same examples in the same rows for any P
(`jax.make_array_from_process_local_data` stacks the processes' rows in order), so the
loss curve does not depend on the process count and a run can resume on another pod
size (`start_batch`). A rejected sample is replaced by the next element of the same
process's stream, so with rejections the batches of different P differ slightly; with
`pack=True` each process packs its own rows. Finite passes over several processes
(evaluation) keep every slot: rejected samples and the end of the data become empty
rows, so every process yields the same number of batches.

Reading from a bucket. A record's images are fetched inside `PrepareExample`, so the
`read_threads` threads of `ReadOptions` (and `worker_count` processes) bound how many
requests are in flight: one image read costs a round trip (tens of ms on GCS) rather
than a disk seek, so with sources or image roots on `gs://` the training loop defaults
to `REMOTE_READ_THREADS` threads instead of 2 (`default_read_threads`; config key
`data.read_threads`). `benchmarks/storage.py` measures images/s against threads.

Rejections travel through the workers as `tokenize.Rejected` values and are
counted in the main process, so `counts()` covers every worker, and the counts
are part of `get_state()` (restored with it). Each is logged with its sample
id by `tokenize.apply_policy` (Python logging, which absl's handler prints:
the first 10 per reason, then every 1000th). Because the only many-to-one
step runs after the workers, the batches do not depend on `worker_count`.

Batch (B = batch_size, T = max_len, M = max_images, S = image_config.size):

    input_ids       int32[B, T]          pad_id after the sample; image_token_id at image features
    labels          int32[B, T]          IGNORE (-100) except learned answer tokens
    attention_mask  int32[B, T]          1 on the sample's tokens, 0 on padding; packed rows:
                                         segment ids 1, 2, ... (one per example), 0 on padding
    positions       int32[B, T]          0, 1, ... within each example (RoPE), 0 on padding
    pixel_values    float32[B, M, S, S, 3]  normalized; zeros in unused slots
    image_mask      bool[B, M]           True for real images (the first `num_images` slots)
    ids             object[B]            sample ids (str), for logging; "" on padding rows;
                                         packed rows: the ids joined by ","

(B is this process's rows: batch_size // process_count.)

Any-resolution models (`ExampleSpec.anyres`, LLaVA-NeXT / OneVision; see
`anyres_example` for the per-slot budget and what an image over it gets):

    pixel_values    float32[B, M, P, S, S, 3]  P = cfg.tiles_per_image tiles per slot
    image_index     int32[B, M, N, K]    the slots' `models.anyres.ImageLayout`
    image_weight    float32[B, M, N, K]  (N = cfg.image_token_budget)
    image_tokens    int32[B, M]          packed tokens per slot, 0 when empty

Models with a video token and `data.max_videos` V > 0 slots (`example.VideoSpec`):

    pixel_values_videos  float32[B, V, F, S, S, 3]  F frames per video, zeros in unused slots
    video_mask           bool[B, V]                 True for real videos

One example (`ExampleSpec`, `prepare_example`, the media rules and rejections) is
`llava_jax.data.example`'s; this module batches them.

`ids` is not an array JAX can take: drop it before `jax.device_put`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from llava_jax.data import anyres_example, packing
from llava_jax.data.grain_stages import (
    EmptySlot,
    GlobalBatchRows,
    LlavaBatchIterator,
    RejectCounter,
    _CountRejected,
    resume_batch,
)
from llava_jax.data.example import (
    BATCH_KEYS,
    VIDEO_KEYS,
    ExampleSpec,
    PrepareExample,
    VideoSpec,
    empty_example,
    pad_example,
    prepare_example,
)
from llava_jax.data.tokenize import IGNORE

REMOTE_READ_THREADS = 16  # grain read threads when data comes from a bucket (see the module docstring)
LOCAL_READ_THREADS = 2


def default_read_threads(*paths) -> int:
  """`REMOTE_READ_THREADS` if any of `paths` (comma-separated strings allowed) is on a
  bucket, else `LOCAL_READ_THREADS`."""
  from llava_jax import storage

  for p in paths:
    for part in (p.split(",") if isinstance(p, str) else [p] if p else []):
      if part and storage.is_remote(part):
        return REMOTE_READ_THREADS
  return LOCAL_READ_THREADS


__all__ = [  # the pipeline's API, with what it re-exports from grain_stages
    "BATCH_KEYS",
    "VIDEO_KEYS",
    "VideoSpec",
    "EmptySlot",
    "ExampleSpec",
    "GlobalBatchRows",
    "LOCAL_READ_THREADS",
    "LlavaBatchIterator",
    "PipelineConfig",
    "PrepareExample",
    "REMOTE_READ_THREADS",
    "RejectCounter",
    "collate",
    "default_read_threads",
    "empty_example",
    "make_dataset",
    "make_iter_dataset",
    "pad_example",
    "prepare_example",
    "resume_batch",
]


def collate(
    examples: Sequence[Mapping[str, Any] | EmptySlot],
    batch_size: int | None = None,
    pad_id: int = 0,
    empty: Mapping[str, Any] | None = None,
) -> dict[str, np.ndarray]:
  """Stacks examples into a batch (see the module docstring for keys and shapes).

  With `batch_size` larger than len(examples) (the last batch of a finite
  pass), empty rows are added: `pad_id` tokens, IGNORE labels, mask 0, no
  images, id "". `EmptySlot` entries become the `empty` row (`empty_example`).
  """
  if any(isinstance(e, EmptySlot) for e in examples):
    if empty is None:
      raise ValueError("collate got an EmptySlot but no empty row to put there")
    examples = [empty if isinstance(e, EmptySlot) else e for e in examples]
  if empty is not None and batch_size is not None and len(examples) < batch_size:
    examples = list(examples) + [empty] * (batch_size - len(examples))
  out = {k: np.stack([e[k] for e in examples]) for k in examples[0] if k != "ids"}
  ids = [str(e["ids"]) for e in examples]
  missing = 0 if batch_size is None else batch_size - len(examples)
  if missing > 0:
    fill = {"input_ids": pad_id, "labels": IGNORE}
    for k, v in out.items():
      out[k] = np.concatenate([v, np.full((missing,) + v.shape[1:], fill.get(k, 0), v.dtype)])
    ids += [""] * missing
  out["ids"] = np.asarray(ids, dtype=object)
  return out


# ----------------------------------------------------------------------------- the pipeline


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """Everything `make_dataset` builds from, but the source. Frozen: variants are
  `dataclasses.replace(config, start_batch=...)`.

  Attributes:
    example: what one example is (`ExampleSpec`).
    batch_size: G, the global batch (all processes together); each process yields
      B = G / process_count rows of it.
    seed: shuffle seed (each epoch is reshuffled from it); also the packer's.
    shuffle: False keeps the source order (e.g. evaluation).
    num_epochs: passes over the data; None repeats forever.
    policy: "skip" (count, log the id, drop) or "raise" (ValueError naming
      the sample id, reason and detail) for rejected samples.
    drop_remainder: drop the last partial global batch of a finite pass; False pads
      it with empty rows (labels all IGNORE, id "").
    pack: several examples per row (see `packing`): rows of max_len tokens and
      max_images image slots, segment ids in "attention_mask", "positions"
      restarting per example. Batches then hold more examples than B.
    pack_bins: rows the packer fills at once (default 2 * B).
    process_index, process_count: this process's rows of each global batch; None:
      `jax.process_index()` / `jax.process_count()`. See `GlobalBatchRows`.
    start_batch: the global batch to start at (resuming on a different number of
      processes: `resume_batch`).
    worker_count: grain worker processes (0: decode in this process's threads).
    read_threads, prefetch_buffer_size: grain ReadOptions per process
      (`default_read_threads` picks the threads for a bucket).
  """

  example: ExampleSpec
  batch_size: int
  seed: int
  shuffle: bool = True
  num_epochs: int | None = None
  policy: str = "skip"
  drop_remainder: bool = True
  pack: bool = False
  pack_bins: int | None = None
  process_index: int | None = None
  process_count: int | None = None
  start_batch: int = 0
  worker_count: int = 0
  read_threads: int = LOCAL_READ_THREADS
  prefetch_buffer_size: int = 16

  def __post_init__(self):
    if self.policy not in ("skip", "raise"):
      raise ValueError(f"policy must be 'skip' or 'raise', got {self.policy!r}")
    if self.batch_size < 1:
      raise ValueError(f"need batch_size >= 1, got {self.batch_size}")

  def processes(self) -> tuple[int, int]:
    """(process_index, process_count), the jax defaults filled in."""
    if self.process_index is not None and self.process_count is not None:
      return self.process_index, self.process_count
    import jax  # local: only for the default process layout

    return (
        jax.process_index() if self.process_index is None else self.process_index,
        jax.process_count() if self.process_count is None else self.process_count,
    )


def _ensure_absl_flags_parsed():
  """grain's worker processes read absl flags; a library caller (tests, notebooks) may not have parsed them."""
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_iter_dataset(
    source, config: PipelineConfig, counter: RejectCounter | None = None
) -> tuple[grain.IterDataset, RejectCounter]:
  """The pipeline as a grain IterDataset (of batches) and its RejectCounter; see `make_dataset`."""
  ds, counter, _, _ = _build(source, config, counter)
  return ds, counter


def _build(source, config: PipelineConfig, counter: RejectCounter | None):
  c, spec = config, config.example
  process_index, process_count = c.processes()
  finite = c.num_epochs is not None
  # Finite passes over several processes keep every slot, so all yield as many batches.
  keep_slots = finite and process_count > 1
  if keep_slots and c.pack:
    raise ValueError(
        "pack=True with a finite pass (num_epochs) over several processes is not "
        "supported: the processes would yield different numbers of rows"
    )
  counter = counter or RejectCounter()
  ds = grain.MapDataset.source(source)
  if len(ds) == 0:
    raise ValueError(f"the data source {source!r} holds no records")
  if c.shuffle:
    ds = ds.shuffle(seed=c.seed)
  if c.num_epochs != 1:
    ds = ds.repeat(c.num_epochs)
  ds = GlobalBatchRows(
      ds,
      global_batch=c.batch_size,
      process_index=process_index,
      process_count=process_count,
      start_batch=c.start_batch,
      pad_last=finite and not c.drop_remainder,
  )
  rows = c.batch_size // process_count
  ds = ds.map(PrepareExample(spec, pad=not c.pack))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=c.read_threads, prefetch_buffer_size=c.prefetch_buffer_size))
  if c.worker_count > 0:
    _ensure_absl_flags_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=c.worker_count))
  count_stage = _CountRejected(it, c.policy, counter, keep_slots=keep_slots)
  it = count_stage
  pad_id = spec.tokenizer.pad_id
  if c.pack:
    it = packing.pack(
        it,
        max_len=spec.max_len,
        max_images=spec.max_images,
        image_keys=anyres_example.LAYOUT_KEYS if spec.anyres is not None else (),
        max_videos=spec.video_slots,
        pad_id=pad_id,
        num_bins=c.pack_bins or 2 * rows,
        seed=c.seed,
        shuffle_bins=c.shuffle,
    )
  it = it.batch(
      rows,
      drop_remainder=c.drop_remainder,
      batch_fn=functools.partial(collate, batch_size=rows, pad_id=pad_id, empty=empty_example(spec)),
  )
  position = dict(start_batch=c.start_batch, rows=rows, process_index=process_index, process_count=process_count)
  return it, counter, count_stage, position


def make_dataset(source, config: PipelineConfig) -> LlavaBatchIterator:
  """Training batches from a record source (see the module docstring for the batch).

  Args:
    source: a random-access source of records (`sources.LlavaJsonSource`,
      `sources.ArrayRecordLlavaSource`, or a list of record dicts).
    config: the example, batching, process layout and reading (`PipelineConfig`).

  Returns:
    LlavaBatchIterator: `next(it)` -> dict with keys `BATCH_KEYS`;
    `it.get_state()` / `it.set_state(state)`; `it.counts()` -> {reason: n}.
  """
  ds, counter, count_stage, position = _build(source, config, None)
  return LlavaBatchIterator(ds.__iter__(), counter, count_stage=count_stage, **position)
