"""Video files through training as a user runs it: ``python -m llava_jax.train`` with
``configs/tiny_shapes.py:test,video=1`` (stage 3's pair and clip conversations; FFV1 video
files decoded by PyAV, three frames each into a video slot of a model with a video token)
on 1 process x 4 devices and on 2 processes x 2 devices: the same losses, so every
process decodes and feeds its own rows' videos; then ``python -m llava_jax.generate
--video`` answers about a clip from the 2-process checkpoint."""

import json
import os
import subprocess
import sys

import pytest

from multiprocess import run_module

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 6
RTOL = 1e-5  # as tests/train/test_multiprocess.py


def _train(root, workdir, processes, devices):
  run_module(
      "llava_jax.train",
      f"--config={ROOT}/configs/tiny_shapes.py:test,root={root},video=1",
      f"--workdir={workdir}",
      f"--config.train.steps={STEPS}",
      num_processes=processes,
      devices_per_process=devices,
      timeout=900,
  )
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if '"loss"' in line]


@pytest.mark.slow
def test_videos_train_on_two_processes_like_one_and_answer(tmp_path):
  root = str(tmp_path / "data")
  want = _train(root, str(tmp_path / "p1"), 1, 4)
  got = _train(root, str(tmp_path / "p2"), 2, 2)
  assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, STEPS + 1))
  for a, b in zip(want, got):
    assert b["loss"] == pytest.approx(a["loss"], rel=RTOL), a["step"]
  assert want[-1]["skipped/bad_video"] == 0 and want[-1]["skipped/image_count_mismatch"] == 0
  with open(os.path.join(tmp_path, "p2", "run.json")) as f:
    assert json.load(f)["model"]["video_token_id"] is not None
  with open(os.path.join(root, "data", "stage3.jsonl")) as f:
    clip = next(r["video"] for r in map(json.loads, f) if "video" in r)
  env = {k: v for k, v in os.environ.items() if not k.startswith("LLAVA_JAX_")}
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  out = subprocess.run(
      [sys.executable, "-m", "llava_jax.generate", f"--checkpoint={tmp_path / 'p2'}"]
      + [f"--video={os.path.join(root, 'data', 'images', clip)}", "--video_frames=3", "--max_new_tokens=4"]
      + ["--prompt=Which way does the circle move?"],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
