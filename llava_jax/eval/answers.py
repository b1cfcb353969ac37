"""Answer files: LLaVA's JSONL rows, appended one flushed line at a time so runs resume.

Answers are LLaVA's JSONL rows ``{question_id, prompt, text, answer_id, model_id, metadata}``
(MMBench adds ``round_id, options, option_char``). ``AnswerWriter`` appends and flushes
one line per answer, so a killed run keeps everything it finished; ``answered_ids`` lets
the next run skip those, ignoring (with a warning) a last line the kill cut short.

On a bucket (``gs://``) an object cannot be appended to in place: the writer publishes
the answers of each ``flush()`` (``run_eval`` flushes after every batch) as one atomic
compose (``storage.Appender``), so the file only ever holds whole lines and a killed
run loses at most the batch in flight, which the next run answers again.
"""

from __future__ import annotations

import json
import os
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llava_jax import storage

Row = dict[str, Any]


class AnswerWriter:
  """Appends LLaVA answer rows to a JSONL file, one flushed line per answer.

  Opening repairs a tail cut short by a killed run (the partial line is dropped, with a
  warning, so ``answered_ids`` and the file agree and the question is asked again).
  """

  def __init__(self, path: str | os.PathLike, model_id: str):
    self.path = storage.as_path(path, "answer file")
    self.model_id = model_id
    storage.makedirs(os.path.dirname(os.fspath(self.path)) or ".")
    _repair_tail(self.path)
    self._file = storage.Appender(self.path)

  def write(
      self, question_id: Any, prompt: str, text: str, metadata: Mapping[str, Any] | None = None, **extra: Any
  ) -> Row:
    """Appends ``{question_id, prompt, text, answer_id, model_id, metadata, **extra}``
    (``extra``: e.g. MMBench's ``round_id, options, option_char``) and flushes."""
    row = {
        "question_id": question_id,
        "prompt": prompt,
        "text": text,
        "answer_id": uuid.uuid4().hex,
        "model_id": self.model_id,
        "metadata": dict(metadata or {}),
        **extra,
    }
    self._file.append(json.dumps(row) + "\n")  # locally written and flushed at once
    return row

  def flush(self) -> None:
    """Publishes the answers written so far (on a bucket; locally each is already on disk)."""
    self._file.flush()

  def close(self) -> None:
    self._file.close()

  def __enter__(self) -> AnswerWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_answers(path: str | os.PathLike) -> list[Row]:
  """Answer rows of a LLaVA answers JSONL; a missing file has none. A last line cut
  short by a kill is ignored with a warning; a bad line elsewhere raises."""
  path = storage.as_path(path, "answer file")
  if not path.exists():
    return []
  return read_jsonl(path, tolerate_truncated_tail=True)


def answered_ids(path: str | os.PathLike, with_round: bool = False) -> set:
  """Question ids already answered in ``path`` (``(question_id, round_id)`` pairs with
  ``with_round``, for MMBench's rotated rounds), so a resumed run can skip them."""
  rows = read_answers(path)
  if with_round:
    return {(r["question_id"], r.get("round_id", 0)) for r in rows}
  return {r["question_id"] for r in rows}


def read_jsonl(path: Path, tolerate_truncated_tail: bool) -> list[Row]:
  """The rows of a JSONL file (blank lines skipped). A bad line raises ValueError naming it,
  except, with ``tolerate_truncated_tail``, a last line cut short by a kill: ignored, with a
  RuntimeWarning."""
  # errors="replace": a kill can also cut a multi-byte character in the last line.
  lines = storage.read_bytes(path).decode("utf-8", errors="replace").split("\n")
  rows = []
  last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError as e:
      if tolerate_truncated_tail and i == last:
        warnings.warn(
            f"{path}: ignoring truncated last line {i + 1} ({len(line)} chars; a run killed mid-write?)",
            RuntimeWarning,
            stacklevel=3,
        )
        break
      raise ValueError(f"{path}:{i + 1}: not valid JSON ({e}): {line[:80]!r}") from None
  return rows


def _repair_tail(path: Path) -> None:
  """Makes ``path`` end at a line boundary before appending: a complete last record just
  lacking its newline gets one; a partial last record is cut off (with a warning)."""
  if not path.exists():
    return
  data = storage.read_bytes(path)
  if not data or data.endswith(b"\n"):
    return
  cut = data.rfind(b"\n") + 1
  tail = data[cut:]
  try:
    json.loads(tail)
  except (json.JSONDecodeError, UnicodeDecodeError):
    warnings.warn(
        f"{path}: dropping truncated last line ({len(tail)} bytes; a run killed mid-write?)",
        RuntimeWarning,
        stacklevel=3,
    )
    storage.write_atomic(path, data[:cut])
    return
  storage.write_atomic(path, data + b"\n")
