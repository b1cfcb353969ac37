"""The evaluation tasks: how each benchmark is prompted (``prompt_text``) and scored (``score``).

``TASKS`` maps a task name (``vqav2, gqa, textvqa, pope, scienceqa, mmbench, synthetic``)
to its prompt suffix, its metric and the annotation fields the metric reads
(``questions.read_annotations`` returns them).

``score(task, answers, annotations)`` returns the metrics that go into ``eval.json``,
named ``<task>/<metric>``, plus ``<task>/n`` (answers scored) and ``<task>/missing``
(annotated questions without an answer; the reference scripts for ScienceQA count those
as wrong, so their accuracy is ``accuracy * n / (n + missing)``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from llava_jax.eval import multiple_choice, pope, vqa
from llava_jax.eval.answers import Row, read_answers

SHORT_ANSWER = "Answer the question using a single word or phrase."
MC_ANSWER = "Answer with the option's letter from the given choices directly."


def _texts(answers: Sequence[Row]) -> list[str]:
  return [a["text"] for a in answers]


def human_answers(record: Row) -> list[str]:
  # Official VQAv2 annotations hold dicts {answer, answer_confidence, answer_id}.
  return [a["answer"] if isinstance(a, dict) else a for a in record["answers"]]


def _vqav2(answers, records):
  return vqa.vqav2_metrics(
      _texts(answers), [human_answers(r) for r in records], [r.get("answer_type") for r in records]
  )


def _textvqa(answers, records):
  return vqa.textvqa_metrics(_texts(answers), [human_answers(r) for r in records])


def _gqa(answers, records):
  return vqa.gqa_metrics(_texts(answers), [r["answer"] for r in records])


def _synthetic(answers, records):
  return vqa.exact_match_metrics(_texts(answers), [r["answer"] for r in records])


def _pope(answers, records):
  return pope.pope_metrics_by_split(_texts(answers), [r["label"] for r in records], [r["category"] for r in records])


def _scienceqa(answers, records):
  return multiple_choice.scienceqa_metrics(
      _texts(answers),
      [r["answer"] for r in records],
      [len(r["choices"]) for r in records],
      [bool(r.get("image")) for r in records],
  )


def _mmbench(answers, records):
  return multiple_choice.mmbench_metrics(
      _texts(answers),
      [r["answer"] for r in records],
      [a["options"] if "options" in a else r["options"] for a, r in zip(answers, records)],
      [a.get("option_char") for a in answers],
      [a["question_id"] for a in answers],
      [a.get("round_id", 0) for a in answers],
  )


@dataclasses.dataclass(frozen=True)
class Task:
  """How one benchmark is prompted and scored.

  suffix: appended on a new line to the question text (None: the text is the prompt).
  metric: ``(answer rows, annotation records) -> metrics``, the two lists aligned.
  ground_truth: the annotation fields ``metric`` reads.
  """

  suffix: str | None
  metric: Callable[[Sequence[Row], Sequence[Row]], dict[str, float]]
  ground_truth: tuple[str, ...]


TASKS: dict[str, Task] = {
    "vqav2": Task(SHORT_ANSWER, _vqav2, ("answers", "answer_type")),
    "gqa": Task(SHORT_ANSWER, _gqa, ("answer",)),
    "textvqa": Task(SHORT_ANSWER, _textvqa, ("answers",)),
    "pope": Task(SHORT_ANSWER, _pope, ("label", "category")),
    "scienceqa": Task(MC_ANSWER, _scienceqa, ("answer", "choices", "image")),
    "mmbench": Task(MC_ANSWER, _mmbench, ("answer", "options")),
    "synthetic": Task(SHORT_ANSWER, _synthetic, ("answer",)),
}


def get_task(task: str) -> Task:
  if task not in TASKS:
    raise KeyError(f"unknown eval task {task!r}; expected one of {sorted(TASKS)}")
  return TASKS[task]


def prompt_text(question: Row, task: str) -> str:
  """The user turn for ``question``: its text plus the task's suffix on a new line,
  unless the text already ends with it (LLaVA's v1.5 JSONL files include it)."""
  suffix = get_task(task).suffix
  text = question["text"]
  if suffix is None or text.rstrip().endswith(suffix):
    return text
  return f"{text}\n{suffix}"


def score(task: str, answers: Iterable[Row] | str | os.PathLike, annotations: Mapping[Any, Row]) -> dict[str, float]:
  """Metrics for ``task`` as they go into eval.json: ``{"<task>/<metric>": value, …}``.

  Args:
    answers: answer rows (or an answers JSONL path); later rows for the same
      ``(question_id, round_id)`` replace earlier ones, as LLaVA's dict-building does.
    annotations: question id -> ground-truth record (``questions.read_annotations``); ids are
      matched as strings, so ``262144000`` and ``"262144000"`` agree. TextVQA also finds
      records by LLaVA's ``(image_id, question)`` key when its question ids are image ids.

  Raises KeyError naming the ids of answers with no annotation: scoring a different
  question set than the one asked is a bug, not something to average over.
  """
  spec = get_task(task)
  if isinstance(answers, (str, os.PathLike)):
    answers = read_answers(answers)
  latest = {}
  for row in answers:
    latest[(str(row["question_id"]), row.get("round_id", 0))] = row
  index = {str(k): v for k, v in annotations.items()}
  fallback = _textvqa_image_index(index) if task == "textvqa" else {}

  rows, records, unknown, found = [], [], [], set()
  for (qid, _), row in latest.items():
    key = qid
    if key not in index and fallback:
      try:
        key = fallback.get((qid, vqa.textvqa_question_from_prompt(row.get("prompt", ""))))
      except ValueError:
        key = None
    if key is None or key not in index:
      unknown.append(qid)
      continue
    found.add(key)
    rows.append(row)
    records.append(index[key])
  if unknown:
    raise KeyError(
        f"{task}: {len(unknown)} answers have no annotation, e.g. question ids "
        f"{unknown[:5]}; is the annotation file for the same split?"
    )
  metrics = spec.metric(rows, records)
  out = {f"{task}/{k}": v for k, v in metrics.items()}
  out[f"{task}/n"] = len(rows)
  out[f"{task}/missing"] = len(index) - len(found)
  return out


def _textvqa_image_index(index: Mapping[str, Row]) -> dict[tuple[str, str], str]:
  # eval_textvqa.py looks annotations up by (image_id, question.lower()) because LLaVA's
  # llava_textvqa_val_v051_ocr.jsonl stores the image id in "question_id".
  return {
      (str(r["image_id"]), r["question"].lower()): k for k, r in index.items() if "image_id" in r and "question" in r
  }
