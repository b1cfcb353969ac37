"""An any-resolution model trained as a user runs it: ``python -m llava_jax.train`` with
``configs/tiny_shapes.py:test,anyres=1`` (LLaVA-NeXT tiling: a base tile plus a 1x2 grid
per scene) on 1 process x 4 devices and on 2 processes x 2 devices (the same losses and
held-out figures: the tiles and layouts of each global batch do not depend on the process
count), then ``python -m llava_jax.generate`` answers from the 2-process checkpoint."""

import json
import os
import subprocess
import sys

import pytest

from multiprocess import run_module

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 8
RTOL = 1e-5  # as tests/train/test_multiprocess.py: a few float32 ulps carried by Adam


def _train(root, workdir, processes, devices):
  return run_module(
      "llava_jax.train",
      f"--config={ROOT}/configs/tiny_shapes.py:test,root={root},anyres=1",
      f"--workdir={workdir}",
      f"--config.train.steps={STEPS}",
      f"--config.data.val={root}/data/stage2_val.jsonl",
      f"--config.train.eval_every={STEPS}",
      "--config.train.eval_batch_size=8",
      num_processes=processes,
      devices_per_process=devices,
      timeout=900,
  )


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if '"loss"' in line]


@pytest.mark.slow
def test_anyres_trains_on_two_processes_like_one_and_answers(tmp_path):
  root = str(tmp_path / "data")
  one, two = str(tmp_path / "p1"), str(tmp_path / "p2")
  _train(root, one, 1, 4)
  _train(root, two, 2, 2)
  with open(os.path.join(one, "run.json")) as f:
    model = json.load(f)["model"]
  assert model["image_grid_pinpoints"] == [[42, 84], [84, 42], [84, 84]]  # the checkpoint says it is anyres
  want, got = _rows(one), _rows(two)
  assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, STEPS + 1))
  for a, b in zip(want, got):
    assert b["loss"] == pytest.approx(a["loss"], rel=RTOL), a["step"]
  assert want[-1]["loss"] < want[0]["loss"]
  assert want[-1]["skipped/image_over_budget"] == 0 and want[-1]["adjusted/image_downscaled"] == 0
  evals = []
  for w in (one, two):
    with open(os.path.join(w, "eval.json")) as f:
      evals.append(json.load(f))
  assert evals[0]["val_answers"] == evals[1]["val_answers"] > 0
  assert evals[1]["val_loss"] == pytest.approx(evals[0]["val_loss"], rel=RTOL)

  image = os.path.join(root, "data", "images", sorted(os.listdir(os.path.join(root, "data", "images")))[0])
  env = {k: v for k, v in os.environ.items() if not k.startswith("LLAVA_JAX_")}
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  out = subprocess.run(
      [sys.executable, "-m", "llava_jax.generate", f"--checkpoint={two}", f"--image={image}"]
      + ["--prompt=What color is the circle?", "--max_new_tokens=4"],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
