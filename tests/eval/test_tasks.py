"""TASKS (prompt suffixes) and score() against each benchmark's annotations."""

import json

import pytest

from llava_jax.eval.questions import read_annotations
from llava_jax.eval.tasks import MC_ANSWER, SHORT_ANSWER, TASKS, get_task, score


def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_tasks_table():
  assert set(TASKS) == {"vqav2", "gqa", "pope", "scienceqa", "mmbench", "textvqa", "synthetic"}
  assert TASKS["pope"].suffix == SHORT_ANSWER
  assert TASKS["mmbench"].suffix == MC_ANSWER
  assert "label" in TASKS["pope"].ground_truth
  with pytest.raises(KeyError, match="unknown eval task 'vqa3'"):
    get_task("vqa3")


def answers(*pairs, **extra):
  return [{"question_id": q, "prompt": "p", "text": t, **extra} for q, t in pairs]


def test_score_vqav2_from_official_annotations(tmp_path):
  path = tmp_path / "v2_annotations.json"

  def ann(qid, said, m, answer_type):
    return {
        "question_id": qid,
        "answer_type": answer_type,
        "question_type": "what",
        "answers": [
            {"answer": a, "answer_id": i + 1, "answer_confidence": "yes"}
            for i, a in enumerate([said] * m + ["zzz"] * (10 - m))
        ],
    }

  path.write_text(
      json.dumps({"annotations": [ann(1, "2", 2, "number"), ann(2, "yes", 10, "yes/no"), ann(3, "red", 10, "other")]})
  )
  annotations = read_annotations("vqav2", path)
  # Question ids in the answers file as strings still match the int annotation ids.
  out = score("vqav2", answers(("1", "two"), (2, "Yes.")), annotations)
  assert out["vqav2/accuracy"] == pytest.approx((0.6 + 1.0) / 2)
  assert out["vqav2/accuracy/number"] == pytest.approx(0.6)
  assert out["vqav2/n"] == 2 and out["vqav2/missing"] == 1


def test_score_reads_an_answers_file_and_later_rows_win(tmp_path):
  path = tmp_path / "answers.jsonl"
  write_jsonl(path, answers(("a", "no"), ("a", "Yes."), ("b", "left")))
  out = score("gqa", path, {"a": {"answer": "yes"}, "b": {"answer": "right"}})
  assert out == {"gqa/accuracy": 0.5, "gqa/n": 2, "gqa/missing": 0}


def test_score_unknown_question_raises():
  with pytest.raises(KeyError, match=r"1 answers have no annotation, e.g. question ids \['9'\]"):
    score("gqa", answers((1, "yes"), (9, "no")), {1: {"answer": "yes"}})


def test_score_pope_with_label_directory(tmp_path):
  questions = [
      {"question_id": i, "image": f"{i}.jpg", "text": "Is there a dog?", "category": cat}
      for i, cat in enumerate(["random", "random", "adversarial"])
  ]
  (tmp_path / "pope").mkdir()
  write_jsonl(
      tmp_path / "pope" / "coco_pope_random.json",
      [{"question_id": 1, "image": "0.jpg", "label": "yes"}, {"question_id": 2, "image": "1.jpg", "label": "no"}],
  )
  write_jsonl(tmp_path / "pope" / "coco_pope_adversarial.json", [{"question_id": 1, "image": "2.jpg", "label": "no"}])
  annotations = read_annotations("pope", tmp_path / "pope", questions=questions)
  assert annotations[1] == {"label": "no", "category": "random"}
  out = score("pope", answers((0, "Yes"), (1, "Yes"), (2, "No")), annotations)
  assert out["pope/random/accuracy"] == 0.5 and out["pope/random/precision"] == 0.5
  assert out["pope/adversarial/accuracy"] == 1.0
  assert out["pope/accuracy"] == 0.75


def test_score_textvqa_by_llava_image_id_and_prompt(tmp_path):
  path = tmp_path / "TextVQA_0.5.1_val.json"
  path.write_text(
      json.dumps(
          {
              "data": [
                  {
                      "question_id": 34602,
                      "image_id": "003a8ae2ef43b901",
                      "question": "What Brand?",
                      "answers": ["nokia"] * 3 + ["samsung"] * 7,
                  }
              ]
          }
      )
  )
  annotations = read_annotations("textvqa", path)
  # LLaVA's llava_textvqa_val_v051_ocr.jsonl puts the image id in "question_id".
  rows = [
      {
          "question_id": "003a8ae2ef43b901",
          "text": "Nokia",
          "prompt": f"What brand?\nReference OCR token: NOKIA\n{SHORT_ANSWER}",
      }
  ]
  out = score("textvqa", rows, annotations)
  assert out["textvqa/accuracy"] == pytest.approx(0.9)
  assert out["textvqa/missing"] == 0
  assert score("textvqa", answers((34602, "samsung")), annotations)["textvqa/accuracy"] == 1.0


def test_score_scienceqa_split_and_image_accuracy(tmp_path):
  (tmp_path / "problems.json").write_text(
      json.dumps(
          {
              "1": {"answer": 0, "choices": ["x", "y"], "image": "image.png"},
              "2": {"answer": 1, "choices": ["x", "y", "z"], "image": None},
              "3": {"answer": 1, "choices": ["x", "y"], "image": None},
          }
      )
  )
  (tmp_path / "pid_splits.json").write_text(json.dumps({"test": ["1", "2"], "val": ["3"]}))
  annotations = read_annotations("scienceqa", tmp_path / "problems.json", split="test")
  assert set(annotations) == {"1", "2"}
  out = score("scienceqa", answers(("1", "A"), ("2", "C")), annotations)
  assert out == {"scienceqa/accuracy": 0.5, "scienceqa/img_accuracy": 1.0, "scienceqa/n": 2, "scienceqa/missing": 0}


def test_score_mmbench_uses_rotated_options_from_answers():
  annotations = {5: {"answer": "A", "options": ["teddy bear", "rabbit", "cat", "dog"]}}
  rows = [
      {
          "question_id": 5,
          "round_id": 0,
          "text": "A",
          "options": ["teddy bear", "rabbit", "cat", "dog"],
          "option_char": list("ABCD"),
      },
      {
          "question_id": 5,
          "round_id": 1,
          "text": "teddy bear",
          "options": ["rabbit", "cat", "dog", "teddy bear"],
          "option_char": list("BCDA"),
      },
  ]
  out = score("mmbench", rows, annotations)
  assert out["mmbench/accuracy"] == 1.0 and out["mmbench/circular_accuracy"] == 1.0
  assert out["mmbench/n"] == 2


def test_score_synthetic_from_jsonl_annotations(tmp_path):
  path = tmp_path / "synthetic_answers.jsonl"
  write_jsonl(path, [{"question_id": 0, "answer": "red square"}, {"question_id": 1, "answer": "3"}])
  annotations = read_annotations("synthetic", path)
  out = score("synthetic", answers((0, "The red square."), (1, "two")), annotations)
  assert out["synthetic/accuracy"] == 0.5
