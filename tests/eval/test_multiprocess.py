"""``python -m llava_jax.evaluate`` on 2 processes x 2 CPU devices (jax.distributed over
127.0.0.1) answers and scores exactly as 1 process x 4 devices, and resumes a killed run
with no question lost or answered twice."""

import json
import os
import shutil

import pytest

import tiny_checkpoint
from multiprocess import run_module
from llava_jax.eval.answers import read_answers

pytestmark = pytest.mark.slow

# The params really are split across the processes: fsdp over the 2 processes, tensor
# over each one's 2 devices (the same mesh in both runs, so the same reductions).
MESH = "--mesh=1,2,2"


def _training_workdir(hf_dir: str, workdir: str) -> None:
  """A training workdir (run.json + orbax checkpoint) holding the tiny HF model's params,
  as ``llava_jax.train`` writes one, without running the training loop."""
  import orbax.checkpoint as ocp

  from llava_jax.checkpoint.orbax import write_run_info
  from llava_jax.infer.loading import load_model

  hf = load_model(hf_dir)
  write_run_info(
      workdir,
      model=hf.cfg,
      tokenizer=os.path.join(hf_dir, "tokenizer.model"),
      template="llava_v1",
      image=hf.image_config,
  )
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as manager:
    manager.save(3, args=ocp.args.Composite(params=ocp.args.StandardSave(hf.params)))
    manager.wait_until_finished()


def _questions(paths: dict, directory: str) -> tuple[str, str]:
  """7 questions (4 batches of 2, the last padded): the tiny set, two more on its images,
  a text-only one and one whose image is not a PNG (an error row)."""
  data = os.path.join(directory, "data")
  shutil.copytree(os.path.dirname(paths["questions"]), data)
  with open(os.path.join(data, "images", "bad.png"), "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n not really a png")
  rows = [json.loads(line) for line in open(paths["questions"])]
  rows += [
      {"question_id": "q3", "image": "images/2.png", "text": "What shape is on the left?"},
      {"question_id": "q4", "text": "What color is the sky?"},
      {"question_id": "q5", "image": "images/bad.png", "text": "Is it blue?"},
      {"question_id": "q6", "image": "images/1.png", "text": "Is there a square?"},
  ]
  answers = ["red", "two", "yes", "circle", "blue", "no", "yes"]
  questions, annotations = os.path.join(data, "q7.jsonl"), os.path.join(data, "a7.jsonl")
  with open(questions, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  with open(annotations, "w") as f:
    f.writelines(json.dumps({"question_id": r["question_id"], "answer": a}) + "\n" for r, a in zip(rows, answers))
  return questions, annotations


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("mp_eval"))
  paths = tiny_checkpoint.write_tiny_llava(os.path.join(root, "hf"))
  workdir = os.path.join(root, "run")
  _training_workdir(paths["model"], workdir)
  questions, annotations = _questions(paths, root)
  args = [
      f"--checkpoint={workdir}",
      "--task=synthetic",
      f"--questions={questions}",
      f"--annotations={annotations}",
      "--batch_size=2",
      "--max_new_tokens=6",
      MESH,
  ]
  reference = os.path.join(root, "reference")
  run_module("llava_jax.evaluate", *args, f"--workdir={reference}", num_processes=1, devices_per_process=4)
  return {"root": root, "args": args, "reference": reference}


def _rows(out_dir):
  """Answer rows without their random answer_id, in file order."""
  rows = read_answers(os.path.join(out_dir, "synthetic_answers.jsonl"))
  return [{k: v for k, v in r.items() if k != "answer_id"} for r in rows]


def _by_id(rows):
  by_id = {r["question_id"]: r for r in rows}
  assert len(by_id) == len(rows), [r["question_id"] for r in rows]  # none twice
  return by_id


def _eval_json(out_dir):
  with open(os.path.join(out_dir, "eval.json")) as f:
    return json.load(f)


def test_two_processes_answer_and_score_as_one(setup):
  out = os.path.join(setup["root"], "two_processes")
  outs = run_module("llava_jax.evaluate", *setup["args"], f"--workdir={out}", num_processes=2, devices_per_process=2)
  want = _rows(setup["reference"])
  by_id = _by_id(want)
  assert sorted(by_id) == [f"q{i}" for i in range(7)]
  assert "q5" in by_id["q5"]["metadata"]["error"] and by_id["q5"]["text"] == ""
  assert len({r["text"] for r in want if r["text"]}) > 1  # the model does say different things
  assert _rows(out) == want  # same rows (ids, answers, prompts, errors) in the same order
  result = _eval_json(out)
  assert result == _eval_json(setup["reference"])
  assert result["step"] == 3 and result["synthetic/n"] == 7 and result["synthetic/errors"] == 1
  # Only process 0 prints the metrics (and writes: the file has each question once).
  assert '"synthetic/n": 7' in outs[0].stdout and "synthetic/n" not in outs[1].stdout


def test_killed_run_resumes_on_two_processes(setup):
  """What a kill leaves: the answers flushed so far and a last line cut mid-write."""
  out = os.path.join(setup["root"], "resumed")
  os.makedirs(out)
  with open(os.path.join(setup["reference"], "synthetic_answers.jsonl")) as f:
    lines = f.readlines()
  with open(os.path.join(out, "synthetic_answers.jsonl"), "w") as f:
    f.writelines(lines[:3])
    f.write(lines[3][:40])
  kept = [json.loads(line)["answer_id"] for line in lines[:3]]
  run_module("llava_jax.evaluate", *setup["args"], f"--workdir={out}", num_processes=2, devices_per_process=2)
  rows = read_answers(os.path.join(out, "synthetic_answers.jsonl"))
  assert sorted(_by_id(rows)) == [f"q{i}" for i in range(7)]  # none twice, none lost
  assert [r["answer_id"] for r in rows[:3]] == kept  # the first three were not asked again
  assert _by_id(_rows(out)) == _by_id(_rows(setup["reference"]))
  assert _eval_json(out) == _eval_json(setup["reference"])
