"""Open-ended VQA metrics: VQAv2 and TextVQA soft accuracy, GQA and synthetic exact match.

Soft accuracy (VQAv2, TextVQA). Each question has 10 human answers. An answer that
``k`` of the *other* humans also gave scores ``min(1, k / 3)``; the reference evaluators
average that over the 10 leave-one-human-out subsets of 9 humans. If the prediction
equals ``m`` of the 10 answers, the 10 subsets see ``m - 1`` matches ``m`` times (the
left-out human was a match) and ``m`` matches ``10 - m`` times:

    acc(m) = [m * min(1, (m-1)/3) + (10-m) * min(1, m/3)] / 10
    acc(0)=0, acc(1)=0.3, acc(2)=0.6, acc(3)=0.9, acc(m>=4)=1.

All metrics are fractions in [0, 1] (the reference scripts print percentages, and the
VQA server rounds them to 2 decimals; nothing here rounds).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence

from llava_jax.eval.normalize import evalai_answer, normalize_vqa_answer, process_punctuation

NUM_HUMAN_ANSWERS = 10  # VQAv2 and TextVQA both collect 10 answers per question


def leave_one_out_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
  """``mean_i min(1, #{j != i : human_answers[j] == prediction} / 3)`` over the humans.

  Strings are compared exactly; callers normalise first. Summed in the same order and
  with the same float ops as the reference loops, so results agree bit for bit.
  """
  if not human_answers:
    raise ValueError("soft accuracy needs at least one human answer, got none")
  matches = sum(a == prediction for a in human_answers)
  accs = [min(1, float(matches - (a == prediction)) / 3) for a in human_answers]
  return float(sum(accs)) / len(accs)


def vqav2_accuracy(prediction: str, human_answers: Sequence[str], evalai_preprocess: bool = True) -> float:
  """Soft accuracy of one VQAv2 answer, as the VQAv2 evaluation server computes it.

  Mirrors ``VQAEval.evaluate`` in GT-Vision-Lab/VQA ``vqaEval.py``: the prediction gets
  processPunctuation + processDigitArticle; the human answers get processPunctuation only,
  and only when they are not all identical; matches are exact string equality. With
  ``evalai_preprocess`` the prediction first goes through ``EvalAIAnswerProcessor``, as
  LLaVA's ``scripts/convert_vqav2_for_submission.py`` does before uploading.
  """
  if evalai_preprocess:
    prediction = evalai_answer(prediction)
  prediction = normalize_vqa_answer(prediction)
  humans = list(human_answers)
  if len(set(humans)) > 1:
    humans = [process_punctuation(a) for a in humans]
  return leave_one_out_accuracy(prediction, humans)


def vqav2_metrics(
    predictions: Sequence[str],
    human_answers: Sequence[Sequence[str]],
    answer_types: Sequence[str | None] | None = None,
    evalai_preprocess: bool = True,
) -> dict[str, float]:
  """VQAv2 accuracy: mean of ``vqav2_accuracy``; with ``answer_types`` also
  ``accuracy/<type>`` per answer type (``yes/no``, ``number``, ``other``), the
  ``perAnswerType`` breakdown of vqaEval.py."""
  accs = [vqav2_accuracy(p, h, evalai_preprocess) for p, h in zip(predictions, human_answers, strict=True)]
  out = {"accuracy": _mean(accs)}
  if answer_types is not None:
    by_type = defaultdict(list)
    for acc, t in zip(accs, answer_types, strict=True):
      if t is not None:
        by_type[t].append(acc)
    for t, values in sorted(by_type.items()):
      out[f"accuracy/{t}"] = _mean(values)
  return out


def textvqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
  """Soft accuracy of one TextVQA answer, as LLaVA's ``llava/eval/eval_textvqa.py`` computes
  it with ``m4c_evaluator.TextVQAAccuracyEvaluator``: prediction and all 10 human answers
  go through ``EvalAIAnswerProcessor``; an answer no human gave scores 0."""
  if len(human_answers) != NUM_HUMAN_ANSWERS:
    raise ValueError(
        f"TextVQA expects {NUM_HUMAN_ANSWERS} human answers per question "
        f"(TextVQAAccuracyEvaluator asserts it), got {len(human_answers)}: "
        f"{list(human_answers)!r}"
    )
  return leave_one_out_accuracy(evalai_answer(prediction), [evalai_answer(a) for a in human_answers])


def textvqa_metrics(predictions: Sequence[str], human_answers: Sequence[Sequence[str]]) -> dict[str, float]:
  """TextVQA accuracy: mean of ``textvqa_accuracy`` (``eval_pred_list``)."""
  accs = [textvqa_accuracy(p, h) for p, h in zip(predictions, human_answers, strict=True)]
  return {"accuracy": _mean(accs)}


def textvqa_question_from_prompt(prompt: str) -> str:
  """``prompt_processor`` of eval_textvqa.py: recover the lower-cased question from the
  prompt LLaVA stored, which it uses with the image id to find the annotation."""
  lines = prompt.split("\n")
  if prompt.startswith("OCR tokens: "):
    match = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
    if match is None:
      raise ValueError(
          f"TextVQA prompt starts with 'OCR tokens: ' but has no 'Question: ... Short answer:' part: {prompt!r}"
      )
    question = match.group(1)
  elif "Reference OCR token: " in prompt and len(lines) == 3:
    question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
  elif len(lines) == 2:
    question = lines[0]
  else:
    raise ValueError(
        f"cannot find the question in TextVQA prompt {prompt!r}: expected "
        "'question\\nsuffix' or one of LLaVA's OCR-token layouts"
    )
  return question.lower()


def gqa_answer(text: str) -> str:
  """LLaVA's ``scripts/convert_gqa_for_eval.py``: ``text.rstrip('.').lower()``.

  The leading ``strip()`` stands for model_vqa_loader.py stripping the decoded output
  before writing it, so an unstripped answers file scores the same.
  """
  return text.strip().rstrip(".").lower()


def gqa_metrics(predictions: Sequence[str], answers: Sequence[str]) -> dict[str, float]:
  """GQA accuracy: exact match of ``gqa_answer(prediction)`` with the gold answer, as the
  official GQA ``eval.py`` (``correct = predicted == gold``) scores LLaVA's converted file."""
  hits = [gqa_answer(p) == a for p, a in zip(predictions, answers, strict=True)]
  return {"accuracy": _mean(hits)}


def exact_match_metrics(predictions: Sequence[str], answers: Sequence[str]) -> dict[str, float]:
  """Exact match after ``evalai_answer`` on both sides, for the embedded synthetic VQA set:
  ``"The red square."`` matches ``"red square"``, ``"two"`` matches ``"2"``."""
  hits = [evalai_answer(p) == evalai_answer(a) for p, a in zip(predictions, answers, strict=True)]
  return {"accuracy": _mean(hits)}


def _mean(values: Sequence[float]) -> float:
  # Plain left-to-right sum / len, as the reference scripts do, so totals match exactly.
  if not values:
    raise ValueError("no answered questions to score")
  return float(sum(values)) / len(values)
