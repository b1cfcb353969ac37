"""The README's main job: a tiny LLaVA trained end to end on the embedded shapes dataset.

  python -m llava_jax.demo [--root=runs/demo] [--seed=0] [--multi]

1. writes the synthetic dataset (images, LLaVA JSON, array_record, tokenizer),
2. trains stage 1 (captions) then stage 2 (VQA conversations) of ``configs/tiny_shapes.py``
   through the same ``llava_jax.train`` loop a TPU pod runs,
3. answers every held-out question by greedy generation and scores exact match
   (``llava_jax.eval``), printing the accuracy curve of training,
4. answers a question about one held-out image;
5. with ``--multi``: trains stage 3 (two-image questions and three-frame "videos",
   ``data/synthetic_multi.py``) from stage 2 and reports held-out greedy exact match per
   question kind, then answers one held-out pair and one held-out video.

Re-running resumes: finished stages are not trained again.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags, logging

_ROOT = flags.DEFINE_string("root", "runs/demo", "where data, runs and answers go")
_SEED = flags.DEFINE_integer(
    "seed",
    0,
    "training seed (parameter init and data order) of both stages; the dataset itself is the same for every seed",
)
_MULTI = flags.DEFINE_bool("multi", False, "also stage 3: the multi-image and video tasks")
_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny_shapes.py")


def load_config(stage: str, root: str, seed: int = 0):
  import importlib.util

  spec = importlib.util.spec_from_file_location("tiny_shapes", _CONFIG)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config(f"{stage},root={root}")
  config.seed = seed
  return config


def eval_curve(workdir: str) -> list[tuple[int, float]]:
  curve = []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if "eval/answer_exact_match" in row:
        curve.append((row["step"], row["eval/answer_exact_match"]))
  return curve


def main(argv):
  del argv
  from llava_jax.eval.run import run_eval
  from llava_jax.infer.loading import load_model
  from llava_jax.train.loop import train

  root = _ROOT.value
  from llava_jax import console

  print(f"== full log (library messages included): {console.setup_logging(root)}")
  t0 = time.time()
  for stage in ("stage1", "stage2"):
    config = load_config(stage, root, _SEED.value)
    workdir = os.path.join(root, stage)
    print(f"== {stage}: {config.train.steps} steps, template {config.data.template!r}, data {config.data.train}")
    train(config, workdir)
    for step, acc in eval_curve(workdir):
      print(f"   held-out answer exact match (teacher forced) at step {step}: {acc:.1%}")
  train_s = time.time() - t0

  config = load_config("stage2", root, _SEED.value)
  model = load_model(os.path.join(root, "stage2"))
  metrics = run_eval(
      model,
      os.path.join(root, "eval"),
      task="synthetic",
      questions=config.data.eval_questions,
      annotations=config.data.eval_annotations,
      image_root=config.data.image_root,
  )
  acc = metrics.get("synthetic/accuracy")
  n = metrics.get("synthetic/n")
  print(
      f"== held-out VQA by greedy generation: {acc:.1%} exact match on {n} questions "
      f"(train {train_s / 60:.1f} min, total {(time.time() - t0) / 60:.1f} min)"
  )

  with open(config.data.eval_questions) as f:
    question = json.loads(f.readline())
  with open(config.data.eval_annotations) as f:
    truth = {r["question_id"]: r["answer"] for r in map(json.loads, f)}[question["question_id"]]
  from llava_jax.data.images import load_image

  image_path = os.path.join(config.data.image_root, question["image"])
  answer = model.answer(
      [{"from": "human", "value": "<image>\n" + question["text"]}], load_image(image_path), max_new_tokens=8
  )
  print(f"== image {image_path}\n   Q: {question['text'].splitlines()[0]}\n   A: {answer}   (ground truth: {truth})")
  if _MULTI.value:
    multi(root, _SEED.value)
  logging.info("demo finished")


def accuracy_by_category(answers_file: str, questions_file: str, annotations_file: str) -> dict[str, tuple[float, int]]:
  """{category: (accuracy, answers)}: the synthetic task's exact match (``eval.vqa``) per kind."""
  from llava_jax.eval.answers import read_answers
  from llava_jax.eval.vqa import exact_match_metrics

  with open(questions_file) as f:
    category = {q["question_id"]: q["category"] for q in map(json.loads, f)}
  with open(annotations_file) as f:
    truth = {a["question_id"]: a["answer"] for a in map(json.loads, f)}
  by_kind: dict[str, tuple[list, list]] = {}
  for row in read_answers(answers_file):
    predicted, wanted = by_kind.setdefault(category[row["question_id"]], ([], []))
    predicted.append(row["text"])
    wanted.append(truth[row["question_id"]])
  return {k: (exact_match_metrics(p, w)["accuracy"], len(p)) for k, (p, w) in sorted(by_kind.items())}


def multi(root: str, seed: int):
  """Stage 3 (multi-image and video) from stage 2, then its held-out figures by kind."""
  from llava_jax.data.images import load_image
  from llava_jax.eval.run import answers_path, run_eval
  from llava_jax.infer.loading import load_model
  from llava_jax.train.loop import train

  t0 = time.time()
  config = load_config("stage3", root, seed)
  workdir = os.path.join(root, "stage3")
  print(f"== stage3: {config.train.steps} steps, template {config.data.template!r}, data {config.data.train}")
  train(config, workdir)
  for step, acc in eval_curve(workdir):
    print(f"   held-out answer exact match (teacher forced) at step {step}: {acc:.1%}")
  model = load_model(workdir)
  d = config.data
  out = os.path.join(root, "eval_multi")
  run_eval(
      model,
      out,
      task="synthetic",
      questions=d.eval_questions,
      annotations=d.eval_annotations,
      image_root=d.image_root,
      video_frames=d.video_frames,
  )
  by_kind = accuracy_by_category(str(answers_path(out, "synthetic")), d.eval_questions, d.eval_annotations)
  shown = ", ".join(f"{k} {acc:.1%} of {n}" for k, (acc, n) in by_kind.items())
  print(f"== held-out multi-image / video by greedy generation: {shown} (stage 3 {(time.time() - t0) / 60:.1f} min)")
  with open(d.eval_questions) as f:
    questions = [json.loads(line) for line in f]
  for kind in ("pair", "video"):
    q = next(q for q in questions if f"-{kind}-" in q["question_id"])
    images = [load_image(os.path.join(d.image_root, name)) for name in q.get("image", [])]
    clip = os.path.join(d.image_root, q["video"]) if "video" in q else None
    turn = [{"from": "human", "value": q["text"]}]
    answer = model.answer(turn, images or None, clip, num_frames=d.video_frames, max_new_tokens=8)
    print(f"== {kind} {q.get('image') or q['video']}\n   Q: {q['text'].splitlines()[-2]}\n   A: {answer}")


if __name__ == "__main__":
  app.run(main)
