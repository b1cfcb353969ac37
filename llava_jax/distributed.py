"""Joining a multi-process job (``jax.distributed``) from the command lines.

Every entry point (``llava_jax.train``, ``.generate``, ``.evaluate``) calls
``initialize()`` before touching a device. Where the job's shape comes from, first
match wins:

1. flags ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I``;
2. environment ``LLAVA_JAX_COORDINATOR``, ``LLAVA_JAX_NUM_PROCESSES``,
   ``LLAVA_JAX_PROCESS_ID`` (what ``launch/local_pod.sh`` sets);
3. ``LLAVA_JAX_DISTRIBUTED=1``: ``jax.distributed.initialize()`` with no arguments, which
   detects Cloud TPU VMs, SLURM and Open MPI (``launch/tpu_pod.sh``, ``launch/slurm.sbatch``);
4. none of these: a single process (nothing to do).

On CPU jax does not read the process count from the environment, hence (1)/(2); there
the cross-process collectives run over gloo.
"""

from __future__ import annotations

import os

from absl import flags, logging

_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "multi-process: HOST:PORT of process 0's coordinator (or env LLAVA_JAX_COORDINATOR)"
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "multi-process: number of processes (or env LLAVA_JAX_NUM_PROCESSES)"
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "multi-process: this process's index (or env LLAVA_JAX_PROCESS_ID)"
)

ENV_COORDINATOR = "LLAVA_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "LLAVA_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "LLAVA_JAX_PROCESS_ID"
ENV_AUTO = "LLAVA_JAX_DISTRIBUTED"


def _setting(flag, env: str, cast):
  if flag.present or flag.value is not None:
    return flag.value
  value = os.environ.get(env)
  return None if value in (None, "") else cast(value)


def job_spec() -> tuple[str | None, int | None, int | None, bool]:
  """(coordinator, num_processes, process_id, auto) from flags, then the environment."""
  parsed = flags.FLAGS.is_parsed()
  get = (
      lambda flag, env, cast: _setting(flag, env, cast)
      if parsed
      else (None if os.environ.get(env) in (None, "") else cast(os.environ[env]))
  )
  coordinator = get(_COORDINATOR, ENV_COORDINATOR, str)
  num = get(_NUM_PROCESSES, ENV_NUM_PROCESSES, int)
  pid = get(_PROCESS_ID, ENV_PROCESS_ID, int)
  auto = os.environ.get(ENV_AUTO, "") not in ("", "0")
  return coordinator, num, pid, auto


def initialize() -> None:
  """Joins the job described by the flags / environment (see the module docstring)."""
  import jax

  coordinator, num, pid, auto = job_spec()
  given = [x is not None for x in (coordinator, num, pid)]
  if any(given) and not all(given):
    raise ValueError(
        "multi-process needs all of --coordinator_address, --num_processes and "
        f"--process_id (or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); "
        f"got coordinator={coordinator!r}, num_processes={num}, process_id={pid}"
    )
  if all(given):
    if not 0 <= pid < num:
      raise ValueError(f"process_id {pid} is not in [0, num_processes={num})")
    if num == 1:
      return
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num, process_id=pid)
  elif auto:
    jax.distributed.initialize()
  else:
    return
  logging.info(
      "process %d of %d: %d local of %d devices",
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      jax.device_count(),
  )


def is_primary() -> bool:
  """True on the process that writes the run's files (metrics, eval, answers)."""
  import jax

  return jax.process_index() == 0


def sum_over_processes(values):
  """float64[N] summed over every process (one all-gather; every process must call it)."""
  import jax
  import numpy as np

  values = np.asarray(values, np.float64)
  if jax.process_count() == 1:
    return values
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(values)).reshape(-1, values.size).sum(0)


def gather_json(obj) -> list:
  """Every process's JSON-able ``obj``, in process order, on every process."""
  import json

  import jax
  import numpy as np

  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils

  raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.asarray([raw.size], np.int64))).reshape(-1)
  padded = np.zeros((int(sizes.max()),), np.uint8)
  padded[: raw.size] = raw
  rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
  return [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, sizes)]


def barrier(name: str) -> None:
  """Waits until every process got here (no-op on one process)."""
  import jax

  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)
