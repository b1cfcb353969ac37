"""The grain stages of the pipeline that know about processes, rejections and resuming.

`GlobalBatchRows` gives each process its rows of every global batch from one global
order; `_CountRejected` counts, logs and skips (or raises on) rejected samples after the
worker processes; `LlavaBatchIterator` is what `pipeline.make_dataset` returns, with the
position in the global order that `resume_batch` reads to resume on another number of
processes. `pipeline` assembles them (see its module docstring for the whole picture).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from llava_jax.data.tokenize import Rejected, RejectReason, apply_policy

# With policy "skip", this many rejections in a row mean the configuration is wrong
# (template, image root, max_len), not the data: raise rather than spin forever.
MAX_CONSECUTIVE_REJECTS = 10_000

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EmptySlot:
  """A batch slot that holds no example (past the end of a finite pass, or a rejected
  sample in a multi-process finite pass); `collate` makes it an empty row."""


# ----------------------------------------------------------------------------- rejection counting


# Samples trained on after an adjustment, counted like rejections but not skipped: an
# example carries them under "notes" as (kind, detail) pairs (`anyres_example`).
NOTE_KINDS = ("image_downscaled",)
_LOG_FIRST_NOTES = 10  # per kind, then every 1000th


class RejectCounter:
  """Rejections per reason (every `RejectReason`, zero until seen). `counts()` -> dict[str, int].

  Also the adjustments samples were trained with (`NOTE_KINDS`): `notes()`.
  """

  def __init__(self):
    self._counts = {r.value: 0 for r in RejectReason}
    self._notes = {k: 0 for k in NOTE_KINDS}

  def counts(self) -> dict[str, int]:
    return dict(self._counts)

  def notes(self) -> dict[str, int]:
    return dict(self._notes)

  def note(self, sample_id: str, kind: str, detail: str) -> None:
    """Counts one adjustment of a trained sample and logs it (the first few per kind, then every 1000th)."""
    self._notes[kind] += 1
    n = self._notes[kind]
    if n <= _LOG_FIRST_NOTES or n % 1000 == 0:
      log.warning("sample %s: %s [%s #%d]", sample_id, detail, kind, n)

  @property
  def total(self) -> int:
    return sum(self._counts.values())

  def count(self, rejected: Rejected, policy: str) -> None:
    """Counts `rejected` under its reason and logs it; under policy "raise", then raises
    ValueError naming it (`tokenize.apply_policy`)."""
    apply_policy(rejected, policy, self._counts)

  def restore(self, counts: Mapping[str, int], notes: Mapping[str, int] | None = None):
    """Sets the counts to a saved `counts()` and `notes()` (reasons it lacks count 0)."""
    self._counts = {r.value: int(counts.get(r.value, 0)) for r in RejectReason}
    self._notes = {k: int((notes or {}).get(k, 0)) for k in NOTE_KINDS}


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
        if isinstance(value, dict) and "notes" in value:
          value = dict(value)
          for kind, detail in value.pop("notes"):
            self._counter.note(value.get("ids", ""), kind, detail)
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
    return {
        "parent": self._parent.get_state(),
        "rejected": self._counter.counts(),
        "notes": self._counter.notes(),
        "consumed": self._consumed,
    }

  def set_state(self, state: dict[str, Any]):
    self._parent.set_state(state["parent"])
    self._counter.restore(state["rejected"], state.get("notes"))
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

  def notes(self) -> dict[str, int]:
    """Samples trained after an adjustment, per kind (`NOTE_KINDS`: "image_downscaled")."""
    return self._counter.notes()

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
