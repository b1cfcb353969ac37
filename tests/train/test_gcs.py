"""A pod's run on a bucket: ``python -m llava_jax.train`` on 2 processes (``tests/multiprocess.py``,
as ``launch/local_pod.sh`` starts them) with the data, the tokenizer and the workdir on
``gs://`` (the local GCS emulator of ``tests/gcs_emulator.py``; nothing reaches the network).

One run is shared by the tests (each training launch compiles for ~30 s on 2 cores):
process 0 writes the embedded dataset into the bucket, both processes train and
checkpoint there (orbax: each process its shards, through tensorstore's GCS driver), are
killed after step 5 (``os._exit``, like a pre-empted pod) and are relaunched with the
same command, which resumes from the bucket. Then a training run's checkpoint is
evaluated from the bucket with resumable answers.
"""

import json
import os
import uuid

import pytest

from llava_jax import storage
from multiprocess import run_module

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CRASH = 5
STEPS = 6  # configs/tiny_shapes.py:test: checkpoints every 2 steps, async


def _train(root, workdir, crash=None):
  args = [
      f"--config={ROOT}/configs/tiny_shapes.py:test,root={root}",
      f"--workdir={workdir}",
      f"--config.train.steps={STEPS}",
  ]
  if crash is not None:
    args.append(f"--config.train.crash_after_step={crash}")
  outs = run_module("llava_jax.train", *args, num_processes=2, devices_per_process=1, timeout=600, check=crash is None)
  if crash is not None:
    assert all(o.returncode == 42 for o in outs), [(o.returncode, o.stderr[-3000:]) for o in outs]
  return outs


def _rows(workdir):
  return [json.loads(line) for line in storage.read_text(f"{workdir}/metrics.jsonl").splitlines()]


@pytest.fixture(scope="module")
def pod_run(gcs):
  bucket = f"test-{uuid.uuid4().hex[:12]}"
  gcs.create_bucket(bucket)
  root, workdir = f"gs://{bucket}/shapes", f"gs://{bucket}/run"
  _train(root, workdir, crash=CRASH)
  killed = _rows(workdir)
  resumed = _train(root, workdir)
  return {"root": root, "workdir": workdir, "killed": killed, "resumed": resumed}


@pytest.mark.slow
def test_pod_writes_data_and_workdir_to_the_bucket_only(pod_run):
  root, workdir = pod_run["root"], pod_run["workdir"]
  data = f"{root}/data"
  for name in ("tokenizer.model", "stage2.jsonl", "eval_questions.jsonl", "images/train_000000.png"):
    assert storage.exists(f"{data}/{name}"), name
  info = storage.read_json(f"{workdir}/run.json")
  assert info["tokenizer"] == f"{data}/tokenizer.model"  # not made into a local path
  assert not os.path.exists(os.path.join(ROOT, "gs:"))  # the bug this replaces: a local 'gs:' folder
  names = storage.listdir(workdir)
  assert {"checkpoints", "logs", "metrics.jsonl", "run.json"} <= set(names)
  assert "run.lock" not in names  # released at the end of the run
  assert not [n for n in names if ".append-" in n or n.endswith(".tmp")]
  for i in (0, 1):  # each process's full log, libraries included
    log = storage.read_text(f"{workdir}/logs/process_{i}.log")
    assert "train step compiled" in log or "orbax" in log.lower(), log[-2000:]
  steps = sorted(int(n) for n in storage.listdir(f"{workdir}/checkpoints") if n.isdigit())
  assert steps[-1] == STEPS
  assert storage.exists(f"{workdir}/checkpoints/{STEPS}/commit_success.txt")


@pytest.mark.slow
def test_killed_pod_resumes_from_the_bucket(pod_run):
  workdir, killed, resumed = pod_run["workdir"], pod_run["killed"], pod_run["resumed"]
  assert [r["step"] for r in killed] == list(range(1, CRASH + 1))  # every row whole, each once
  log = resumed[0].stderr
  assert "resumed from checkpoint" in log, log[-3000:]
  start = int(log.split("resumed from checkpoint ")[1].split()[0])
  assert start in (2, 4)  # the newest committed checkpoint (4 may not have finished)
  rows = _rows(workdir)
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # the re-logged steps once
  before = {r["step"]: r["loss"] for r in killed}
  after = {r["step"]: r["loss"] for r in rows}
  # Steps after the checkpoint ran again from the restored state and data position: bitwise.
  assert {s: after[s] for s in range(1, CRASH + 1)} == before
  assert rows[-1]["examples_with_targets"] == 8  # the global batch, summed over processes


@pytest.mark.slow
def test_evaluation_from_the_bucket_resumes_its_answers(pod_run, caplog):
  import logging
  from llava_jax.eval.answers import read_answers
  from llava_jax.eval.run import answers_path, run_eval
  from llava_jax.infer.loading import load_model

  root, workdir = pod_run["root"], pod_run["workdir"]
  data = f"{root}/data"
  model = load_model(workdir)  # run.json, the tokenizer and the params: all from the bucket
  assert model.step == STEPS
  out = f"{workdir}/eval"
  kw = dict(
      task="synthetic",
      questions=f"{data}/eval_questions.jsonl",
      annotations=f"{data}/eval_annotations.jsonl",
      image_root=f"{data}/images",
      batch_size=4,
      max_new_tokens=4,
      progress=False,
  )
  run_eval(model, out, limit=4, **kw)
  first = read_answers(answers_path(out, "synthetic"))
  assert len(first) == 4
  with caplog.at_level(logging.INFO, logger="llava_jax.eval.run"):
    result = run_eval(model, out, limit=8, **kw)
  assert "4 already answered, 4 to go" in caplog.text
  rows = read_answers(answers_path(out, "synthetic"))
  assert [r["answer_id"] for r in rows[:4]] == [r["answer_id"] for r in first]  # not asked again
  assert len({r["question_id"] for r in rows}) == 8
  assert storage.read_json(f"{out}/eval.json") == result
  assert result["synthetic/answered"] == 8 and result["synthetic/errors"] == 0
