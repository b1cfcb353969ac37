"""Training telemetry: ``metrics.jsonl``, TensorBoard, MFU and throughput.

MFU = analytic model FLOPs per step (``train/flops.py``) / step time / peak FLOP/s of
all devices (the configured peak, or this machine's measured float32 matmul rate).

The workdir may be local or ``gs://`` (``llava_jax.storage``): each row of
``metrics.jsonl`` is appended and published at once (on a bucket, one atomic compose
per row, so the object only ever holds whole rows), and ``eval.json`` is replaced whole.
"""

from __future__ import annotations

import json
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from llava_jax import storage


def measure_matmul_peak(n: int = 1024, reps: int = 5) -> float:
  """FLOP/s of a float32 n x n matmul on one default device: the CPU 'peak' for MFU."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n**3 / best


class MetricWriter:
  """Appends one JSON object per logged step to ``metrics.jsonl`` and mirrors scalars to
  TensorBoard (``tb/``); ``eval.json`` holds the latest evaluation."""

  def __init__(self, workdir: str, tensorboard: bool = True, resume_step: int | None = None):
    self.workdir = workdir
    self._primary = jax.process_index() == 0  # only process 0 writes the run's files
    self._jsonl = None
    self._tb = None
    if not self._primary:
      return
    storage.makedirs(workdir)
    path = storage.join(workdir, "metrics.jsonl")
    repair_metrics(path, keep_through=resume_step)
    self._jsonl = storage.Appender(path)
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter
        # tensorboardX writes gs:// itself (google-cloud-storage, the whole event file per flush)
        self._tb = SummaryWriter(storage.join(workdir, "tb"))
      except ImportError:
        logging.warning("tensorboardX not installed: no TensorBoard summaries")

  def write(self, step: int, metrics: Mapping[str, Any]):
    row = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
    if self._primary:
      self._jsonl.append(json.dumps(row) + "\n")
      self._jsonl.flush()
      if self._tb is not None:
        for k, v in row.items():
          if k != "step" and isinstance(v, (int, float)):
            self._tb.add_scalar(k, v, step)

  def write_eval(self, step: int, results: Mapping[str, Any]):
    row = {"step": int(step), **{k: _scalar(v) for k, v in results.items()}}
    if self._primary:
      storage.write_json(row, storage.join(self.workdir, "eval.json"), indent=2)
      self.write(step, {f"eval/{k}": v for k, v in results.items()})

  def close(self):
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def repair_metrics(path: str, keep_through: int | None = None) -> None:
  """Makes ``metrics.jsonl`` safe to append to on resume.

  Drops a last line cut short by a kill, and (``keep_through``: the step a run resumes
  from) the rows of steps after it, which the resumed run logs again, so no step is
  written twice. The file is rewritten atomically, and only if something changes.
  """
  if not storage.exists(path):
    return
  raw = storage.read_bytes(path)
  keep, dropped_tail, dropped_rows = [], False, 0
  lines = raw.split(b"\n")
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except ValueError:
      if i == len(lines) - 1 or all(not rest.strip() for rest in lines[i + 1 :]):
        dropped_tail = True  # the write a kill cut short
        continue
      raise ValueError(f"{path}: line {i + 1} is not JSON (and not the last): {line[:200]!r}")
    if keep_through is not None and isinstance(row, dict) and row.get("step", 0) > keep_through:
      dropped_rows += 1
      continue
    keep.append(line)
  if not dropped_tail and not dropped_rows and raw.endswith(b"\n") or not raw:
    return
  storage.write_atomic(path, b"".join(line + b"\n" for line in keep))
  logging.warning(
      "%s: %s%s",
      path,
      "dropped a partly written last line; " if dropped_tail else "",
      f"dropped {dropped_rows} rows after step {keep_through} (logged again on resume)" if dropped_rows else "",
  )


def _scalar(v):
  if isinstance(v, (jax.Array, np.ndarray, np.generic)):
    v = np.asarray(v).item()
  if isinstance(v, float) and not np.isfinite(v):
    return str(v)
  return v


class Throughput:
  """Tokens/s, examples/s and MFU over the steps since the last ``report``.

  ``update`` takes this process's counts; ``report(reduce=...)`` sums them (and any
  ``extra`` counters, in the same collective) over the processes, so the figures are the
  job's. ``flops_per_step`` is the global step's, ``num_devices`` every device of the job.
  """

  def __init__(self, flops_per_step: float | None, peak_flops: float | None, num_devices: int):
    self.flops_per_step, self.peak, self.devices = flops_per_step, peak_flops, num_devices
    self._t, self._steps, self._tokens, self._examples = time.perf_counter(), 0, 0, 0

  def update(self, tokens: int, examples: int):
    self._steps += 1
    self._tokens += tokens
    self._examples += examples

  def report(self, reduce=None, extra=None) -> dict[str, Any]:
    now = time.perf_counter()
    dt = max(now - self._t, 1e-9)
    counts = np.asarray([self._tokens, self._examples, *(extra or [])], np.float64)
    if reduce is not None:
      counts = np.asarray(reduce(counts))
    tokens, examples = counts[0], counts[1]
    out = {
        "tokens_per_s": float(tokens) / dt,
        "examples_per_s": float(examples) / dt,
        "step_time_s": dt / max(self._steps, 1),
    }
    if extra is not None:
      out["extra"] = [float(x) for x in counts[2:]]
    if self.flops_per_step and self.peak:
      out["mfu"] = self.flops_per_step * self._steps / dt / (self.peak * self.devices)
    self._t, self._steps, self._tokens, self._examples = now, 0, 0, 0
    return out
