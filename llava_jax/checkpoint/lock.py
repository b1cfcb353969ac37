"""One trainer per workdir: ``DIR/run.lock``, held for the run's life.

Two trainers on one workdir interleave checkpoints and metrics (orbax errors, duplicated
rows, hangs on barriers). The lock file is created atomically (``O_CREAT | O_EXCL``) and
names its holder: host, pid, start time. A second trainer is refused at once with that
holder in the message. A lock whose holder is gone is stale and taken over (logged):
on the same host when its pid no longer runs; from another host when its heartbeat (the
holder rewrites the file's mtime every ``HEARTBEAT_S``) is older than ``STALE_S``.

In a multi-process run only process 0 holds the lock (the others learn the outcome from
it), so one job's processes share it and a second job is refused on every process.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time

from absl import logging

LOCK_FILE = "run.lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0


class WorkdirLockedError(RuntimeError):
  """Another live trainer holds the workdir."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


def _read(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}  # half-written or unreadable: judged by its mtime below


class WorkdirLock:
  """``with WorkdirLock(workdir):`` … (or ``acquire()`` / ``release()``)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self._me = {"host": socket.gethostname(), "pid": os.getpid(),
                "start": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "started_at": time.time()}
    self._stop = threading.Event()
    self._beat: threading.Thread | None = None
    self.held = False

  def _stale_reason(self, holder: dict) -> str | None:
    try:
      age = time.time() - os.path.getmtime(self.path)
    except OSError:
      return "vanished"
    if holder.get("host") == self._me["host"] and isinstance(holder.get("pid"), int):
      return None if _pid_alive(holder["pid"]) else f"pid {holder['pid']} is not running"
    return f"no heartbeat for {age:.0f} s" if age > STALE_S else None

  def acquire(self) -> "WorkdirLock":
    os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
    for _ in range(3):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = _read(self.path)
        why = self._stale_reason(holder)
        if why is None:
          raise WorkdirLockedError(
              f"{os.path.dirname(self.path)} is in use by another trainer: host "
              f"{holder.get('host', '?')}, pid {holder.get('pid', '?')}, started "
              f"{holder.get('start', '?')} ({self.path}). Use another --workdir, or stop that "
              "run; a lock left by a dead run is taken over automatically.") from None
        logging.warning("taking over the stale lock %s (%s; holder %s)", self.path, why, holder)
        try:
          os.remove(self.path)
        except FileNotFoundError:
          pass
        continue
      with os.fdopen(fd, "w") as f:
        json.dump(self._me, f)
      self.held = True
      self._beat = threading.Thread(target=self._heartbeat, daemon=True, name="workdir-lock")
      self._beat.start()
      return self
    raise WorkdirLockedError(f"could not take {self.path}: another trainer keeps taking it")

  def _heartbeat(self):
    while not self._stop.wait(HEARTBEAT_S):
      try:
        os.utime(self.path)
      except OSError:
        pass

  def release(self):
    self._stop.set()
    if self.held and _read(self.path).get("pid") == self._me["pid"]:
      try:
        os.remove(self.path)
      except FileNotFoundError:
        pass
    self.held = False

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
    return False
