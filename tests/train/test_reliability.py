"""What a run never does, tried the way a user hits it (``python -m llava_jax.train``):

- train on a non-finite loss, or checkpoint the state after one (lr=1e6);
- lose the checkpoint it had queued when an error stops it mid-run;
- stop on SIGTERM (preemption) without a checkpoint of the step it reached;
- let a second trainer into a live workdir (refused at once, naming the holder);
- die on a damaged latest checkpoint (it falls back to the one before);
- write a metrics row twice after a resume.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def command(root, workdir, *overrides):
  return [
      sys.executable,
      "-m",
      "llava_jax.train",
      f"--config={ROOT}/configs/tiny_shapes.py:test,root={root}",
      f"--workdir={workdir}",
      *overrides,
  ]


def train(root, workdir, *overrides, expect=0):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
      command(root, workdir, *overrides), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
  )
  assert proc.returncode == expect, proc.stderr[-3000:]
  return proc


def logged(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def checkpoints(workdir):
  return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


def latest_params(workdir):
  from llava_jax.checkpoint import orbax as ckpt
  from llava_jax.models.configs import LlavaConfig

  cfg = LlavaConfig.from_dict(ckpt.read_run_info(workdir)["model"])
  return ckpt.restore_params(workdir, cfg)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return str(tmp_path_factory.mktemp("reliability") / "data")


@pytest.mark.slow
def test_nonfinite_loss_stops_the_run_and_is_never_checkpointed(root, tmp_path):
  workdir = str(tmp_path / "nan")
  proc = train(root, workdir, "--config.optim.lr=1e6", "--config.train.steps=12", expect=1)
  assert "FloatingPointError: non-finite step" in proc.stderr
  bad = int(proc.stderr.split("non-finite step ")[1].split(":")[0])
  step, params = latest_params(workdir)
  assert step < bad, (step, bad)
  assert all(np.isfinite(np.asarray(p)).all() for p in __import__("jax").tree.leaves(params))
  assert max(r["step"] for r in logged(workdir)) < bad  # the bad step is not logged as trained


@pytest.mark.slow
def test_skip_policy_drops_nonfinite_updates_within_its_bound(root, tmp_path):
  workdir = str(tmp_path / "skip")
  train(
      root,
      workdir,
      "--config.optim.lr=1e6",
      "--config.train.steps=8",
      "--config.train.on_nonfinite=skip",
      "--config.train.max_nonfinite=100",
  )
  last = logged(workdir)[-1]
  assert last["step"] == 8 and last["skipped/nonfinite_steps"] > 0
  _, params = latest_params(workdir)
  assert all(np.isfinite(np.asarray(p)).all() for p in __import__("jax").tree.leaves(params))
  proc = train(
      root,
      str(tmp_path / "bound"),
      "--config.optim.lr=1e6",
      "--config.train.steps=8",
      "--config.train.on_nonfinite=skip",
      "--config.train.max_nonfinite=1",
      expect=1,
  )
  assert "more than train.max_nonfinite=1" in proc.stderr


@pytest.mark.slow
def test_an_error_mid_run_keeps_the_queued_checkpoint(root, tmp_path):
  """policy=raise, a bad record a few steps in, a checkpoint every step: the async save
  of the last good step commits before the process exits."""
  train(root, str(tmp_path / "warm"), "--config.train.steps=1")  # writes the data
  with open(os.path.join(root, "data", "stage2.jsonl")) as f:
    good = f.readlines()[:23]
  data = str(tmp_path / "with_bad.jsonl")
  with open(data, "w") as f:
    f.writelines(good + ['{"id": "broken", "conversations": [{"from": "human", "val\n'])
  workdir = str(tmp_path / "run")
  proc = train(
      root,
      workdir,
      f"--config.data.train={data}",
      "--config.data.policy=raise",
      "--config.train.ckpt_every=1",
      "--config.train.steps=6",
      expect=1,
  )
  assert "with_bad.jsonl:23" in proc.stderr and "bad_record" in proc.stderr
  last_step = max(r["step"] for r in logged(workdir))
  assert checkpoints(workdir)[-1] == str(last_step)  # committed, not left as a -tmp dir
  assert not [c for c in checkpoints(workdir) if "tmp" in c]


@pytest.mark.slow
def test_sigterm_checkpoints_the_step_and_a_second_trainer_is_refused(root, tmp_path):
  workdir = str(tmp_path / "run")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen(
      command(root, workdir, "--config.train.steps=500", "--config.train.ckpt_every=1000"),
      cwd=ROOT,
      env=env,
      stderr=subprocess.PIPE,
      text=True,
  )
  try:
    deadline = time.time() + 400
    while time.time() < deadline:
      path = os.path.join(workdir, "metrics.jsonl")
      if os.path.exists(path) and os.path.getsize(path) and logged(workdir)[-1]["step"] >= 3:
        break
      assert proc.poll() is None, proc.stderr.read()[-3000:]
      time.sleep(0.2)
    second = train(root, workdir, "--config.train.steps=500", expect=1)
    assert "is in use by another trainer" in second.stderr and f"pid {proc.pid}" in second.stderr
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
  last_step = max(r["step"] for r in logged(workdir))
  assert f"stopped by SIGTERM after step {last_step}; checkpoint {last_step} written" in err
  assert checkpoints(workdir) == [str(last_step)]
  assert not os.path.exists(os.path.join(workdir, "run.lock"))  # released on the way out
  proc = train(root, workdir, f"--config.train.steps={last_step + 2}")
  assert f"resumed from checkpoint {last_step}" in proc.stderr
  steps = [r["step"] for r in logged(workdir) if "loss" in r]
  assert len(steps) == len(set(steps))  # no step written twice


@pytest.mark.slow
def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(root, tmp_path):
  workdir = str(tmp_path / "run")
  train(root, workdir)  # 6 steps, checkpoints 4 and 6 kept
  assert checkpoints(workdir) == ["4", "6"]
  damaged = os.path.join(workdir, "checkpoints", "6", "train")
  for dirpath, _, files in os.walk(damaged):
    for name in files:
      with open(os.path.join(dirpath, name), "wb") as f:
        f.write(b"\x00garbage")
  proc = train(root, workdir, "--config.train.steps=8")
  assert "checkpoint 6" in proc.stderr and "cannot be restored" in proc.stderr
  assert "resumed from checkpoint 4" in proc.stderr
  assert "6.corrupt" in checkpoints(workdir) and "8" in checkpoints(workdir)
  proc = train(root, str(tmp_path / "copy"), expect=0)  # (a fresh run for the raise case)
  damaged = os.path.join(tmp_path, "copy", "checkpoints", "6", "train")
  for dirpath, _, files in os.walk(damaged):
    for name in files:
      with open(os.path.join(dirpath, name), "wb") as f:
        f.write(b"\x00garbage")
  proc = train(
      root, str(tmp_path / "copy"), "--config.train.steps=8", "--config.train.on_corrupt_checkpoint=raise", expect=1
  )
  assert "checkpoint 6" in proc.stderr and "rm -r" in proc.stderr
