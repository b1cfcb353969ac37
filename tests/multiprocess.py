"""Run a ``python -m`` module as a local multi-process JAX job, for tests.

    from multiprocess import run_module
    outs = run_module("llava_jax.evaluate", "--checkpoint=...", num_processes=2,
                      devices_per_process=2)
    outs[0].stdout, outs[1].stderr, outs[0].returncode

API:

* ``run_module(module, *args, num_processes=2, devices_per_process=2, timeout=240,
  env=None, stdin=None, check=True) -> list[ProcessOutput]`` starts ``num_processes``
  processes of ``python -m module args…`` from the repository root, joined as one job
  through the same environment ``launch/local_pod.sh`` sets (``LLAVA_JAX_COORDINATOR`` =
  127.0.0.1 and a port from ``portpicker``, ``LLAVA_JAX_NUM_PROCESSES``,
  ``LLAVA_JAX_PROCESS_ID``), each on ``devices_per_process`` fake CPU devices
  (``XLA_FLAGS``; pytest's own 8-device flag is not inherited). With ``num_processes=1``
  no job variables are set: a plain single process with that many devices. ``stdin``
  (text) goes to process 0; the others read an empty stdin, as on a pod. ``env`` adds or
  overrides variables. Returns when every process has exited; with ``check`` a non-zero
  exit or passing ``timeout`` seconds stops the rest and fails the test with every
  process's output tail.
* ``Job`` (what ``run_module`` uses) for tests that need to act while the processes run:
  ``job = Job(module, *args, …)``, ``job.poll() -> bool`` (all exited), ``job.kill()``
  (SIGKILL to all, as a pre-empted host), ``job.wait(timeout, check=True)``.
* ``ProcessOutput(index, returncode, stdout, stderr)``.

stdout and stderr are kept apart (files in a temp dir), so a test can check what each
process printed, e.g. that only process 0 prints an answer.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import time

import portpicker
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TAIL = 4000


@dataclasses.dataclass
class ProcessOutput:
  index: int
  returncode: int | None
  stdout: str
  stderr: str


def _env(num_processes: int, index: int, devices: int, port: int, extra: dict | None) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith("LLAVA_JAX_")}
  flags = " ".join(
      f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")
  )
  env.update(
      JAX_PLATFORMS="cpu",
      PYTHONUNBUFFERED="1",
      XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}".strip(),
  )
  if num_processes > 1:
    env.update(
        LLAVA_JAX_COORDINATOR=f"127.0.0.1:{port}",
        LLAVA_JAX_NUM_PROCESSES=str(num_processes),
        LLAVA_JAX_PROCESS_ID=str(index),
    )
  env.update(extra or {})
  return env


class Job:
  """``num_processes`` processes of ``python -m module args`` joined as one jax job."""

  def __init__(
      self,
      module: str,
      *args: str,
      num_processes: int = 2,
      devices_per_process: int = 2,
      env: dict | None = None,
      stdin: str | None = None,
  ):
    self.module, self.num_processes = module, num_processes
    self._dir = tempfile.TemporaryDirectory(prefix="multiprocess_")
    port = portpicker.pick_unused_port() if num_processes > 1 else 0
    self._procs, self._files = [], []
    for i in range(num_processes):
      out = open(os.path.join(self._dir.name, f"process_{i}.out"), "w+")
      err = open(os.path.join(self._dir.name, f"process_{i}.err"), "w+")
      self._files.append((out, err))
      self._procs.append(
          subprocess.Popen(
              [sys.executable, "-m", module, *args],
              cwd=ROOT,
              stdout=out,
              stderr=err,
              stdin=subprocess.PIPE if i == 0 and stdin is not None else subprocess.DEVNULL,
              env=_env(num_processes, i, devices_per_process, port, env),
              text=True,
          )
      )
    if stdin is not None:
      self._procs[0].stdin.write(stdin)
      self._procs[0].stdin.close()

  def poll(self) -> bool:
    """True once every process has exited."""
    return all(p.poll() is not None for p in self._procs)

  def kill(self) -> None:
    for p in self._procs:
      if p.poll() is None:
        p.send_signal(signal.SIGKILL)
    for p in self._procs:
      p.wait()

  def outputs(self) -> list[ProcessOutput]:
    outs = []
    for i, (p, (out, err)) in enumerate(zip(self._procs, self._files)):
      out.flush(), err.flush()
      out.seek(0), err.seek(0)
      outs.append(ProcessOutput(i, p.poll(), out.read(), err.read()))
    return outs

  def report(self, why: str) -> str:
    parts = [f"{self.module} on {self.num_processes} processes: {why}"]
    for o in self.outputs():
      parts.append(
          f"--- process {o.index} (exit {o.returncode}) stdout:\n{o.stdout[-_TAIL:]}"
          f"\n--- process {o.index} stderr:\n{o.stderr[-_TAIL:]}"
      )
    return "\n".join(parts)

  def wait(self, timeout: float = 240, check: bool = True) -> list[ProcessOutput]:
    """Waits for every process; with ``check``, fails the test (logs attached) on a
    non-zero exit (the others are killed at once) or after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    try:
      while not self.poll():
        failed = [i for i, p in enumerate(self._procs) if p.poll() not in (None, 0)]
        if check and failed:
          self.kill()
          pytest.fail(
              self.report(f"process {failed[0]} exited with {self._procs[failed[0]].returncode}"), pytrace=False
          )
        if time.monotonic() > deadline:
          self.kill()
          pytest.fail(self.report(f"timed out after {timeout:.0f} s"), pytrace=False)
        time.sleep(0.1)
      outs = self.outputs()
      bad = [o for o in outs if o.returncode != 0]
      if check and bad:
        pytest.fail(self.report(f"process {bad[0].index} exited with {bad[0].returncode}"), pytrace=False)
      return outs
    finally:
      if self.poll():
        self.close()

  def close(self) -> None:
    for out, err in self._files:
      out.close(), err.close()
    self._dir.cleanup()

  def __del__(self):
    try:
      self.kill()
    except Exception:  # interpreter shutdown
      pass


def run_module(
    module: str,
    *args: str,
    num_processes: int = 2,
    devices_per_process: int = 2,
    timeout: float = 240,
    env: dict | None = None,
    stdin: str | None = None,
    check: bool = True,
) -> list[ProcessOutput]:
  """Runs ``python -m module args`` in ``num_processes`` processes; see the module doc."""
  return Job(
      module, *args, num_processes=num_processes, devices_per_process=devices_per_process, env=env, stdin=stdin
  ).wait(timeout, check)
