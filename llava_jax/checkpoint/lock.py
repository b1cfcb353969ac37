"""One trainer per workdir: ``DIR/run.lock``, held for the run's life.

Two trainers on one workdir interleave checkpoints and metrics (orbax errors, duplicated
rows, hangs on barriers). The lock file is created atomically (``O_CREAT | O_EXCL``) and
names its holder: host, pid, start time. A second trainer is refused at once with that
holder in the message. A lock whose holder is gone is stale and taken over (logged):
on the same host when its pid no longer runs; from another host when its heartbeat (the
holder rewrites the file's mtime every ``HEARTBEAT_S``) is older than ``STALE_S``.

In a multi-process run only process 0 holds the lock (the others learn the outcome from
it), so one job's processes share it and a second job is refused on every process.

On a bucket (``gs://`` workdir), where there is no ``O_EXCL`` and no rename, the lock is
an object whose generation number does the same work (``llava_jax.storage``): it is
created with ``ifGenerationMatch=0``, so of two trainers racing for it exactly one
succeeds; the heartbeat rewrites it with ``ifGenerationMatch=<its own generation>``
(the object's ``updated`` time is the heartbeat); a stale lock is replaced with
``ifGenerationMatch=<the generation judged stale>``, so two trainers taking over at once
cannot both win; release deletes it only if it is still the holder's generation. A
heartbeat that finds the lock changed under it (another trainer judged it stale, e.g.
after the holder was paused for more than ``STALE_S``) logs an error: the workdir then has
two writers, and the next metrics append of the older one fails (``ConcurrentWriteError``).
Staleness across hosts compares this host's clock with the bucket's ``updated`` time, so
clocks must agree to well within ``STALE_S`` (NTP on cloud VMs does).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import uuid

from absl import logging

from llava_jax import storage

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


def _parse(data: bytes) -> dict:
  try:
    out = json.loads(data)
  except ValueError:
    return {}
  return out if isinstance(out, dict) else {}


class WorkdirLock:
  """``with WorkdirLock(workdir):`` … (or ``acquire()`` / ``release()``)."""

  def __init__(self, workdir: str):
    self.path = storage.join(workdir, LOCK_FILE)
    self.remote = storage.is_remote(self.path)
    self._me = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "start": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "started_at": time.time(),
        "nonce": uuid.uuid4().hex,
    }
    self._stop = threading.Event()
    self._beat: threading.Thread | None = None
    self._generation: str | None = None  # bucket: the generation this holder last wrote
    self.held = False

  def _stale_reason(self, holder: dict, mtime: float | None = None) -> str | None:
    try:
      age = time.time() - (os.path.getmtime(self.path) if mtime is None else mtime)
    except OSError:
      return "vanished"
    if holder.get("host") == self._me["host"] and isinstance(holder.get("pid"), int):
      return None if _pid_alive(holder["pid"]) else f"pid {holder['pid']} is not running"
    return f"no heartbeat for {age:.0f} s" if age > STALE_S else None

  def _refused(self, holder: dict) -> WorkdirLockedError:
    return WorkdirLockedError(
        f"{os.path.dirname(self.path)} is in use by another trainer: host "
        f"{holder.get('host', '?')}, pid {holder.get('pid', '?')}, started "
        f"{holder.get('start', '?')} ({self.path}). Use another --workdir, or stop that "
        "run; a lock left by a dead run is taken over automatically."
    )

  def _start_heartbeat(self):
    self.held = True
    self._beat = threading.Thread(target=self._heartbeat, daemon=True, name="workdir-lock")
    self._beat.start()

  def _acquire_remote(self) -> "WorkdirLock":
    mine = json.dumps(self._me).encode()
    for _ in range(3):
      generation = storage.create_only(self.path, mine)
      if generation is None:
        current = storage.read_object(self.path)
        if current is None:  # released in between: try again
          continue
        data, meta = current
        holder = _parse(data)
        if holder.get("nonce") == self._me["nonce"]:  # our own create, retried by the client
          generation = meta["generation"]
        else:
          why = self._stale_reason(holder, meta["mtime"])
          if why is None:
            raise self._refused(holder) from None
          logging.warning("taking over the stale lock %s (%s; holder %s)", self.path, why, holder)
          generation = storage.replace_if(self.path, mine, meta["generation"])
          if generation is None:  # someone else took it over first: look again
            continue
      self._generation = generation
      self._start_heartbeat()
      return self
    raise WorkdirLockedError(f"could not take {self.path}: another trainer keeps taking it")

  def acquire(self) -> "WorkdirLock":
    if self.remote:
      storage.check(self.path, "--workdir", write=True)
      return self._acquire_remote()
    os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
    for _ in range(3):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = _read(self.path)
        why = self._stale_reason(holder)
        if why is None:
          raise self._refused(holder) from None
        logging.warning("taking over the stale lock %s (%s; holder %s)", self.path, why, holder)
        try:
          os.remove(self.path)
        except FileNotFoundError:
          pass
        continue
      with os.fdopen(fd, "w") as f:
        json.dump(self._me, f)
      self._start_heartbeat()
      return self
    raise WorkdirLockedError(f"could not take {self.path}: another trainer keeps taking it")

  def _heartbeat(self):
    while not self._stop.wait(HEARTBEAT_S):
      try:
        if not self.remote:
          os.utime(self.path)
          continue
        new = storage.replace_if(self.path, json.dumps(self._me).encode(), self._generation)
        if new is None:
          logging.error(
              "the workdir lock %s was taken over by another trainer (this one's "
              "heartbeat was late?); two trainers now write this workdir: stop one",
              self.path,
          )
          return
        self._generation = new
      except OSError:
        pass

  def release(self):
    self._stop.set()
    if self._beat is not None:
      self._beat.join(timeout=60)  # no heartbeat may rewrite the lock after it is deleted
    if self.remote:
      if self.held and self._generation is not None:
        storage.delete_if(self.path, self._generation)
      self.held = False
      return
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
