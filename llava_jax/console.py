"""What a run prints, and where everything else goes.

The console shows llava_jax's own messages and every warning or error; INFO from
libraries (orbax alone writes ~170 lines for a short run) is left out there. Every
record, libraries included, goes to ``DIR/logs/process_<i>.log`` (one file per process
of a multi-process job).
"""
from __future__ import annotations

import logging as std_logging
import os

from absl import logging

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


class QuietLibraries(std_logging.Filter):
  """Passes warnings and above, and any record logged from inside the llava_jax package."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or record.pathname.startswith(_PACKAGE)


def setup_logging(workdir: str) -> str:
  """Filters the console (absl's handler) and adds the full log file; returns its path."""
  import jax
  path = os.path.join(workdir, "logs", f"process_{jax.process_index()}.log")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  absl_handler = logging.get_absl_handler()
  if not any(isinstance(f, QuietLibraries) for f in absl_handler.filters):
    absl_handler.addFilter(QuietLibraries())
  root = std_logging.getLogger()
  if not any(getattr(h, "baseFilename", None) == os.path.abspath(path) for h in root.handlers):
    handler = std_logging.FileHandler(path)
    handler.setFormatter(std_logging.Formatter(
        "%(asctime)s %(levelname)s %(filename)s:%(lineno)d] %(message)s"))
    root.addHandler(handler)
  return path
