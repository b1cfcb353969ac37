"""Benchmark question and annotation files, official formats and LLaVA's.

Questions (``read_questions``) come back as LLaVA's JSONL rows
``{question_id, image, text, category?, …}`` whatever the source file:

* ``.jsonl``: LLaVA's own files (``scripts/v1_5/eval``: ``llava_vqav2_mscoco_test-dev2015``,
  ``llava_gqa_testdev_balanced``, ``llava_pope_test``, ``llava_textvqa_val_v051_ocr``, …),
* ``.json``: the official VQAv2 questions (``{"questions": […]}``), TextVQA
  (``{"data": […]}``), GQA (``{qid: {imageId, question, …}}``) or LLaVA's ScienceQA
  conversations (``llava_test_CQM-A.json``),
* ``.tsv``: MMBench (the ``image`` column, base64, is kept as ``image_base64``).

Annotations (``read_annotations``) come back as question id -> ground-truth record with
the fields ``tasks.TASKS[task].ground_truth`` names.
"""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llava_jax import storage
from llava_jax.eval import multiple_choice
from llava_jax.eval.answers import Row, read_jsonl
from llava_jax.eval.tasks import get_task, human_answers


def read_questions(path: str | os.PathLike) -> list[Row]:
  """Questions as LLaVA JSONL rows ``{question_id, image, text, …}``; see module doc."""
  path = storage.as_path(path, "question file")
  if path.suffix == ".jsonl":
    rows = read_jsonl(path, tolerate_truncated_tail=False)
  elif path.suffix == ".tsv":
    rows = [_mmbench_question(r) for r in _read_tsv(path)]
  elif path.suffix == ".json":
    rows = _json_questions(storage.read_json(path), path)
  else:
    raise ValueError(f"{path}: unknown question file type; expected .jsonl, .json or .tsv")
  for i, row in enumerate(rows):
    if "question_id" not in row or "text" not in row:
      raise ValueError(f"{path}: question {i} has no 'question_id' or 'text': {sorted(row)}")
  return rows


def _json_questions(data: Any, path: Path) -> list[Row]:
  if isinstance(data, dict) and "questions" in data:  # official VQAv2
    subtype = data.get("data_subtype", "")
    return [
        {
            "question_id": q["question_id"],
            "image_id": q["image_id"],
            "image": f"COCO_{subtype}_{q['image_id']:012d}.jpg" if subtype else None,
            "text": q["question"],
            "category": "default",
        }
        for q in data["questions"]
    ]
  if isinstance(data, dict) and "data" in data:  # official TextVQA
    return [
        {
            "question_id": q["question_id"],
            "image_id": q["image_id"],
            "image": f"{q['image_id']}.jpg",
            "text": q["question"],
        }
        for q in data["data"]
    ]
  if isinstance(data, list) and data and "conversations" in data[0]:  # LLaVA ScienceQA
    # model_vqa_science.py: first human turn without the <image> tag.
    return [
        {
            "question_id": q["id"],
            "image": q.get("image"),
            "text": q["conversations"][0]["value"].replace("<image>", "").strip(),
        }
        for q in data
    ]
  if isinstance(data, list):
    return data
  if isinstance(data, dict) and all(isinstance(v, dict) and "imageId" in v for v in data.values()):  # official GQA
    return [
        {"question_id": qid, "image": f"{q['imageId']}.jpg", "text": q["question"], "category": "default"}
        for qid, q in data.items()
    ]
  raise ValueError(
      f"{path}: unrecognised question JSON; expected VQAv2 {{'questions'}}, "
      "TextVQA {'data'}, GQA {qid: {imageId, question}}, a list of rows, "
      "or LLaVA ScienceQA conversations"
  )


def _read_tsv(path: Path) -> list[Row]:
  csv.field_size_limit(sys.maxsize)  # MMBench rows carry base64 images
  with storage.open_file(path, "r", newline="") as f:
    return list(csv.DictReader(f, delimiter="\t"))


def _is_none(value: Any) -> bool:
  # model_vqa_mmbench.py's is_none: pandas reads empty cells as NaN.
  return value is None or str(value).strip().lower() in ("", "nan", "none")


def _mmbench_options(row: Row) -> list[str]:
  options = []
  for letter in multiple_choice.MMBENCH_OPTIONS:
    if _is_none(row.get(letter)):
      break
    options.append(row[letter])
  return options


def _mmbench_question(row: Row) -> Row:
  """A TSV row as model_vqa_mmbench.py builds the prompt: hint, question, lettered options."""
  options = _mmbench_options(row)
  text = row["question"]
  if not _is_none(row.get("hint")):
    text = row["hint"] + "\n" + text
  for letter, option in zip(multiple_choice.MMBENCH_OPTIONS, options):
    text += f"\n{letter}. {option}"
  qid = int(row["index"]) if str(row["index"]).isdigit() else row["index"]
  return {
      "question_id": qid,
      "text": text,
      "options": options,
      "image_base64": row.get("image"),
      "category": row.get("category"),
  }


# ----------------------------------------------------------------------- annotations


def read_annotations(
    task: str, path: str | os.PathLike, questions: Sequence[Row] | None = None, split: str | None = None
) -> dict[Any, Row]:
  """Ground truth for ``task``: question id -> record with ``tasks.TASKS[task].ground_truth``.

  * vqav2: official ``v2_mscoco_*_annotations.json`` (answers, answer_type, question_type).
  * textvqa: official ``TextVQA_0.5.1_val.json`` (answers, image_id, question).
  * gqa: official ``*_balanced_questions.json`` (answer).
  * pope: the directory of ``coco_pope_<split>.json`` label files plus ``questions``
    (LLaVA's ``llava_pope_test.jsonl``); labels are matched to the questions of the same
    category in file order, which is how eval_pope.py pairs them.
  * scienceqa: ``problems.json`` (answer, choices, image); ``split`` (e.g. "test") keeps
    only the ids in ``pid_splits.json`` next to it.
  * mmbench: the MMBench ``.tsv`` (answer, options, category).
  * anything else (and any ``.jsonl``): rows with ``question_id`` plus the fields.
  """
  get_task(task)
  path = storage.as_path(path, "annotation file")
  if task == "pope" and path.is_dir():
    return _pope_annotations(path, questions)
  if path.suffix == ".jsonl":
    return {r["question_id"]: r for r in read_jsonl(path, tolerate_truncated_tail=False)}
  if path.suffix == ".tsv":
    return {
        q["question_id"]: {"answer": r["answer"], "options": q["options"], "category": q["category"]}
        for r in _read_tsv(path)
        for q in [_mmbench_question(r)]
    }
  data = storage.read_json(path)
  if task == "vqav2" and isinstance(data, dict) and "annotations" in data:
    return {
        a["question_id"]: {
            "answers": human_answers(a),
            "answer_type": a.get("answer_type"),
            "question_type": a.get("question_type"),
        }
        for a in data["annotations"]
    }
  if task == "textvqa" and isinstance(data, dict) and "data" in data:
    return {
        a["question_id"]: {"answers": a["answers"], "image_id": a["image_id"], "question": a["question"]}
        for a in data["data"]
    }
  if task == "scienceqa" and isinstance(data, dict):
    if split is not None:
      keep = storage.read_json(path.parent / "pid_splits.json")[split]
      data = {pid: data[pid] for pid in keep}
    return data
  if isinstance(data, dict):  # GQA and other {qid: record} files
    return data
  return {r["question_id"]: r for r in data}


def _pope_annotations(directory: Path, questions: Sequence[Row] | None) -> dict[Any, Row]:
  if questions is None:
    raise ValueError(
        "POPE labels are matched to questions by order within each category; "
        "pass questions=read_questions('llava_pope_test.jsonl')"
    )
  files = sorted(directory.glob("coco_pope_*.json"))
  if not files:
    raise FileNotFoundError(f"{directory}: no coco_pope_<split>.json label files")
  out = {}
  for file in files:
    category = file.name[len("coco_pope_") : -len(".json")]
    labels = read_jsonl(file, tolerate_truncated_tail=False)
    asked = [q for q in questions if q.get("category") == category]
    if len(asked) != len(labels):
      raise ValueError(f"{file}: {len(labels)} labels but {len(asked)} questions with category {category!r}")
    for q, label in zip(asked, labels):
      if "image" in q and "image" in label and q["image"] != label["image"]:
        raise ValueError(
            f"{file}: question {q['question_id']!r} shows {q['image']!r} but "
            f"its label line is for {label['image']!r}; files out of order?"
        )
      out[q["question_id"]] = {"label": label["label"], "category": category}
  return out
