"""Answer normalisation against hand-checked outputs of the official VQA / EvalAI rules."""

import pytest

from llava_jax.eval import normalize


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("dont", "don't"),  # contraction table
        ("Dont know", "don't know"),  # lower-cased before the table lookup
        ("two", "2"),  # number words -> digits
        ("none", "0"),
        ("one dog", "1 dog"),
        ("the cat.", "cat"),  # trailing period and article removed
        ("a", ""),  # a lone article normalises to nothing
        ("An apple", "apple"),
        ("yes.", "yes"),
        ("Yes", "yes"),
        ("3.5", "3.5"),  # a period followed by a digit stays
        ("3.5.", "3.5"),
        ("5.", "5"),
        ("1,000", "1000"),  # digit,digit: every punctuation mark is deleted
        ("1,000 (approx)", "1000 approx"),
        ("hot-dog", "hot dog"),  # a mark not touching a space becomes a space
        ("red, white", "red white"),  # a mark touching a space is deleted
        ("  left\tside\n", "left side"),
        ("it's", "it's"),  # apostrophes are not punctuation here
        ("Is it?", "is it"),
    ],
)
def test_official_vqa_normalisation(raw, expected):
  assert normalize.normalize_vqa_answer(raw) == expected


def test_punctuation_decision_looks_at_the_whole_input():
  # One ", " anywhere makes every comma vanish, even the one between letters.
  assert normalize.process_punctuation("a,b, c") == "ab c"
  assert normalize.process_punctuation("a,b") == "a b"


def test_period_strip_removes_at_most_32_periods():
  # The reference passes re.UNICODE (32) where Pattern.sub expects `count`.
  assert normalize.process_punctuation("." * 40) == "." * 8


def test_contraction_keys_with_capitals_never_match():
  # "Im" is in the table but words are lower-cased first, so "im" stays "im".
  assert normalize.process_digit_article("Im here") == "im here"


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("The poster shows a 10% discount.", "poster shows 10% discount"),  # m4c_evaluator __main__
        ("It's red?", "it 's red"),  # word_tokenize splits 's; the official rules do not
        ("1,000", "1000"),
        ("Two", "2"),
        ("coca-cola", "coca cola"),
        ("What?", "what"),
    ],
)
def test_evalai_answer_processor(raw, expected):
  assert normalize.evalai_answer(raw) == expected


def test_evalai_and_official_differ_on_possessive():
  assert normalize.normalize_vqa_answer("It's red?") == "it's red"
  assert normalize.evalai_answer("It's red?") != normalize.normalize_vqa_answer("It's red?")
