"""The grain input pipeline: LLaVA records -> fixed-shape, checkpointable training batches.

    it = make_dataset(ArrayRecordLlavaSource(dir), tokenizer=tok, template="llava_v1",
                      image_config=image_config_for("clip", 336, "pad"), image_token_id=32000,
                      num_image_tokens=576, max_len=2048, max_images=1, batch_size=32, seed=0)
    batch = next(it)                     # dict of numpy arrays (keys below)
    state = it.get_state()               # JSON-able; store it with the checkpoint
    it.counts()                          # {"bad_image": 3, "template_mismatch": 0, ...}

Stages (grain 0.2 `MapDataset` / `IterDataset`):

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

`ids` is not an array JAX can take: drop it before `jax.device_put`.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from llava_jax.data import packing
from llava_jax.data.images import ImageConfig, load_image, preprocess
from llava_jax.data.templates import Template
from llava_jax.data.records import RecordError, image_list, sample_id_of
from llava_jax.data.tokenize import (
    IGNORE,
    Rejected,
    RejectReason,
    TokenizedSample,
    apply_policy,
    tokenize_conversation,
)
from llava_jax.tokenizer import Tokenizer

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


BATCH_KEYS = ("input_ids", "labels", "attention_mask", "positions", "pixel_values", "image_mask", "ids")
# With policy "skip", this many rejections in a row mean the configuration is wrong
# (template, image root, max_len), not the data: raise rather than spin forever.
MAX_CONSECUTIVE_REJECTS = 10_000


# ----------------------------------------------------------------------------- one example


def prepare_example(
    record: Mapping,
    *,
    tokenizer: Tokenizer,
    template: str | Template,
    image_config: ImageConfig,
    image_token_id: int,
    num_image_tokens: int,
    max_len: int,
    max_images: int,
    pad: bool = True,
) -> dict[str, Any] | Rejected:
  """One source record -> a padded example, or a Rejected saying why not.

  Args:
    record: `{"id", "conversations", "images": [path | bytes | None, ...]}`
      (a `sources` record; LLaVA's "image" key works too, not both: `records.image_list`).
    tokenizer, template, image_token_id, num_image_tokens, max_len: as
      `tokenize.tokenize_conversation`.
    image_config: preprocessing; S = image_config.size.
    max_images: image slots M per example.
    pad: False returns the example unpadded, for packing: {"input_ids": int32[L],
      "labels": int32[L], "pixel_values": float32[I, S, S, 3], "ids": str} with L
      tokens and I images.

  Returns:
    {"input_ids": int32[T], "labels": int32[T], "attention_mask": int32[T],
    "positions": int32[T], "pixel_values": float32[M, S, S, 3], "image_mask": bool[M],
    "ids": str} with T = max_len, or Rejected(id, reason, detail): `image_count_mismatch`
    for more than M images, `bad_image` for a missing (None, or no such
    file) or undecodable image, `bad_record` for an unreadable record or one with
    both "image" and "images",
    and every reason of `tokenize_conversation`.
  """
  sid = sample_id_of(record)
  if record.get("error"):  # the source could not read it (sources.bad_record)
    return Rejected(sid, RejectReason.BAD_RECORD, str(record["error"]))
  try:
    images = image_list(record)
  except RecordError as e:  # both "image" and "images"
    return Rejected(sid, RejectReason.BAD_RECORD, str(e))
  if len(images) > max_images:
    return Rejected(
        sid,
        RejectReason.IMAGE_COUNT_MISMATCH,
        f"{len(images)} images, more than the max_images={max_images} slots per example",
    )
  tokenized = tokenize_conversation(
      {"id": sid, "conversations": record.get("conversations"), "images": images},
      tokenizer,
      template,
      image_token_id=image_token_id,
      num_image_tokens=num_image_tokens,
      max_len=max_len,
  )
  if isinstance(tokenized, Rejected):
    return tokenized
  s = image_config.size
  pixels = np.zeros((max_images if pad else len(images), s, s, 3), np.float32)
  # Images cut away by truncation are already rejected (truncated_image), so all are used.
  for k, image in enumerate(images):
    if image is None:  # a source that could not provide it
      return Rejected(sid, RejectReason.BAD_IMAGE, f"image {k} of {len(images)} is missing (None)")
    try:
      pixels[k] = preprocess(load_image(image), image_config)
    except (ValueError, OSError) as e:  # load_image: ValueError naming the file; OSError: unreadable
      return Rejected(sid, RejectReason.BAD_IMAGE, f"image {k} of {len(images)}: {e}")
  if not pad:
    return {
        "input_ids": np.asarray(tokenized.input_ids, np.int32),
        "labels": np.asarray(tokenized.labels, np.int32),
        "pixel_values": pixels,
        "ids": tokenized.sample_id,
    }
  return pad_example(tokenized, max_len=max_len, pad_id=tokenizer.pad_id, pixel_values=pixels, num_images=len(images))


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


@dataclasses.dataclass(frozen=True)
class EmptySlot:
  """A batch slot that holds no example (past the end of a finite pass, or a rejected
  sample in a multi-process finite pass); `collate` makes it an empty row."""


def empty_example(*, max_len: int, max_images: int, image_size: int, pad_id: int) -> dict[str, Any]:
  """An empty row: pad tokens, IGNORE labels, mask 0, no images, id ""."""
  return {
      "input_ids": np.full((max_len,), pad_id, np.int32),
      "labels": np.full((max_len,), IGNORE, np.int32),
      "attention_mask": np.zeros((max_len,), np.int32),
      "positions": np.zeros((max_len,), np.int32),
      "pixel_values": np.zeros((max_images, image_size, image_size, 3), np.float32),
      "image_mask": np.zeros((max_images,), bool),
      "ids": "",
  }


@dataclasses.dataclass(frozen=True)
class PrepareExample(grain.transforms.Map):
  """`prepare_example` as a picklable grain transform (it runs in worker processes)."""

  tokenizer: Tokenizer
  template: str | Template
  image_config: ImageConfig
  image_token_id: int
  num_image_tokens: int
  max_len: int
  max_images: int
  pad: bool = True

  def map(self, record):
    if isinstance(record, EmptySlot):  # GlobalBatchRows past the end of a finite pass
      return record
    return prepare_example(
        record,
        tokenizer=self.tokenizer,
        template=self.template,
        image_config=self.image_config,
        image_token_id=self.image_token_id,
        num_image_tokens=self.num_image_tokens,
        max_len=self.max_len,
        max_images=self.max_images,
        pad=self.pad,
    )


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
  out = {k: np.stack([e[k] for e in examples]) for k in BATCH_KEYS if k != "ids"}
  ids = [str(e["ids"]) for e in examples]
  missing = 0 if batch_size is None else batch_size - len(examples)
  if missing > 0:
    fill = {"input_ids": pad_id, "labels": IGNORE}
    for k, v in out.items():
      out[k] = np.concatenate([v, np.full((missing,) + v.shape[1:], fill.get(k, 0), v.dtype)])
    ids += [""] * missing
  out["ids"] = np.asarray(ids, dtype=object)
  return out


# ----------------------------------------------------------------------------- rejection counting


class RejectCounter:
  """Rejections per reason (every `RejectReason`, zero until seen). `counts()` -> dict[str, int]."""

  def __init__(self):
    self._counts = {r.value: 0 for r in RejectReason}

  def counts(self) -> dict[str, int]:
    return dict(self._counts)

  @property
  def total(self) -> int:
    return sum(self._counts.values())

  def count(self, rejected: Rejected, policy: str) -> None:
    """Counts `rejected` under its reason and logs it; under policy "raise", then raises
    ValueError naming it (`tokenize.apply_policy`)."""
    apply_policy(rejected, policy, self._counts)

  def restore(self, counts: Mapping[str, int]):
    """Sets the counts to a saved `counts()` (reasons it lacks count 0)."""
    self._counts = {r.value: int(counts.get(r.value, 0)) for r in RejectReason}


class _CountRejectedIterator(grain.DatasetIterator):
  """Passes examples through; counts, logs and skips (or raises on) `Rejected` values."""

  def __init__(self, parent: grain.DatasetIterator, policy: str, counter: RejectCounter, keep_slots: bool = False):
    super().__init__(parent)
    self._policy = policy
    self._counter = counter
    self._keep_slots = keep_slots
    self._consumed = 0  # elements taken from the parent, rejected ones included

  @property
  def consumed(self) -> int:
    return self._consumed

  def __next__(self):
    in_a_row = 0
    while True:
      value = next(self._parent)
      self._consumed += 1
      if not isinstance(value, Rejected):
        return value
      self._counter.count(value, self._policy)  # raises under "raise"
      if self._keep_slots:
        return EmptySlot()
      in_a_row += 1
      if in_a_row >= MAX_CONSECUTIVE_REJECTS:
        raise RuntimeError(
            f"{in_a_row} samples in a row rejected (last: {value}); counts so far "
            f"{self._counter.counts()}: check the template, image root and max_len"
        )

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._parent.get_state(), "rejected": self._counter.counts(), "consumed": self._consumed}

  def set_state(self, state: dict[str, Any]):
    self._parent.set_state(state["parent"])
    self._counter.restore(state["rejected"])
    self._consumed = int(state.get("consumed", 0))

  def __str__(self) -> str:
    return f"CountRejected(policy={self._policy!r})"


class _CountRejected(grain.IterDataset):
  """IterDataset wrapper of `_CountRejectedIterator`; its iterators share `counter`."""

  def __init__(self, parent: grain.IterDataset, policy: str, counter: RejectCounter, keep_slots: bool = False):
    super().__init__(parent)
    self._policy = policy
    self._counter = counter
    self._keep_slots = keep_slots
    self.last_iterator: _CountRejectedIterator | None = None

  def __iter__(self) -> grain.DatasetIterator:
    self.last_iterator = _CountRejectedIterator(self._parent.__iter__(), self._policy, self._counter, self._keep_slots)
    return self.last_iterator

  def __str__(self) -> str:
    return f"CountRejected(policy={self._policy!r})"


class LlavaBatchIterator(grain.DatasetIterator):
  """What `make_dataset` returns: a grain DatasetIterator of batches, plus `counts()`.

  `get_state()` / `set_state()` are grain's (JSON-able dicts; orbax saves
  them with `grain.checkpoint.CheckpointSave(it)`, one file per process); restoring
  continues with exactly the batches that followed the saved state, and restores the
  rejection counts of that moment. The state also records where this process is in
  the global order (`position`), from which `resume_batch` finds where a run resumed
  on a different number of processes starts.
  """

  def __init__(
      self,
      parent: grain.DatasetIterator,
      counter: RejectCounter,
      *,
      count_stage: _CountRejected,
      start_batch: int,
      rows: int,
      process_index: int,
      process_count: int,
  ):
    super().__init__(parent)
    self._counter = counter
    self._count_stage = count_stage
    self._position = {
        "start_batch": int(start_batch),
        "rows": int(rows),
        "process_index": int(process_index),
        "process_count": int(process_count),
    }

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._parent)

  def counts(self) -> dict[str, int]:
    """Rejected samples per reason so far (all workers; all `RejectReason` values as keys)."""
    return self._counter.counts()

  def position(self) -> dict[str, int]:
    """start_batch, rows (per global batch), process_index/count and elements consumed."""
    it = self._count_stage.last_iterator
    return {**self._position, "consumed": 0 if it is None else it.consumed}

  def get_state(self) -> dict[str, Any]:
    return {"pipeline": self._parent.get_state(), "position": self.position()}

  def set_state(self, state: dict[str, Any]):
    if "pipeline" not in state:  # a state saved before positions were recorded
      self._parent.set_state(state)
      return
    saved = state["position"]
    for key in ("start_batch", "rows", "process_index", "process_count"):
      if int(saved[key]) != self._position[key]:
        raise ValueError(
            f"data iterator state was saved with {key}={saved[key]}, this pipeline "
            f"has {self._position[key]}; build it with `resume_batch` of the saved "
            "states to resume on a different number of processes"
        )
    self._parent.set_state(state["pipeline"])

  def __str__(self) -> str:
    return "LlavaBatchIterator"


def resume_batch(states: Sequence[Mapping[str, Any]]) -> int:
  """The first global batch that no process of a saved run had started reading.

  `states`: every process's `get_state()` of one checkpoint. A pipeline built with
  `start_batch` = this continues the run on any number of processes: without
  rejections (every process exactly at a batch boundary) it is exactly the next global
  batch; otherwise the partly read batch is skipped, so no example is seen twice.
  """
  first = 0
  for st in states:
    pos = st["position"]
    first = max(first, pos["start_batch"] + -(-pos["consumed"] // pos["rows"]))
  return first


# ----------------------------------------------------------------------------- the pipeline


class GlobalBatchRows(grain.MapDataset):
  """This process's rows of every global batch, from one global order (`parent`).

  Local element j is element (start_batch + j // b) * G + p * b + j % b of `parent`,
  with G = global_batch, b = G / process_count, p = process_index. Over several
  processes a finite parent is cut to whole global batches (`pad_last=False`) or padded
  to them with `EmptySlot`s (`pad_last=True`; `collate` makes them empty rows),
  so that every process yields as many elements; one process reads it all.
  """

  def __init__(
      self,
      parent: grain.MapDataset,
      *,
      global_batch: int,
      process_index: int,
      process_count: int,
      start_batch: int = 0,
      pad_last: bool = False,
  ):
    super().__init__(parent)
    if global_batch % process_count:
      raise ValueError(
          f"the global batch ({global_batch}, train.batch_size) must be a multiple of "
          f"the number of processes ({process_count})"
      )
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
    self._g, self._p, self._b = global_batch, process_index, global_batch // process_count
    self._start, self._n = start_batch * global_batch, len(parent)
    left = max(self._n - self._start, 0)
    if self._n >= sys.maxsize // 2:  # repeated forever
      self._length = sys.maxsize
    elif process_count == 1:  # one process: the rest as it is (batching cuts or pads it)
      self._length = left
    else:
      batches = -(-left // global_batch) if pad_last else left // global_batch
      self._length = batches * self._b

  def __len__(self) -> int:
    return self._length

  def _index(self, j: int) -> int:
    k, r = divmod(j, self._b)
    return self._start + k * self._g + self._p * self._b + r

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    i = self._index(index)
    return self._parent[i] if i < self._n else EmptySlot()  # (grain drops None elements)

  def __str__(self) -> str:
    return f"GlobalBatchRows(G={self._g}, process {self._p}, rows {self._b})"


def _ensure_absl_flags_parsed():
  """grain's worker processes read absl flags; a library caller (tests, notebooks) may not have parsed them."""
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_iter_dataset(
    source,
    *,
    tokenizer: Tokenizer,
    template: str | Template,
    image_config: ImageConfig,
    image_token_id: int,
    num_image_tokens: int,
    max_len: int,
    max_images: int,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    policy: str = "skip",
    worker_count: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    start_batch: int = 0,
    drop_remainder: bool = True,
    read_threads: int = 2,
    prefetch_buffer_size: int = 16,
    pack: bool = False,
    pack_bins: int | None = None,
    counter: RejectCounter | None = None,
) -> tuple[grain.IterDataset, RejectCounter]:
  """The pipeline as a grain IterDataset (of batches) and its RejectCounter; see `make_dataset`."""
  ds, counter, _, _ = _build(
      source,
      tokenizer=tokenizer,
      template=template,
      image_config=image_config,
      image_token_id=image_token_id,
      num_image_tokens=num_image_tokens,
      max_len=max_len,
      max_images=max_images,
      batch_size=batch_size,
      seed=seed,
      shuffle=shuffle,
      num_epochs=num_epochs,
      policy=policy,
      worker_count=worker_count,
      process_index=process_index,
      process_count=process_count,
      start_batch=start_batch,
      drop_remainder=drop_remainder,
      read_threads=read_threads,
      prefetch_buffer_size=prefetch_buffer_size,
      pack=pack,
      pack_bins=pack_bins,
      counter=counter,
  )
  return ds, counter


def _build(
    source,
    *,
    tokenizer,
    template,
    image_config,
    image_token_id,
    num_image_tokens,
    max_len,
    max_images,
    batch_size,
    seed,
    shuffle,
    num_epochs,
    policy,
    worker_count,
    process_index,
    process_count,
    start_batch,
    drop_remainder,
    read_threads,
    prefetch_buffer_size,
    pack,
    pack_bins,
    counter,
):
  if policy not in ("skip", "raise"):
    raise ValueError(f"policy must be 'skip' or 'raise', got {policy!r}")
  if batch_size < 1 or max_images < 0 or max_len < 1:
    raise ValueError(f"need batch_size >= 1, max_images >= 0, max_len >= 1; got {batch_size}, {max_images}, {max_len}")
  if process_index is None or process_count is None:
    import jax  # local: only for the default process layout

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  finite = num_epochs is not None
  # Finite passes over several processes keep every slot, so all yield as many batches.
  keep_slots = finite and process_count > 1
  if keep_slots and pack:
    raise ValueError(
        "pack=True with a finite pass (num_epochs) over several processes is not "
        "supported: the processes would yield different numbers of rows"
    )
  counter = counter or RejectCounter()
  ds = grain.MapDataset.source(source)
  if len(ds) == 0:
    raise ValueError(f"the data source {source!r} holds no records")
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  ds = GlobalBatchRows(
      ds,
      global_batch=batch_size,
      process_index=process_index,
      process_count=process_count,
      start_batch=start_batch,
      pad_last=finite and not drop_remainder,
  )
  rows = batch_size // process_count
  ds = ds.map(
      PrepareExample(
          tokenizer, template, image_config, image_token_id, num_image_tokens, max_len, max_images, pad=not pack
      )
  )
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_buffer_size))
  if worker_count > 0:
    _ensure_absl_flags_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  count_stage = _CountRejected(it, policy, counter, keep_slots=keep_slots)
  it = count_stage
  if pack:
    it = packing.pack(
        it,
        max_len=max_len,
        max_images=max_images,
        pad_id=tokenizer.pad_id,
        num_bins=pack_bins or 2 * rows,
        seed=seed,
        shuffle_bins=shuffle,
    )
  empty = empty_example(max_len=max_len, max_images=max_images, image_size=image_config.size, pad_id=tokenizer.pad_id)
  it = it.batch(
      rows,
      drop_remainder=drop_remainder,
      batch_fn=functools.partial(collate, batch_size=rows, pad_id=tokenizer.pad_id, empty=empty),
  )
  position = dict(start_batch=start_batch, rows=rows, process_index=process_index, process_count=process_count)
  return it, counter, count_stage, position


def make_dataset(
    source,
    *,
    tokenizer: Tokenizer,
    template: str | Template,
    image_config: ImageConfig,
    image_token_id: int,
    num_image_tokens: int,
    max_len: int,
    max_images: int,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    policy: str = "skip",
    worker_count: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    start_batch: int = 0,
    drop_remainder: bool = True,
    read_threads: int = 2,
    prefetch_buffer_size: int = 16,
    pack: bool = False,
    pack_bins: int | None = None,
) -> LlavaBatchIterator:
  """Training batches from a record source (see the module docstring for the batch).

  Args:
    source: a random-access source of records (`sources.LlavaJsonSource`,
      `sources.ArrayRecordLlavaSource`, or a list of record dicts).
    tokenizer, template, image_token_id, num_image_tokens, max_len: as
      `tokenize.tokenize_conversation`; T = max_len.
    image_config: image preprocessing; S = image_config.size.
    max_images: image slots M per example; a sample with more images is
      rejected (`image_count_mismatch`).
    batch_size: G, the global batch (all processes together); each process yields
      B = G / process_count rows of it.
    seed: shuffle seed (each epoch is reshuffled from it).
    shuffle: False keeps the source order (e.g. evaluation).
    num_epochs: passes over the data; None repeats forever.
    policy: "skip" (count, log the id, drop) or "raise" (ValueError naming
      the sample id, reason and detail) for rejected samples.
    worker_count: grain worker processes (0: decode in this process's threads).
    process_index, process_count: this process's rows of each global batch; default
      `jax.process_index()` / `jax.process_count()`. See `GlobalBatchRows`.
    start_batch: the global batch to start at (resuming on a different number of
      processes: `resume_batch`).
    drop_remainder: drop the last partial global batch of a finite pass; False pads
      it with empty rows (labels all IGNORE, id "").
    read_threads, prefetch_buffer_size: grain ReadOptions per process.
    pack: several examples per row (see `packing`): rows of max_len tokens and
      max_images image slots, segment ids in "attention_mask", "positions"
      restarting per example. Batches then hold more examples than B.
    pack_bins: rows the packer fills at once (default 2 * B).

  Returns:
    LlavaBatchIterator: `next(it)` -> dict with keys `BATCH_KEYS`;
    `it.get_state()` / `it.set_state(state)`; `it.counts()` -> {reason: n}.
  """
  ds, counter, count_stage, position = _build(
      source,
      tokenizer=tokenizer,
      template=template,
      image_config=image_config,
      image_token_id=image_token_id,
      num_image_tokens=num_image_tokens,
      max_len=max_len,
      max_images=max_images,
      batch_size=batch_size,
      seed=seed,
      shuffle=shuffle,
      num_epochs=num_epochs,
      policy=policy,
      worker_count=worker_count,
      process_index=process_index,
      process_count=process_count,
      start_batch=start_batch,
      drop_remainder=drop_remainder,
      read_threads=read_threads,
      prefetch_buffer_size=prefetch_buffer_size,
      pack=pack,
      pack_bins=pack_bins,
      counter=None,
  )
  return LlavaBatchIterator(ds.__iter__(), counter, count_stage=count_stage, **position)
