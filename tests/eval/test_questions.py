"""Question and annotation readers: LLaVA JSONL, official VQAv2 / GQA / ScienceQA JSON, MMBench TSV, POPE labels."""

import json

import pytest

from llava_jax.eval.questions import read_annotations, read_questions
from llava_jax.eval.tasks import SHORT_ANSWER, prompt_text


def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_read_llava_jsonl_questions_and_prompt_suffix(tmp_path):
  path = tmp_path / "q.jsonl"
  write_jsonl(
      path,
      [
          {"question_id": 1, "image": "a.jpg", "text": f"Is it red?\n{SHORT_ANSWER}", "category": "default"},
          {"question_id": 2, "image": "b.jpg", "text": "What color?"},
      ],
  )
  q1, q2 = read_questions(path)
  assert prompt_text(q1, "vqav2") == q1["text"]  # suffix already there: not doubled
  assert prompt_text(q2, "gqa") == f"What color?\n{SHORT_ANSWER}"
  assert prompt_text(q2, "scienceqa").endswith("\nAnswer with the option's letter from the given choices directly.")


def test_read_question_without_text_raises(tmp_path):
  path = tmp_path / "q.jsonl"
  write_jsonl(path, [{"question_id": 1, "image": "a.jpg"}])
  with pytest.raises(ValueError, match="question 0 has no 'question_id' or 'text'"):
    read_questions(path)


def test_read_official_vqav2_and_gqa_and_scienceqa_json(tmp_path):
  vqav2 = tmp_path / "v2_questions.json"
  vqav2.write_text(
      json.dumps(
          {"data_subtype": "val2014", "questions": [{"image_id": 42, "question": "How many?", "question_id": 42000}]}
      )
  )
  [q] = read_questions(vqav2)
  assert q["question_id"] == 42000 and q["text"] == "How many?"
  assert q["image"] == "COCO_val2014_000000000042.jpg"

  gqa = tmp_path / "testdev_balanced_questions.json"
  gqa.write_text(json.dumps({"201": {"imageId": "n1", "question": "Is it?", "answer": "no"}}))
  [q] = read_questions(gqa)
  assert (q["question_id"], q["image"], q["text"]) == ("201", "n1.jpg", "Is it?")

  sqa = tmp_path / "llava_test_CQM-A.json"
  sqa.write_text(
      json.dumps(
          [
              {
                  "id": "5",
                  "image": "5/image.png",
                  "conversations": [
                      {"from": "human", "value": "<image>\nWhich is hot?\nA. sun\nB. ice"},
                      {"from": "gpt", "value": "A"},
                  ],
              }
          ]
      )
  )
  [q] = read_questions(sqa)
  assert (q["question_id"], q["text"]) == ("5", "Which is hot?\nA. sun\nB. ice")


def test_read_mmbench_tsv(tmp_path):
  path = tmp_path / "mmbench_dev.tsv"
  path.write_text(
      "index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage\n"
      "12\tWhat is it?\tLook.\tcat\tdog\t\t\tB\tanimals\tQUJD\n"
  )
  [q] = read_questions(path)
  assert q["question_id"] == 12
  assert q["text"] == "Look.\nWhat is it?\nA. cat\nB. dog"  # empty C/D end the options
  assert q["options"] == ["cat", "dog"] and q["image_base64"] == "QUJD"
  ann = read_annotations("mmbench", path)
  assert ann == {12: {"answer": "B", "options": ["cat", "dog"], "category": "animals"}}


def test_pope_labels_out_of_order_raise(tmp_path):
  questions = [{"question_id": 0, "image": "0.jpg", "text": "?", "category": "random"}]
  (tmp_path / "pope").mkdir()
  write_jsonl(tmp_path / "pope" / "coco_pope_random.json", [{"question_id": 1, "image": "9.jpg", "label": "yes"}])
  with pytest.raises(ValueError, match="files out of order"):
    read_annotations("pope", tmp_path / "pope", questions=questions)
