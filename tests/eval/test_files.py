"""Question / annotation readers, resumable answers files, TASKS and score()."""
import json

import pytest

from llava_jax.eval import files


def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# --------------------------------------------------------------------------- answers

def test_writer_appends_llava_rows_and_flushes_each_line(tmp_path):
  path = tmp_path / "sub" / "answers.jsonl"
  with files.AnswerWriter(path, model_id="tiny") as writer:
    writer.write(7, "Q?\nAnswer…", "yes")
    # Visible on disk before close: a kill now would keep this line.
    assert json.loads(path.read_text())["text"] == "yes"
    writer.write("q8", "P", "B", metadata={"step": 3}, round_id=1)
  rows = files.read_answers(path)
  assert [r["question_id"] for r in rows] == [7, "q8"]
  assert set(rows[0]) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
  assert rows[0]["model_id"] == "tiny" and rows[1]["metadata"] == {"step": 3}
  assert rows[0]["answer_id"] != rows[1]["answer_id"]
  assert files.answered_ids(path) == {7, "q8"}
  assert files.answered_ids(path, with_round=True) == {(7, 0), ("q8", 1)}


def test_answered_ids_of_missing_file_is_empty(tmp_path):
  assert files.answered_ids(tmp_path / "nope.jsonl") == set()


def test_resume_after_kill_mid_line(tmp_path):
  path = tmp_path / "answers.jsonl"
  with files.AnswerWriter(path, model_id="m") as writer:
    for qid in range(3):
      writer.write(qid, "p", f"a{qid}")
  with open(path, "a") as f:  # what a kill in the middle of writing question 3 leaves
    f.write('{"question_id": 3, "prompt": "p", "te')

  with pytest.warns(RuntimeWarning, match="truncated last line"):
    assert files.answered_ids(path) == {0, 1, 2}

  with pytest.warns(RuntimeWarning, match="dropping truncated last line"):
    writer = files.AnswerWriter(path, model_id="m")
  writer.write(3, "p", "a3")
  writer.close()
  lines = path.read_text().splitlines()
  assert [json.loads(line)["question_id"] for line in lines] == [0, 1, 2, 3]


def test_complete_last_record_without_newline_is_kept(tmp_path):
  path = tmp_path / "answers.jsonl"
  path.write_text(json.dumps({"question_id": 0, "text": "a"}) + "\n"
                  + json.dumps({"question_id": 1, "text": "b"}))
  assert files.answered_ids(path) == {0, 1}
  with files.AnswerWriter(path, model_id="m") as writer:
    writer.write(2, "p", "c")
  assert [json.loads(line)["question_id"] for line in path.read_text().splitlines()] == [0, 1, 2]


def test_corrupt_line_in_the_middle_raises(tmp_path):
  path = tmp_path / "answers.jsonl"
  path.write_text('{"question_id": 0}\n{"question_id": \n{"question_id": 2}\n')
  with pytest.raises(ValueError, match=r"answers.jsonl:2: not valid JSON"):
    files.answered_ids(path)


# ------------------------------------------------------------------------- questions

def test_read_llava_jsonl_questions_and_prompt_suffix(tmp_path):
  path = tmp_path / "q.jsonl"
  write_jsonl(path, [
      {"question_id": 1, "image": "a.jpg", "text": f"Is it red?\n{files.SHORT_ANSWER}",
       "category": "default"},
      {"question_id": 2, "image": "b.jpg", "text": "What color?"}])
  q1, q2 = files.read_questions(path)
  assert files.prompt_text(q1, "vqav2") == q1["text"]  # suffix already there: not doubled
  assert files.prompt_text(q2, "gqa") == f"What color?\n{files.SHORT_ANSWER}"
  assert files.prompt_text(q2, "scienceqa").endswith(
      "\nAnswer with the option's letter from the given choices directly.")


def test_read_question_without_text_raises(tmp_path):
  path = tmp_path / "q.jsonl"
  write_jsonl(path, [{"question_id": 1, "image": "a.jpg"}])
  with pytest.raises(ValueError, match="question 0 has no 'question_id' or 'text'"):
    files.read_questions(path)


def test_read_official_vqav2_and_gqa_and_scienceqa_json(tmp_path):
  vqav2 = tmp_path / "v2_questions.json"
  vqav2.write_text(json.dumps({"data_subtype": "val2014", "questions": [
      {"image_id": 42, "question": "How many?", "question_id": 42000}]}))
  [q] = files.read_questions(vqav2)
  assert q["question_id"] == 42000 and q["text"] == "How many?"
  assert q["image"] == "COCO_val2014_000000000042.jpg"

  gqa = tmp_path / "testdev_balanced_questions.json"
  gqa.write_text(json.dumps({"201": {"imageId": "n1", "question": "Is it?", "answer": "no"}}))
  [q] = files.read_questions(gqa)
  assert (q["question_id"], q["image"], q["text"]) == ("201", "n1.jpg", "Is it?")

  sqa = tmp_path / "llava_test_CQM-A.json"
  sqa.write_text(json.dumps([{"id": "5", "image": "5/image.png", "conversations": [
      {"from": "human", "value": "<image>\nWhich is hot?\nA. sun\nB. ice"},
      {"from": "gpt", "value": "A"}]}]))
  [q] = files.read_questions(sqa)
  assert (q["question_id"], q["text"]) == ("5", "Which is hot?\nA. sun\nB. ice")


def test_read_mmbench_tsv(tmp_path):
  path = tmp_path / "mmbench_dev.tsv"
  path.write_text("index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage\n"
                  "12\tWhat is it?\tLook.\tcat\tdog\t\t\tB\tanimals\tQUJD\n")
  [q] = files.read_questions(path)
  assert q["question_id"] == 12
  assert q["text"] == "Look.\nWhat is it?\nA. cat\nB. dog"  # empty C/D end the options
  assert q["options"] == ["cat", "dog"] and q["image_base64"] == "QUJD"
  ann = files.read_annotations("mmbench", path)
  assert ann == {12: {"answer": "B", "options": ["cat", "dog"], "category": "animals"}}


# ---------------------------------------------------------------------- tasks, score

def test_tasks_table():
  assert set(files.TASKS) == {"vqav2", "gqa", "pope", "scienceqa", "mmbench", "textvqa",
                              "synthetic"}
  assert files.TASKS["pope"].suffix == files.SHORT_ANSWER
  assert files.TASKS["mmbench"].suffix == files.MC_ANSWER
  assert "label" in files.TASKS["pope"].ground_truth
  with pytest.raises(KeyError, match="unknown eval task 'vqa3'"):
    files.get_task("vqa3")


def answers(*pairs, **extra):
  return [{"question_id": q, "prompt": "p", "text": t, **extra} for q, t in pairs]


def test_score_vqav2_from_official_annotations(tmp_path):
  path = tmp_path / "v2_annotations.json"
  def ann(qid, said, m, answer_type):
    return {"question_id": qid, "answer_type": answer_type, "question_type": "what",
            "answers": [{"answer": a, "answer_id": i + 1, "answer_confidence": "yes"}
                        for i, a in enumerate([said] * m + ["zzz"] * (10 - m))]}
  path.write_text(json.dumps({"annotations": [ann(1, "2", 2, "number"), ann(2, "yes", 10, "yes/no"),
                                              ann(3, "red", 10, "other")]}))
  annotations = files.read_annotations("vqav2", path)
  # Question ids in the answers file as strings still match the int annotation ids.
  out = files.score("vqav2", answers(("1", "two"), (2, "Yes.")), annotations)
  assert out["vqav2/accuracy"] == pytest.approx((0.6 + 1.0) / 2)
  assert out["vqav2/accuracy/number"] == pytest.approx(0.6)
  assert out["vqav2/n"] == 2 and out["vqav2/missing"] == 1


def test_score_reads_an_answers_file_and_later_rows_win(tmp_path):
  path = tmp_path / "answers.jsonl"
  write_jsonl(path, answers(("a", "no"), ("a", "Yes."), ("b", "left")))
  out = files.score("gqa", path, {"a": {"answer": "yes"}, "b": {"answer": "right"}})
  assert out == {"gqa/accuracy": 0.5, "gqa/n": 2, "gqa/missing": 0}


def test_score_unknown_question_raises():
  with pytest.raises(KeyError, match=r"1 answers have no annotation, e.g. question ids \['9'\]"):
    files.score("gqa", answers((1, "yes"), (9, "no")), {1: {"answer": "yes"}})


def test_score_pope_with_label_directory(tmp_path):
  questions = [{"question_id": i, "image": f"{i}.jpg", "text": "Is there a dog?",
                "category": cat} for i, cat in enumerate(["random", "random", "adversarial"])]
  (tmp_path / "pope").mkdir()
  write_jsonl(tmp_path / "pope" / "coco_pope_random.json",
              [{"question_id": 1, "image": "0.jpg", "label": "yes"},
               {"question_id": 2, "image": "1.jpg", "label": "no"}])
  write_jsonl(tmp_path / "pope" / "coco_pope_adversarial.json",
              [{"question_id": 1, "image": "2.jpg", "label": "no"}])
  annotations = files.read_annotations("pope", tmp_path / "pope", questions=questions)
  assert annotations[1] == {"label": "no", "category": "random"}
  out = files.score("pope", answers((0, "Yes"), (1, "Yes"), (2, "No")), annotations)
  assert out["pope/random/accuracy"] == 0.5 and out["pope/random/precision"] == 0.5
  assert out["pope/adversarial/accuracy"] == 1.0
  assert out["pope/accuracy"] == 0.75


def test_pope_labels_out_of_order_raise(tmp_path):
  questions = [{"question_id": 0, "image": "0.jpg", "text": "?", "category": "random"}]
  (tmp_path / "pope").mkdir()
  write_jsonl(tmp_path / "pope" / "coco_pope_random.json",
              [{"question_id": 1, "image": "9.jpg", "label": "yes"}])
  with pytest.raises(ValueError, match="files out of order"):
    files.read_annotations("pope", tmp_path / "pope", questions=questions)


def test_score_textvqa_by_llava_image_id_and_prompt(tmp_path):
  path = tmp_path / "TextVQA_0.5.1_val.json"
  path.write_text(json.dumps({"data": [
      {"question_id": 34602, "image_id": "003a8ae2ef43b901", "question": "What Brand?",
       "answers": ["nokia"] * 3 + ["samsung"] * 7}]}))
  annotations = files.read_annotations("textvqa", path)
  # LLaVA's llava_textvqa_val_v051_ocr.jsonl puts the image id in "question_id".
  rows = [{"question_id": "003a8ae2ef43b901", "text": "Nokia",
           "prompt": f"What brand?\nReference OCR token: NOKIA\n{files.SHORT_ANSWER}"}]
  out = files.score("textvqa", rows, annotations)
  assert out["textvqa/accuracy"] == pytest.approx(0.9)
  assert out["textvqa/missing"] == 0
  assert files.score("textvqa", answers((34602, "samsung")), annotations)[
      "textvqa/accuracy"] == 1.0


def test_score_scienceqa_split_and_image_accuracy(tmp_path):
  (tmp_path / "problems.json").write_text(json.dumps({
      "1": {"answer": 0, "choices": ["x", "y"], "image": "image.png"},
      "2": {"answer": 1, "choices": ["x", "y", "z"], "image": None},
      "3": {"answer": 1, "choices": ["x", "y"], "image": None}}))
  (tmp_path / "pid_splits.json").write_text(json.dumps({"test": ["1", "2"], "val": ["3"]}))
  annotations = files.read_annotations("scienceqa", tmp_path / "problems.json", split="test")
  assert set(annotations) == {"1", "2"}
  out = files.score("scienceqa", answers(("1", "A"), ("2", "C")), annotations)
  assert out == {"scienceqa/accuracy": 0.5, "scienceqa/img_accuracy": 1.0,
                 "scienceqa/n": 2, "scienceqa/missing": 0}


def test_score_mmbench_uses_rotated_options_from_answers():
  annotations = {5: {"answer": "A", "options": ["teddy bear", "rabbit", "cat", "dog"]}}
  rows = [{"question_id": 5, "round_id": 0, "text": "A",
           "options": ["teddy bear", "rabbit", "cat", "dog"], "option_char": list("ABCD")},
          {"question_id": 5, "round_id": 1, "text": "teddy bear",
           "options": ["rabbit", "cat", "dog", "teddy bear"], "option_char": list("BCDA")}]
  out = files.score("mmbench", rows, annotations)
  assert out["mmbench/accuracy"] == 1.0 and out["mmbench/circular_accuracy"] == 1.0
  assert out["mmbench/n"] == 2


def test_score_synthetic_from_jsonl_annotations(tmp_path):
  path = tmp_path / "synthetic_answers.jsonl"
  write_jsonl(path, [{"question_id": 0, "answer": "red square"}, {"question_id": 1, "answer": "3"}])
  annotations = files.read_annotations("synthetic", path)
  out = files.score("synthetic", answers((0, "The red square."), (1, "two")), annotations)
  assert out["synthetic/accuracy"] == 0.5


def test_truncated_multibyte_character_in_last_line_is_tolerated(tmp_path):
  path = tmp_path / "answers.jsonl"
  cut = '{"question_id": 1, "text": "caf\u00e9'.encode("utf-8")[:-1]  # half of "é"
  path.write_bytes(b'{"question_id": 0, "text": "a"}\n' + cut)
  with pytest.warns(RuntimeWarning, match="truncated last line"):
    assert files.answered_ids(path) == {0}
