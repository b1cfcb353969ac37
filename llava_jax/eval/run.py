"""Answer a LLaVA-format question file with a model, resumably, then score it.

    metrics = run_eval(load_model(ckpt), "out/", task="gqa", questions="q.jsonl",
                       annotations="a.json", image_root="images/")

Steps: read the questions (``eval.files.read_questions``), skip the ids already in
``OUT/<task>_answers.jsonl`` (a killed run resumes where it stopped), build each prompt
from the question text + the task's suffix in the model's conversation template (the
image tag first, as LLaVA's ``model_vqa_loader``), generate in left-padded batches of
fixed shape (greedy by default), append each answer as soon as its batch is done, and
score everything with ``eval.files.score`` into ``OUT/eval.json``.

A question whose image is missing or cannot be decoded is not a crash: it gets an answer
row with empty text and ``metadata.error`` (so it scores as wrong and is not retried),
and the count is reported as ``<task>/errors``.

Shapes stay fixed so each (batch, length bucket) compiles once: the last batch is padded
with dummy rows, prompts are left-padded to a multiple of ``length_bucket``, and every row
has one image slot (``image_mask`` False for text-only questions).
"""
from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from llava_jax.data.images import load_image, preprocess
from llava_jax.data.templates import IMAGE_TAG
from llava_jax.eval import files

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Prepared:
  """One question ready to batch: prompt ids int32[T] and pixels float32[S, S, 3] | None."""
  question: dict
  prompt: str
  ids: np.ndarray
  pixels: np.ndarray | None


def answers_path(workdir: str | os.PathLike, task: str) -> Path:
  return Path(workdir) / f"{task}_answers.jsonl"


def _image_source(question: dict, image_root: str | None):
  if question.get("image_base64"):
    return base64.b64decode(question["image_base64"])
  name = question.get("image")
  if not name:
    return None
  return os.path.join(image_root, name) if image_root and not os.path.isabs(name) else name


def prepare(model, question: dict, task: str, image_root: str | None) -> Prepared:
  """Question row -> Prepared. Raises ValueError naming the question if its image fails."""
  source = _image_source(question, image_root)
  pixels = None
  if source is not None:
    try:
      pixels = preprocess(load_image(source), model.image_config)
    except (ValueError, OSError) as e:
      raise ValueError(f"question {question['question_id']!r}: {e}") from e
  text = files.prompt_text(question, task).replace(IMAGE_TAG, "").strip()
  if pixels is not None:
    text = f"{IMAGE_TAG}\n{text}"
  prompt, ids = model.encode_prompt([{"from": "human", "value": text}])
  return Prepared(question, prompt, ids, pixels)


def make_batch(items: Sequence[Prepared], batch_size: int, length_bucket: int, image_size: int,
               pad_id: int):
  """Left-padded fixed-shape arrays for ``sampler.generate``.

  Returns: ids int32[batch_size, T] (T a multiple of ``length_bucket``), mask int32[same],
    pixels float32[batch_size, S, S, 3] and image_mask bool[batch_size]; rows beyond
    ``len(items)`` are dummies (one pad token).
  """
  longest = max(len(p.ids) for p in items)
  t = -(-longest // length_bucket) * length_bucket
  ids = np.full((batch_size, t), pad_id, np.int32)
  mask = np.zeros((batch_size, t), np.int32)
  mask[:, -1] = 1  # dummy rows: a single pad token, so no row is empty
  pixels = np.zeros((batch_size, image_size, image_size, 3), np.float32)
  image_mask = np.zeros((batch_size,), bool)
  for r, p in enumerate(items):
    ids[r, t - len(p.ids):], mask[r, t - len(p.ids):] = p.ids, 1
    if p.pixels is not None:
      pixels[r], image_mask[r] = p.pixels, True
  return ids, mask, pixels, image_mask


def run_eval(model, workdir: str | os.PathLike, *, task: str, questions: str | os.PathLike,
             annotations: str | os.PathLike | None = None, image_root: str | None = None,
             batch_size: int = 8, limit: int | None = None, max_new_tokens: int = 64,
             temperature: float = 0.0, seed: int = 0, length_bucket: int = 64,
             model_id: str | None = None, mesh=None, progress: bool = True) -> dict[str, Any]:
  """Answers the (first ``limit``) questions not yet answered, then scores all of them.

  Args:
    model: a ``llava_jax.infer.loading.LoadedModel``.
    workdir: output directory (``<task>_answers.jsonl``, ``eval.json``).
    task: a key of ``eval.files.TASKS`` (prompt suffix and metric).
    questions / annotations: files as ``read_questions`` / ``read_annotations`` take them;
      without annotations nothing is scored (eval.json still records counts).
    image_root: directory the questions' relative ``image`` paths are under (default:
      the questions file's directory).
  Returns:
    the dict written to ``eval.json``: ``{"step", "<task>/<metric>": …, "<task>/errors"}``.
  """
  import jax
  from tqdm import tqdm

  from llava_jax.infer.sampler import generate

  files.get_task(task)
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  image_root = image_root if image_root is not None else os.path.dirname(os.fspath(questions))
  asked = files.read_questions(questions)
  if limit is not None:
    asked = asked[:limit]
  out = answers_path(workdir, task)
  done = {str(i) for i in files.answered_ids(out)}
  todo = [q for q in asked if str(q["question_id"]) not in done]
  log.info("%s: %d questions, %d already answered, %d to go", task, len(asked),
           len(asked) - len(todo), len(todo))
  stops = model.stop_token_ids()
  rng = jax.random.key(seed)
  with files.AnswerWriter(out, model_id or "llava_jax") as writer, \
      tqdm(total=len(todo), desc=task, unit="q", disable=not progress) as bar:
    for start in range(0, len(todo), batch_size):
      ready = []
      for q in todo[start:start + batch_size]:
        try:
          ready.append(prepare(model, q, task, image_root))
        except ValueError as e:
          log.warning("%s", e)
          writer.write(q["question_id"], q["text"], "", {"error": str(e)})
          bar.update(1)
      if not ready:
        continue
      ids, mask, pixels, image_mask = make_batch(ready, batch_size, length_bucket,
                                                 model.cfg.vision.image_size,
                                                 model.tokenizer.pad_id)
      tokens = generate(model.cfg, model.params, ids, pixels, mask, image_mask=image_mask,
                        max_new_tokens=max_new_tokens, temperature=temperature,
                        eos_token_id=None, stop_token_ids=stops,
                        rng=jax.random.fold_in(rng, start), mesh=mesh)
      tokens = np.asarray(tokens)
      for r, p in enumerate(ready):
        extra = {k: p.question[k] for k in ("round_id", "options") if k in p.question}
        writer.write(p.question["question_id"], p.question["text"],
                     model.decode_answer(tokens[r]), {"prompt": p.prompt}, **extra)
        bar.update(1)
  return write_eval_json(workdir, task, out, asked, annotations, model.step)


def write_eval_json(workdir: Path, task: str, answers: Path, asked: Sequence[dict],
                    annotations, step) -> dict[str, Any]:
  """Scores the answers to ``asked`` (others in the file are ignored) into eval.json."""
  ids = {str(q["question_id"]) for q in asked}
  rows = [r for r in files.read_answers(answers) if str(r["question_id"]) in ids]
  result: dict[str, Any] = {"step": step}
  if annotations is not None:
    ann = files.read_annotations(task, annotations, questions=asked)
    ann = {k: v for k, v in ann.items() if str(k) in ids}
    result.update(files.score(task, rows, ann))
  result[f"{task}/answered"] = len({str(r["question_id"]) for r in rows})
  result[f"{task}/errors"] = sum(bool(r.get("metadata", {}).get("error")) for r in rows)
  with open(workdir / "eval.json", "w") as f:
    json.dump(result, f, indent=1)
  return result
