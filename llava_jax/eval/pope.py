"""POPE (object hallucination) metrics, mirroring LLaVA's ``llava/eval/eval_pope.py``.

POPE asks "Is there a <object> in the image?" with gold labels ``yes`` / ``no`` in three
splits that differ in how the absent objects are sampled: ``random``, ``popular`` and
``adversarial``. "yes" is the positive class:

    accuracy  = (TP + TN) / N          precision = TP / (TP + FP)
    recall    = TP / (TP + FN)         F1        = 2 P R / (P + R)
    yes_ratio = (TP + FP) / N          (share of "yes" predictions)

Answer parsing is eval_pope.py's: keep the text before the first ``.``, delete commas,
split on single spaces, and the answer is "no" iff a word is exactly ``No``, ``no`` or
``not``; everything else (including ``NO`` or an empty answer) counts as "yes".

Deviation: where eval_pope.py divides by zero (no "yes" predictions, or no "yes"
labels) the precision / recall / F1 here are 0.0 instead of an exception.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

SPLITS = ("adversarial", "popular", "random")
_NO_WORDS = ("No", "not", "no")


def pope_answer(text: str) -> str:
  """``"yes"`` or ``"no"`` from a free-form answer, exactly as eval_pope.py parses it."""
  if text.find(".") != -1:
    text = text.split(".")[0]
  words = text.replace(",", "").split(" ")
  return "no" if any(w in words for w in _NO_WORDS) else "yes"


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
  """Accuracy, precision, recall, F1, yes-ratio and the confusion counts for one split.

  Args:
    predictions: raw model answers; parsed with ``pope_answer``.
    labels: gold labels; ``"no"`` is negative, anything else positive (as eval_pope.py).
  """
  if len(predictions) != len(labels):
    raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
  if not predictions:
    raise ValueError("no answered POPE questions to score")
  pred_pos = [pope_answer(p) == "yes" for p in predictions]
  gold_pos = [label != "no" for label in labels]
  tp = sum(p and g for p, g in zip(pred_pos, gold_pos))
  fp = sum(p and not g for p, g in zip(pred_pos, gold_pos))
  tn = sum(not p and not g for p, g in zip(pred_pos, gold_pos))
  fn = sum(not p and g for p, g in zip(pred_pos, gold_pos))
  precision = tp / (tp + fp) if tp + fp else 0.0
  recall = tp / (tp + fn) if tp + fn else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return {
      "accuracy": (tp + tn) / (tp + tn + fp + fn),
      "precision": precision,
      "recall": recall,
      "f1": f1,
      "yes_ratio": sum(pred_pos) / len(pred_pos),
      "tp": tp,
      "fp": fp,
      "tn": tn,
      "fn": fn,
  }


def pope_metrics_by_split(predictions: Sequence[str], labels: Sequence[str], splits: Sequence[str]) -> dict[str, float]:
  """``pope_metrics`` per split (keys ``<split>/accuracy``, ``<split>/f1``, …), as
  eval_pope.py prints them per ``coco_pope_<split>.json``, plus the unweighted mean over
  splits of accuracy, precision, recall, F1 and yes-ratio (the number papers quote as
  "POPE" is usually the mean F1 or accuracy of the three splits)."""
  if not len(predictions) == len(labels) == len(splits):
    raise ValueError(f"{len(predictions)} predictions, {len(labels)} labels and {len(splits)} split names must match")
  grouped = defaultdict(lambda: ([], []))
  for p, label, split in zip(predictions, labels, splits):
    grouped[split][0].append(p)
    grouped[split][1].append(label)
  out = {}
  per_split = {split: pope_metrics(*grouped[split]) for split in sorted(grouped)}
  for split, metrics in per_split.items():
    out.update({f"{split}/{k}": v for k, v in metrics.items()})
  for k in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
    out[k] = sum(m[k] for m in per_split.values()) / len(per_split)
  return out
