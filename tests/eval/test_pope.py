"""POPE parsing and metrics on a hand-built confusion matrix."""

import pytest

from llava_jax.eval import pope


@pytest.mark.parametrize(
    "text, parsed",
    [
        ("Yes", "yes"),
        ("Yes, there is a dog in the image.", "yes"),
        ("No", "no"),
        ("No.", "no"),
        ("No, there is no dog.", "no"),
        ("There is not a dog in the image", "no"),
        ("Yes. But there is no cat.", "yes"),  # only the first sentence counts
        ("NO", "yes"),  # only "No", "no" and "not" are negative words
        ("Nope", "yes"),
        ("", "yes"),
        ("I cannot tell", "yes"),  # "cannot" is not the word "not"
    ],
)
def test_pope_answer(text, parsed):
  assert pope.pope_answer(text) == parsed


def confusion(tp, fp, tn, fn):
  preds = ["Yes"] * tp + ["Yes"] * fp + ["No"] * tn + ["No"] * fn
  labels = ["yes"] * tp + ["no"] * fp + ["no"] * tn + ["yes"] * fn
  return preds, labels


def test_pope_metrics_on_hand_computed_confusion_matrix():
  # TP=3 FP=1 TN=4 FN=2, N=10:
  #   accuracy  = (3+4)/10 = 0.7      precision = 3/(3+1) = 0.75
  #   recall    = 3/(3+2)  = 0.6      F1 = 2*0.75*0.6/(0.75+0.6) = 0.9/1.35 = 2/3
  #   yes_ratio = (3+1)/10 = 0.4
  out = pope.pope_metrics(*confusion(3, 1, 4, 2))
  assert (out["tp"], out["fp"], out["tn"], out["fn"]) == (3, 1, 4, 2)
  assert out["accuracy"] == pytest.approx(0.7)
  assert out["precision"] == pytest.approx(0.75)
  assert out["recall"] == pytest.approx(0.6)
  assert out["f1"] == pytest.approx(2 / 3)
  assert out["yes_ratio"] == pytest.approx(0.4)


def test_pope_no_yes_predictions_gives_zero_not_an_exception():
  out = pope.pope_metrics(["No", "No"], ["yes", "no"])
  assert out["precision"] == 0.0 and out["recall"] == 0.0 and out["f1"] == 0.0
  assert out["accuracy"] == 0.5 and out["yes_ratio"] == 0.0


def test_pope_metrics_by_split_and_mean():
  p1, l1 = confusion(3, 1, 4, 2)  # accuracy 0.7, F1 2/3
  p2, l2 = confusion(2, 0, 2, 0)  # accuracy 1.0, F1 1.0
  out = pope.pope_metrics_by_split(p1 + p2, l1 + l2, ["adversarial"] * 10 + ["random"] * 4)
  assert out["adversarial/accuracy"] == pytest.approx(0.7)
  assert out["random/accuracy"] == 1.0
  assert out["random/yes_ratio"] == 0.5
  assert out["accuracy"] == pytest.approx((0.7 + 1.0) / 2)  # mean over splits, not pooled
  assert out["f1"] == pytest.approx((2 / 3 + 1.0) / 2)
  assert "popular/accuracy" not in out


def test_pope_length_mismatch_raises():
  with pytest.raises(ValueError, match="2 predictions for 1 labels"):
    pope.pope_metrics(["Yes", "No"], ["yes"])
