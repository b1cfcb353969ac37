"""The workdir lock (live holder refused, dead or silent holder taken over) and the repair
of ``metrics.jsonl`` on resume (a cut last line, rows past the resumed step)."""

import json
import os
import subprocess
import sys

import pytest

from llava_jax.checkpoint import lock as lock_lib
from llava_jax.train.metrics import repair_metrics


def _write_lock(workdir, **holder):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, lock_lib.LOCK_FILE), "w") as f:
    json.dump(holder, f)


def test_a_live_holder_is_refused_with_its_name(tmp_path):
  with lock_lib.WorkdirLock(str(tmp_path)):
    with pytest.raises(lock_lib.WorkdirLockedError, match=f"pid {os.getpid()}"):
      lock_lib.WorkdirLock(str(tmp_path)).acquire()
  assert not os.path.exists(tmp_path / lock_lib.LOCK_FILE)  # released
  lock_lib.WorkdirLock(str(tmp_path)).acquire().release()  # and free again


def test_a_dead_holder_on_this_host_is_taken_over(tmp_path):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  import socket

  _write_lock(str(tmp_path), host=socket.gethostname(), pid=dead.pid, start="earlier")
  lock = lock_lib.WorkdirLock(str(tmp_path)).acquire()
  with open(tmp_path / lock_lib.LOCK_FILE) as f:
    assert json.load(f)["pid"] == os.getpid()
  lock.release()


def test_another_hosts_lock_is_stale_only_without_heartbeat(tmp_path):
  _write_lock(str(tmp_path), host="some-other-host", pid=1, start="earlier")
  with pytest.raises(lock_lib.WorkdirLockedError, match="some-other-host"):
    lock_lib.WorkdirLock(str(tmp_path)).acquire()
  old = os.path.getmtime(tmp_path / lock_lib.LOCK_FILE) - lock_lib.STALE_S - 60
  os.utime(tmp_path / lock_lib.LOCK_FILE, (old, old))
  lock_lib.WorkdirLock(str(tmp_path)).acquire().release()


def test_metrics_tail_and_rows_past_the_resumed_step_are_dropped(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  rows = [{"step": s, "loss": 1.0 / s} for s in range(1, 6)]
  with open(path, "w") as f:
    f.write("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lo')  # killed mid-write
  repair_metrics(path, keep_through=4)
  with open(path) as f:
    assert [json.loads(line) for line in f] == rows[:4]
  repair_metrics(path, keep_through=4)  # nothing to do: unchanged
  with open(path) as f:
    assert len(f.readlines()) == 4
  with open(path, "a") as f:
    f.write("not json\n" + json.dumps(rows[4]) + "\n")
  with pytest.raises(ValueError, match="line 5 is not JSON"):
    repair_metrics(path)
