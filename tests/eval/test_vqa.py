"""Soft accuracy and exact-match metrics on hand-computed examples."""

import pytest

from llava_jax.eval import vqa


def humans(matching: str, m: int, other: str = "other") -> list[str]:
  return [matching] * m + [other] * (10 - m)


@pytest.mark.parametrize(
    "m, expected",
    [
        # acc(m) = [m * min(1, (m-1)/3) + (10-m) * min(1, m/3)] / 10
        (0, 0.0),
        (1, 0.3),  # [1*0 + 9*(1/3)] / 10 = 3/10
        (2, 0.6),  # [2*(1/3) + 8*(2/3)] / 10 = (2/3 + 16/3) / 10 = 6/10
        (3, 0.9),  # [3*(2/3) + 7*1] / 10 = (2 + 7) / 10
        (4, 1.0),  # [4*1 + 6*1] / 10: every 9-human subset still has >= 3 matches
        (10, 1.0),
    ],
)
def test_leave_one_out_accuracy(m, expected):
  assert vqa.leave_one_out_accuracy("cat", humans("cat", m)) == pytest.approx(expected, abs=1e-12)


def test_leave_one_out_is_not_the_naive_min_of_count_over_three():
  # The naive min(1, 3/3) would give 1.0 for three matching humans.
  assert vqa.leave_one_out_accuracy("cat", humans("cat", 3)) < 0.95


def test_vqav2_normalises_the_prediction():
  # "Two." -> "2", which 3 of 10 humans said.
  assert vqa.vqav2_accuracy("Two.", humans("2", 3, "3")) == pytest.approx(0.9)


def test_vqav2_human_answers_get_punctuation_only_and_only_if_they_differ():
  # Humans disagree -> their answers lose the period; "cat" then matches 4 of them.
  assert vqa.vqav2_accuracy("cat", humans("cat.", 4, "dog")) == 1.0
  # All ten identical -> left untouched, so "cat." never equals the prediction "cat".
  assert vqa.vqav2_accuracy("cat", ["cat."] * 10) == 0.0
  # Articles are never stripped from human answers (processDigitArticle is prediction-only).
  assert vqa.vqav2_accuracy("the cat", humans("the cat", 5, "dog")) == 0.0


def test_vqav2_evalai_preprocessing_as_llava_submits():
  # EvalAIAnswerProcessor turns "it's" into "it 's" before the official rules run.
  assert vqa.vqav2_accuracy("it's", ["it's"] * 10, evalai_preprocess=False) == 1.0
  assert vqa.vqav2_accuracy("it's", ["it's"] * 10, evalai_preprocess=True) == 0.0


def test_vqav2_metrics_per_answer_type():
  out = vqa.vqav2_metrics(
      ["yes", "2", "blue"], [humans("yes", 10), humans("2", 2, "3"), humans("red", 10)], ["yes/no", "number", "other"]
  )
  assert out["accuracy"] == pytest.approx((1.0 + 0.6 + 0.0) / 3)
  assert out["accuracy/yes/no"] == 1.0
  assert out["accuracy/number"] == pytest.approx(0.6)
  assert out["accuracy/other"] == 0.0


def test_textvqa_accuracy_normalises_both_sides():
  # "The Coca-Cola." and "coca-cola" both become "coca cola": 3 matches -> 0.9.
  gts = ["coca cola", "coca cola", "coca-cola"] + ["pepsi"] * 7
  assert vqa.textvqa_accuracy("The Coca-Cola.", gts) == pytest.approx(0.9)
  assert vqa.textvqa_accuracy("sprite", gts) == 0.0
  assert vqa.textvqa_metrics(["pepsi", "sprite"], [gts, gts]) == {"accuracy": 0.5}


def test_textvqa_needs_ten_answers():
  with pytest.raises(ValueError, match="10 human answers"):
    vqa.textvqa_accuracy("a", ["a"] * 9)


@pytest.mark.parametrize(
    "prompt, question",
    [
        ("What is written?\nAnswer the question using a single word or phrase.", "what is written?"),
        (
            "Reference OCR token: Coca, Cola\nWhat brand?\nAnswer the question using a single word or phrase.",
            "what brand?",
        ),
        ("What brand?\nReference OCR token: Coca\nAnswer briefly.", "what brand?"),
        ("OCR tokens: a b Question: Which Team? Short answer:", "which team?"),
    ],
)
def test_textvqa_question_from_prompt(prompt, question):
  assert vqa.textvqa_question_from_prompt(prompt) == question


def test_textvqa_question_from_unknown_prompt_layout_raises():
  with pytest.raises(ValueError, match="cannot find the question"):
    vqa.textvqa_question_from_prompt("one line only")


def test_gqa_exact_match_after_llava_processing():
  assert vqa.gqa_answer(" Yes.\n") == "yes"
  out = vqa.gqa_metrics(["Yes.", "Left", "yes sir", "the table"], ["yes", "left", "yes", "table"])
  # "yes sir" != "yes"; GQA does not drop articles, so "the table" != "table".
  assert out == {"accuracy": 0.5}


def test_synthetic_exact_match_is_normalised():
  out = vqa.exact_match_metrics(["The red square.", "two", "blue"], ["red square", "2", "red"])
  assert out["accuracy"] == pytest.approx(2 / 3)


def test_empty_input_raises():
  with pytest.raises(ValueError, match="no answered questions"):
    vqa.gqa_metrics([], [])
