"""Multiple-choice metrics: ScienceQA and MMBench letter extraction and accuracy.

ScienceQA mirrors LLaVA's ``llava/eval/eval_science_qa.py`` (the version with the
``"A. "`` and ``"The answer is X"`` fallbacks): a prediction counts only if a letter among
the first ``len(choices)`` options can be read from it; anything else is "FAILED" (index
-1, wrong). Newer LLaVA picks -1 where the first release picked a random option, so
scores are deterministic.

MMBench mirrors ``auto_parse_answer`` in LLaVA's ``llava/eval/eval_mmbench.py``. Where
that script falls back to asking ChatGPT, this module tries one deterministic rule (a
leading ``"B."``, ``"B)"``, ``"(B)"`` or ``"B:"``) and otherwise counts the answer as wrong.
With ``--all-rounds`` LLaVA rotates the options once per round and records the rotated
letters in ``option_char``; the displayed letter is mapped back through it. Circular
accuracy (MMBench's CircularEval) credits a question only if every round is right.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence

SCIENCEQA_OPTIONS = ("A", "B", "C", "D", "E")  # eval_science_qa.py's --options default
MMBENCH_OPTIONS = ("A", "B", "C", "D")  # all_options in model_vqa_mmbench.py
FAILED = "FAILED"

_SQA_ANSWER_IS_DOT = re.compile(r"The answer is ([A-E])\.")
_SQA_ANSWER_IS = re.compile(r"The answer is ([A-E])")
_SQA_LETTER_DOT_SPACE = re.compile(r"^([A-E])\. ")
_LEADING_LETTER = re.compile(r"^\s*\(?([A-Z])[.:)](?:\s|$)")


def scienceqa_letter(text: str, options: Sequence[str] = SCIENCEQA_OPTIONS) -> str:
  """The letter eval_science_qa.py reads from a prediction, or ``"FAILED"``.

  In order: the whole (stripped) text is a letter; the text starts with ``"X. "``; it
  contains ``"The answer is X."``; it contains ``"The answer is X"``. Newlines count as
  ``". "`` (``"B\\nbecause"`` -> ``B``).
  """
  text = text.replace("\n", ". ")
  if text.strip() in options:
    return text.strip()
  if len(text) >= 3 and text[0] in options and text[1:3] == ". ":
    return text[0]
  for pattern in (_SQA_ANSWER_IS_DOT, _SQA_ANSWER_IS):
    match = pattern.search(text)
    if match:
      # eval_science_qa.py keeps a stale letter when the match is not a valid option
      # (impossible with its default A-E options); FAILED is what it means.
      return match.group(1) if match.group(1) in options else FAILED
  return FAILED


def scienceqa_choice_index(letter: str, num_choices: int, options: Sequence[str] = SCIENCEQA_OPTIONS) -> int:
  """``get_pred_idx``: the choice index of ``letter``, or -1 if it is not one of the
  first ``num_choices`` options (a "C" for a two-choice question is wrong, not C)."""
  letter = letter.replace("\n", ". ")
  valid = list(options[:num_choices])
  if letter in valid:
    return valid.index(letter)
  for pattern in (_SQA_LETTER_DOT_SPACE, _SQA_ANSWER_IS_DOT, _SQA_ANSWER_IS):
    match = pattern.search(letter)
    if match and match.group(1) in valid:
      return valid.index(match.group(1))
  return -1


def scienceqa_metrics(
    predictions: Sequence[str],
    answers: Sequence[int],
    num_choices: Sequence[int],
    has_image: Sequence[bool] | None = None,
) -> dict[str, float]:
  """ScienceQA accuracy (``acc`` of eval_science_qa.py, as a fraction) and, given
  ``has_image``, ``img_accuracy`` over the questions with an image (its IMG-Accuracy).

  Args:
    predictions: raw model answers.
    answers: gold choice index per question (``problems.json``'s ``answer``).
    num_choices: ``len(choices)`` per question.
    has_image: whether each question comes with an image.
  """
  if not predictions:
    raise ValueError("no answered ScienceQA questions to score")
  correct = [
      scienceqa_choice_index(scienceqa_letter(p), n) == int(a)
      for p, a, n in zip(predictions, answers, num_choices, strict=True)
  ]
  out = {"accuracy": sum(correct) / len(correct)}
  if has_image is not None:
    img = [c for c, i in zip(correct, has_image, strict=True) if i]
    if img:
      out["img_accuracy"] = sum(img) / len(img)
  return out


def mmbench_letter(text: str, options: Sequence[str], letters: Sequence[str] = MMBENCH_OPTIONS) -> str | None:
  """The displayed option letter a prediction picks, or None if it cannot be read.

  ``auto_parse_answer`` of eval_mmbench.py: the text (stripped of ``.`` and spaces,
  upper-cased) is a letter; or it contains ``"the answer is x."`` (case-insensitive);
  or it is a substring of exactly one option's text. Then, standing in for the ChatGPT
  matcher, a leading ``"X."``/``"X)"``/``"(X)"``/``"X:"``.

  Args:
    text: raw model answer.
    options: option texts in the order shown to the model (A, B, …).
  """
  valid = list(letters[: len(options)])
  bare = text.strip(".").strip().upper()
  if bare in valid:
    return bare
  lowered = text.lower()
  for letter in valid:
    if f"the answer is {letter}.".lower() in lowered:
      return letter
  matched = [valid[i] for i, option in enumerate(options) if lowered in str(option).lower()]
  if len(matched) == 1:
    return matched[0]
  match = _LEADING_LETTER.match(text)
  if match and match.group(1) in valid:
    return match.group(1)
  return None


def mmbench_metrics(
    predictions: Sequence[str],
    answers: Sequence[str],
    options: Sequence[Sequence[str]],
    option_chars: Sequence[Sequence[str] | None],
    question_ids: Sequence[object],
    round_ids: Sequence[int],
) -> dict[str, float]:
  """MMBench accuracy of round 0 (one pass, options in original order) and, when some
  question was asked in more than one rotation, ``circular_accuracy``: a question counts
  only if all its rounds are right.

  Args:
    predictions: raw model answers, one per (question, round).
    answers: gold letter in the original option order (the TSV's ``answer``).
    options: option texts as displayed in that round.
    option_chars: the original letters of the displayed options (LLaVA's rotated
      ``option_char``); None means unrotated.
    question_ids, round_ids: MMBench ``index`` and LLaVA's ``round_id`` per row.
  """
  if not predictions:
    raise ValueError("no answered MMBench questions to score")
  rounds = defaultdict(list)
  first_round = []
  for pred, gold, opts, chars, qid, rid in zip(
      predictions, answers, options, option_chars, question_ids, round_ids, strict=True
  ):
    shown = mmbench_letter(pred, opts)
    chars = list(chars) if chars is not None else list(MMBENCH_OPTIONS[: len(opts)])
    picked = None if shown is None else chars[MMBENCH_OPTIONS.index(shown)]
    ok = picked == gold
    rounds[qid].append(ok)
    if int(rid) == 0:
      first_round.append(ok)
  out = {}
  if first_round:
    out["accuracy"] = sum(first_round) / len(first_round)
  if any(len(r) > 1 for r in rounds.values()):
    out["circular_accuracy"] = sum(all(r) for r in rounds.values()) / len(rounds)
  return out
