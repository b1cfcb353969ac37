"""ScienceQA and MMBench letter extraction and accuracy."""

import pytest

from llava_jax.eval import multiple_choice as mc


@pytest.mark.parametrize(
    "text, letter",
    [
        ("B", "B"),
        ("A. The cat", "A"),
        ("B\nBecause cats purr.", "B"),  # newline counts as ". "
        ("The answer is D.", "D"),
        ("Cats purr. The answer is C", "C"),
        ("the answer is C.", mc.FAILED),  # "The answer is" is matched case-sensitively
        ("I think it is B", mc.FAILED),
        ("b", mc.FAILED),  # case-sensitive, as eval_science_qa.py
        ("F", mc.FAILED),  # not among A-E
    ],
)
def test_scienceqa_letter(text, letter):
  assert mc.scienceqa_letter(text) == letter


def test_scienceqa_choice_index_respects_number_of_choices():
  assert mc.scienceqa_choice_index("B", 2) == 1
  assert mc.scienceqa_choice_index("C", 2) == -1  # a C for a two-choice question is wrong
  assert mc.scienceqa_choice_index(mc.FAILED, 4) == -1


def test_scienceqa_metrics_with_image_subset():
  out = mc.scienceqa_metrics(
      ["A", "The answer is B.", "C", "no idea"], [0, 1, 1, 0], [2, 3, 3, 2], has_image=[True, True, False, True]
  )
  # correct: yes, yes, no (C is index 2, gold 1), no (FAILED)
  assert out["accuracy"] == 0.5
  assert out["img_accuracy"] == pytest.approx(2 / 3)


OPTIONS = ["teddy bear", "rabbit", "cat", "dog"]


@pytest.mark.parametrize(
    "text, letter",
    [
        ("B", "B"),
        ("b.", "B"),
        ("The answer is C.", "C"),
        ("a cute teddy bear", None),  # not a substring of an option
        ("teddy bear", "A"),  # substring of exactly one option
        ("rabbit", "B"),
        ("(C) cat", "C"),  # deterministic stand-in for the ChatGPT matcher
        ("D: dog", "D"),
        ("X", None),  # not a valid letter, in no option text
        ("E", "A"),  # LLaVA quirk: "e" is a substring of "teddy bear" only
        ("Spider", None),
    ],
)
def test_mmbench_letter(text, letter):
  assert mc.mmbench_letter(text, OPTIONS) == letter


def test_mmbench_ambiguous_substring_is_not_guessed():
  assert mc.mmbench_letter("cat", ["cat", "cats"]) is None


def test_mmbench_metrics_single_round_and_circular():
  rotated = OPTIONS[1:] + OPTIONS[:1]  # round 1 shows rabbit, cat, dog, teddy bear
  rotated_chars = ["B", "C", "D", "A"]
  out = mc.mmbench_metrics(
      predictions=["A", "D", "C", "A"],
      answers=["A", "A", "C", "C"],
      options=[OPTIONS, rotated, OPTIONS, rotated],
      option_chars=[None, rotated_chars, None, rotated_chars],
      question_ids=[1, 1, 2, 2],
      round_ids=[0, 1, 0, 1],
  )
  # q1: round 0 "A" right; round 1 shows teddy bear as D -> original A, right.
  # q2: round 0 "C" right; round 1 "A" shows rabbit -> original B, wrong.
  assert out["accuracy"] == 1.0
  assert out["circular_accuracy"] == 0.5


def test_mmbench_single_round_has_no_circular_metric():
  out = mc.mmbench_metrics(["A", "B"], ["A", "A"], [OPTIONS, OPTIONS], [None, None], [1, 2], [0, 0])
  assert out == {"accuracy": 0.5}
