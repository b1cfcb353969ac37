"""Any-resolution images and video files trained as a user runs it: ``python -m
llava_jax.train`` with ``configs/tiny_shapes.py:test,anyres=1,video=1`` (stage 3's pairs,
clips and single-image conversations: LLaVA-NeXT tiling, a base tile plus a 1x2 grid per
42 px scene, and FFV1 clips decoded by PyAV into the video slot of a model with a video
token) on 1 process x 4 devices and on 2 processes x 2 devices. The losses and held-out
figures are the same, so every process tiles, decodes and feeds its own rows alike; then
``python -m llava_jax.generate`` answers about an image and about a clip from the
2-process checkpoint."""

import json
import os
import subprocess
import sys

import pytest

from multiprocess import run_module

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 6
RTOL = 1e-5  # as tests/train/test_multiprocess.py: a few float32 ulps carried by Adam


def _train(root, workdir, processes, devices):
  run_module(
      "llava_jax.train",
      f"--config={ROOT}/configs/tiny_shapes.py:test,root={root},anyres=1,video=1",
      f"--workdir={workdir}",
      f"--config.train.steps={STEPS}",
      f"--config.data.val={root}/data/stage3_val.jsonl",
      f"--config.train.eval_every={STEPS}",
      "--config.train.eval_batch_size=8",
      num_processes=processes,
      devices_per_process=devices,
      timeout=900,
  )
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if '"loss"' in line]
  with open(os.path.join(workdir, "eval.json")) as f:
    return rows, json.load(f)


def _generate(checkpoint, *args):
  env = {k: v for k, v in os.environ.items() if not k.startswith("LLAVA_JAX_")}
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  out = subprocess.run(
      [sys.executable, "-m", "llava_jax.generate", f"--checkpoint={checkpoint}", "--max_new_tokens=4", *args],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.slow
def test_anyres_and_video_train_on_two_processes_like_one_and_answer(tmp_path):
  root = str(tmp_path / "data")
  (want, want_eval), (got, got_eval) = _train(root, str(tmp_path / "p1"), 1, 4), _train(
      root, str(tmp_path / "p2"), 2, 2
  )
  assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, STEPS + 1))
  for a, b in zip(want, got):
    assert b["loss"] == pytest.approx(a["loss"], rel=RTOL), a["step"]
  assert want[-1]["loss"] < want[0]["loss"]
  for key in ("skipped/bad_video", "skipped/image_count_mismatch", "skipped/image_over_budget"):
    assert want[-1][key] == 0, key
  assert got_eval["val_answers"] == want_eval["val_answers"] > 0
  assert got_eval["val_loss"] == pytest.approx(want_eval["val_loss"], rel=RTOL)
  with open(os.path.join(tmp_path, "p2", "run.json")) as f:
    model = json.load(f)["model"]
  assert model["image_grid_pinpoints"] == [[42, 84], [84, 42], [84, 84]] and model["video_token_id"] is not None

  with open(os.path.join(root, "data", "stage3.jsonl")) as f:
    records = [json.loads(line) for line in f]
  images = os.path.join(root, "data", "images")
  clip = next(r["video"] for r in records if "video" in r)
  pair = next(r["image"] for r in records if isinstance(r.get("image"), list))
  _generate(tmp_path / "p2", f"--video={os.path.join(images, clip)}", "--video_frames=3", "--prompt=Which way?")
  _generate(
      tmp_path / "p2",
      *(f"--image={os.path.join(images, p)}" for p in pair),
      "--prompt=Image one: <image>\nImage two: <image>\nWhich image has more shapes?",
  )
