"""Stopping a run on SIGTERM / SIGINT at a step every process agrees on.

TPU and GCE preemption sends SIGTERM (a grace period follows); Ctrl-C sends SIGINT. The
loop asks ``should_stop(step)`` after each step; once it says yes, the run writes a final
checkpoint of that step (``train.checkpoint_on_stop``), waits for it, and exits non-zero.

One process: a handler records the signal. Several processes: a checkpoint is a
collective, so all must stop at the same step; jax's preemption sync manager (set up by
``jax.distributed.initialize``, SIGTERM) gives that step
(``multihost_utils.reached_preemption_sync_point``, as MaxText uses it), and SIGINT is
turned into SIGTERM so both take that path. A second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import os
import signal

import jax
from absl import logging


class StopSignal:
  """Context manager: installs the handlers, ``should_stop(step)``, restores them on exit."""

  def __init__(self):
    self.signum: int | None = None
    self._multi = jax.process_count() > 1
    self._old: dict[int, object] = {}

  def _record(self, signum, frame):
    del frame
    if self.signum == signal.SIGINT and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: stop now
    self.signum = signum
    logging.warning("received %s: stopping after this step (with a checkpoint)", signal.Signals(signum).name)

  def _forward_sigint(self, signum, frame):
    del frame
    if self.signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signum = signum
    os.kill(os.getpid(), signal.SIGTERM)  # into jax's preemption notifier

  def __enter__(self):
    handlers = (
        {signal.SIGINT: self._forward_sigint}
        if self._multi
        else {signal.SIGINT: self._record, signal.SIGTERM: self._record}
    )
    for signum, handler in handlers.items():
      try:
        self._old[signum] = signal.signal(signum, handler)
      except ValueError:  # not the main thread (e.g. a library caller's worker thread)
        pass
    return self

  def __exit__(self, *exc):
    for signum, old in self._old.items():
      signal.signal(signum, old)
    return False

  def should_stop(self, step: int) -> bool:
    """True on every process at the same step once a stop was requested anywhere."""
    if self._multi:
      from jax.experimental import multihost_utils

      if multihost_utils.reached_preemption_sync_point(step):
        self.signum = self.signum or signal.SIGTERM
        return True
      return False
    return self.signum is not None

  def stop(self):
    """Raises what the signal asks for, after the caller has saved: KeyboardInterrupt for
    Ctrl-C on one process, SystemExit(128 + signum) otherwise."""
    if self.signum == signal.SIGINT and not self._multi:
      raise KeyboardInterrupt
    raise SystemExit(128 + int(self.signum or signal.SIGTERM))
