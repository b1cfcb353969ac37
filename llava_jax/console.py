"""What a run prints, and where everything else goes.

The console shows llava_jax's own messages and every warning or error; INFO from
libraries (orbax alone writes ~170 lines for a short run) is left out there. Every
record, libraries included, goes to ``DIR/logs/process_<i>.log`` (one file per process
of a multi-process job). With a ``gs://`` workdir the log is an object: records are
buffered and appended every ``REMOTE_FLUSH_S`` seconds and at exit (each append whole
lines, ``storage.Appender``), so a killed process loses at most that many seconds of it.
"""

from __future__ import annotations

import logging as std_logging
import os
import threading

from absl import logging

from llava_jax import storage

REMOTE_FLUSH_S = 10.0
_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


class QuietLibraries(std_logging.Filter):
  """Passes warnings and above, and any record logged from inside the llava_jax package."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or record.pathname.startswith(_PACKAGE)


class RemoteLogHandler(std_logging.Handler):
  """Appends formatted records to a file on a bucket, in batches (see the module docstring).

  ``emit`` only buffers (it may run inside the storage client's own logging); a daemon
  thread publishes every ``REMOTE_FLUSH_S`` seconds, and ``close`` (at exit) the rest.
  """

  def __init__(self, path: str):
    super().__init__()
    self.path = path
    self._appender = storage.Appender(path)
    self._buffer: list[str] = []
    self._buffer_lock = threading.Lock()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True, name="remote-log")
    self._thread.start()

  def emit(self, record):
    try:
      line = self.format(record) + "\n"
    except Exception:  # noqa: BLE001 (logging must never raise)
      self.handleError(record)
      return
    with self._buffer_lock:
      self._buffer.append(line)

  def _publish(self):
    with self._buffer_lock:
      lines, self._buffer = self._buffer, []
    if lines:
      self._appender.append("".join(lines))
      self._appender.flush()

  def _run(self):
    while not self._stop.wait(REMOTE_FLUSH_S):
      try:
        self._publish()
      except Exception as e:  # noqa: BLE001 (a transient storage error must not kill training)
        print(f"llava_jax: could not append to the log {self.path}: {e}", flush=True)

  def flush(self):
    pass  # published by the thread and at close; a publish per record would be a request each

  def close(self):
    self._stop.set()
    self._thread.join(timeout=60)
    try:
      self._publish()
    except Exception as e:  # noqa: BLE001
      print(f"llava_jax: could not append to the log {self.path}: {e}", flush=True)
    super().close()


def setup_logging(workdir: str) -> str:
  """Filters the console (absl's handler) and adds the full log file; returns its path."""
  import jax

  path = storage.join(workdir, "logs", f"process_{jax.process_index()}.log")
  absl_handler = logging.get_absl_handler()
  if not any(isinstance(f, QuietLibraries) for f in absl_handler.filters):
    absl_handler.addFilter(QuietLibraries())
  root = std_logging.getLogger()
  if storage.is_remote(path):
    if any(getattr(h, "path", None) == path for h in root.handlers):
      return path
    handler = RemoteLogHandler(path)
  else:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if any(getattr(h, "baseFilename", None) == os.path.abspath(path) for h in root.handlers):
      return path
    handler = std_logging.FileHandler(path)
  handler.setFormatter(std_logging.Formatter("%(asctime)s %(levelname)s %(filename)s:%(lineno)d] %(message)s"))
  root.addHandler(handler)
  return path
