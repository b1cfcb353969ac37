"""Question, annotation and answer files in LLaVA's formats; the task table and ``score``.

Questions (``read_questions``) come back as LLaVA's JSONL rows
``{question_id, image, text, category?, …}`` whatever the source file:

* ``.jsonl``: LLaVA's own files (``scripts/v1_5/eval``: ``llava_vqav2_mscoco_test-dev2015``,
  ``llava_gqa_testdev_balanced``, ``llava_pope_test``, ``llava_textvqa_val_v051_ocr``, …),
* ``.json``: the official VQAv2 questions (``{"questions": […]}``), TextVQA
  (``{"data": […]}``), GQA (``{qid: {imageId, question, …}}``) or LLaVA's ScienceQA
  conversations (``llava_test_CQM-A.json``),
* ``.tsv``: MMBench (the ``image`` column, base64, is kept as ``image_base64``).

Answers are LLaVA's JSONL rows ``{question_id, prompt, text, answer_id, model_id, metadata}``
(MMBench adds ``round_id, options, option_char``). ``AnswerWriter`` appends and flushes
one line per answer, so a killed run keeps everything it finished; ``answered_ids`` lets
the next run skip those, ignoring (with a warning) a last line the kill cut short.

``score(task, answers, annotations)`` returns the metrics that go into ``eval.json``,
named ``<task>/<metric>``, plus ``<task>/n`` (answers scored) and ``<task>/missing``
(annotated questions without an answer; the reference scripts for ScienceQA count those
as wrong, so their accuracy is ``accuracy * n / (n + missing)``).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import sys
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from llava_jax.eval import multiple_choice, pope, vqa

SHORT_ANSWER = "Answer the question using a single word or phrase."
MC_ANSWER = "Answer with the option's letter from the given choices directly."

Row = dict[str, Any]


# ----------------------------------------------------------------------------- tasks

def _texts(answers: Sequence[Row]) -> list[str]:
  return [a["text"] for a in answers]


def _human_answers(record: Row) -> list[str]:
  # Official VQAv2 annotations hold dicts {answer, answer_confidence, answer_id}.
  return [a["answer"] if isinstance(a, dict) else a for a in record["answers"]]


def _vqav2(answers, records):
  return vqa.vqav2_metrics(_texts(answers), [_human_answers(r) for r in records],
                           [r.get("answer_type") for r in records])


def _textvqa(answers, records):
  return vqa.textvqa_metrics(_texts(answers), [_human_answers(r) for r in records])


def _gqa(answers, records):
  return vqa.gqa_metrics(_texts(answers), [r["answer"] for r in records])


def _synthetic(answers, records):
  return vqa.exact_match_metrics(_texts(answers), [r["answer"] for r in records])


def _pope(answers, records):
  return pope.pope_metrics_by_split(_texts(answers), [r["label"] for r in records],
                                    [r["category"] for r in records])


def _scienceqa(answers, records):
  return multiple_choice.scienceqa_metrics(
      _texts(answers), [r["answer"] for r in records], [len(r["choices"]) for r in records],
      [bool(r.get("image")) for r in records])


def _mmbench(answers, records):
  return multiple_choice.mmbench_metrics(
      _texts(answers), [r["answer"] for r in records],
      [a["options"] if "options" in a else r["options"] for a, r in zip(answers, records)],
      [a.get("option_char") for a in answers], [a["question_id"] for a in answers],
      [a.get("round_id", 0) for a in answers])


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


def score(task: str, answers: Iterable[Row] | str | os.PathLike,
          annotations: Mapping[Any, Row]) -> dict[str, float]:
  """Metrics for ``task`` as they go into eval.json: ``{"<task>/<metric>": value, …}``.

  Args:
    answers: answer rows (or an answers JSONL path); later rows for the same
      ``(question_id, round_id)`` replace earlier ones, as LLaVA's dict-building does.
    annotations: question id -> ground-truth record (``read_annotations``); ids are
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
    raise KeyError(f"{task}: {len(unknown)} answers have no annotation, e.g. question ids "
                   f"{unknown[:5]}; is the annotation file for the same split?")
  metrics = spec.metric(rows, records)
  out = {f"{task}/{k}": v for k, v in metrics.items()}
  out[f"{task}/n"] = len(rows)
  out[f"{task}/missing"] = len(index) - len(found)
  return out


def _textvqa_image_index(index: Mapping[str, Row]) -> dict[tuple[str, str], str]:
  # eval_textvqa.py looks annotations up by (image_id, question.lower()) because LLaVA's
  # llava_textvqa_val_v051_ocr.jsonl stores the image id in "question_id".
  return {(str(r["image_id"]), r["question"].lower()): k for k, r in index.items()
          if "image_id" in r and "question" in r}


# ------------------------------------------------------------------------- questions

def read_questions(path: str | os.PathLike) -> list[Row]:
  """Questions as LLaVA JSONL rows ``{question_id, image, text, …}``; see module doc."""
  path = Path(path)
  if path.suffix == ".jsonl":
    rows = _read_jsonl(path, tolerate_truncated_tail=False)
  elif path.suffix == ".tsv":
    rows = [_mmbench_question(r) for r in _read_tsv(path)]
  elif path.suffix == ".json":
    rows = _json_questions(json.loads(path.read_text()), path)
  else:
    raise ValueError(f"{path}: unknown question file type; expected .jsonl, .json or .tsv")
  for i, row in enumerate(rows):
    if "question_id" not in row or "text" not in row:
      raise ValueError(f"{path}: question {i} has no 'question_id' or 'text': "
                       f"{sorted(row)}")
  return rows


def _json_questions(data: Any, path: Path) -> list[Row]:
  if isinstance(data, dict) and "questions" in data:  # official VQAv2
    subtype = data.get("data_subtype", "")
    return [{"question_id": q["question_id"], "image_id": q["image_id"],
             "image": f"COCO_{subtype}_{q['image_id']:012d}.jpg" if subtype else None,
             "text": q["question"], "category": "default"} for q in data["questions"]]
  if isinstance(data, dict) and "data" in data:  # official TextVQA
    return [{"question_id": q["question_id"], "image_id": q["image_id"],
             "image": f"{q['image_id']}.jpg", "text": q["question"]} for q in data["data"]]
  if isinstance(data, list) and data and "conversations" in data[0]:  # LLaVA ScienceQA
    # model_vqa_science.py: first human turn without the <image> tag.
    return [{"question_id": q["id"], "image": q.get("image"),
             "text": q["conversations"][0]["value"].replace("<image>", "").strip()}
            for q in data]
  if isinstance(data, list):
    return data
  if isinstance(data, dict) and all(isinstance(v, dict) and "imageId" in v
                                    for v in data.values()):  # official GQA
    return [{"question_id": qid, "image": f"{q['imageId']}.jpg", "text": q["question"],
             "category": "default"} for qid, q in data.items()]
  raise ValueError(f"{path}: unrecognised question JSON; expected VQAv2 {{'questions'}}, "
                   "TextVQA {'data'}, GQA {qid: {imageId, question}}, a list of rows, "
                   "or LLaVA ScienceQA conversations")


def _read_tsv(path: Path) -> list[Row]:
  csv.field_size_limit(sys.maxsize)  # MMBench rows carry base64 images
  with open(path, newline="", encoding="utf-8") as f:
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
  return {"question_id": qid, "text": text, "options": options,
          "image_base64": row.get("image"), "category": row.get("category")}


# ----------------------------------------------------------------------- annotations

def read_annotations(task: str, path: str | os.PathLike,
                     questions: Sequence[Row] | None = None,
                     split: str | None = None) -> dict[Any, Row]:
  """Ground truth for ``task``: question id -> record with ``TASKS[task].ground_truth``.

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
  path = Path(path)
  if task == "pope" and path.is_dir():
    return _pope_annotations(path, questions)
  if path.suffix == ".jsonl":
    return {r["question_id"]: r for r in _read_jsonl(path, tolerate_truncated_tail=False)}
  if path.suffix == ".tsv":
    return {q["question_id"]: {"answer": r["answer"], "options": q["options"],
                               "category": q["category"]}
            for r in _read_tsv(path) for q in [_mmbench_question(r)]}
  data = json.loads(path.read_text())
  if task == "vqav2" and isinstance(data, dict) and "annotations" in data:
    return {a["question_id"]: {"answers": _human_answers(a), "answer_type": a.get("answer_type"),
                               "question_type": a.get("question_type")}
            for a in data["annotations"]}
  if task == "textvqa" and isinstance(data, dict) and "data" in data:
    return {a["question_id"]: {"answers": a["answers"], "image_id": a["image_id"],
                               "question": a["question"]} for a in data["data"]}
  if task == "scienceqa" and isinstance(data, dict):
    if split is not None:
      keep = json.loads((path.parent / "pid_splits.json").read_text())[split]
      data = {pid: data[pid] for pid in keep}
    return data
  if isinstance(data, dict):  # GQA and other {qid: record} files
    return data
  return {r["question_id"]: r for r in data}


def _pope_annotations(directory: Path, questions: Sequence[Row] | None) -> dict[Any, Row]:
  if questions is None:
    raise ValueError("POPE labels are matched to questions by order within each category; "
                     "pass questions=read_questions('llava_pope_test.jsonl')")
  files = sorted(directory.glob("coco_pope_*.json"))
  if not files:
    raise FileNotFoundError(f"{directory}: no coco_pope_<split>.json label files")
  out = {}
  for file in files:
    category = file.name[len("coco_pope_"):-len(".json")]
    labels = _read_jsonl(file, tolerate_truncated_tail=False)
    asked = [q for q in questions if q.get("category") == category]
    if len(asked) != len(labels):
      raise ValueError(f"{file}: {len(labels)} labels but {len(asked)} questions with "
                       f"category {category!r}")
    for q, label in zip(asked, labels):
      if "image" in q and "image" in label and q["image"] != label["image"]:
        raise ValueError(f"{file}: question {q['question_id']!r} shows {q['image']!r} but "
                         f"its label line is for {label['image']!r}; files out of order?")
      out[q["question_id"]] = {"label": label["label"], "category": category}
  return out


# --------------------------------------------------------------------------- answers

class AnswerWriter:
  """Appends LLaVA answer rows to a JSONL file, one flushed line per answer.

  Opening repairs a tail cut short by a killed run (the partial line is dropped, with a
  warning, so ``answered_ids`` and the file agree and the question is asked again).
  """

  def __init__(self, path: str | os.PathLike, model_id: str):
    self.path = Path(path)
    self.model_id = model_id
    self.path.parent.mkdir(parents=True, exist_ok=True)
    _repair_tail(self.path)
    self._file = open(self.path, "a", encoding="utf-8")

  def write(self, question_id: Any, prompt: str, text: str,
            metadata: Mapping[str, Any] | None = None, **extra: Any) -> Row:
    """Appends ``{question_id, prompt, text, answer_id, model_id, metadata, **extra}``
    (``extra``: e.g. MMBench's ``round_id, options, option_char``) and flushes."""
    row = {"question_id": question_id, "prompt": prompt, "text": text,
           "answer_id": uuid.uuid4().hex, "model_id": self.model_id,
           "metadata": dict(metadata or {}), **extra}
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    return row

  def close(self) -> None:
    self._file.close()

  def __enter__(self) -> AnswerWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_answers(path: str | os.PathLike) -> list[Row]:
  """Answer rows of a LLaVA answers JSONL; a missing file has none. A last line cut
  short by a kill is ignored with a warning; a bad line elsewhere raises."""
  path = Path(path)
  if not path.exists():
    return []
  return _read_jsonl(path, tolerate_truncated_tail=True)


def answered_ids(path: str | os.PathLike, with_round: bool = False) -> set:
  """Question ids already answered in ``path`` (``(question_id, round_id)`` pairs with
  ``with_round``, for MMBench's rotated rounds), so a resumed run can skip them."""
  rows = read_answers(path)
  if with_round:
    return {(r["question_id"], r.get("round_id", 0)) for r in rows}
  return {r["question_id"] for r in rows}


def _read_jsonl(path: Path, tolerate_truncated_tail: bool) -> list[Row]:
  # errors="replace": a kill can also cut a multi-byte character in the last line.
  lines = path.read_bytes().decode("utf-8", errors="replace").split("\n")
  rows = []
  last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError as e:
      if tolerate_truncated_tail and i == last:
        warnings.warn(f"{path}: ignoring truncated last line {i + 1} ({len(line)} chars; "
                      "a run killed mid-write?)", RuntimeWarning, stacklevel=3)
        break
      raise ValueError(f"{path}:{i + 1}: not valid JSON ({e}): {line[:80]!r}") from None
  return rows


def _repair_tail(path: Path) -> None:
  """Makes ``path`` end at a line boundary before appending: a complete last record just
  lacking its newline gets one; a partial last record is cut off (with a warning)."""
  if not path.exists() or path.stat().st_size == 0:
    return
  data = path.read_bytes()
  if data.endswith(b"\n"):
    return
  cut = data.rfind(b"\n") + 1
  tail = data[cut:]
  try:
    json.loads(tail)
  except (json.JSONDecodeError, UnicodeDecodeError):
    warnings.warn(f"{path}: dropping truncated last line ({len(tail)} bytes; a run killed "
                  "mid-write?)", RuntimeWarning, stacklevel=3)
    with open(path, "r+b") as f:
      f.truncate(cut)
    return
  with open(path, "ab") as f:
    f.write(b"\n")
