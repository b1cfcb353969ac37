"""Resumable answers files: flushed lines, a kill mid-line, answered ids."""

import json

import pytest

from llava_jax.eval.answers import AnswerWriter, answered_ids, read_answers


def test_writer_appends_llava_rows_and_flushes_each_line(tmp_path):
  path = tmp_path / "sub" / "answers.jsonl"
  with AnswerWriter(path, model_id="tiny") as writer:
    writer.write(7, "Q?\nAnswer…", "yes")
    # Visible on disk before close: a kill now would keep this line.
    assert json.loads(path.read_text())["text"] == "yes"
    writer.write("q8", "P", "B", metadata={"step": 3}, round_id=1)
  rows = read_answers(path)
  assert [r["question_id"] for r in rows] == [7, "q8"]
  assert set(rows[0]) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
  assert rows[0]["model_id"] == "tiny" and rows[1]["metadata"] == {"step": 3}
  assert rows[0]["answer_id"] != rows[1]["answer_id"]
  assert answered_ids(path) == {7, "q8"}
  assert answered_ids(path, with_round=True) == {(7, 0), ("q8", 1)}


def test_answered_ids_of_missing_file_is_empty(tmp_path):
  assert answered_ids(tmp_path / "nope.jsonl") == set()


def test_resume_after_kill_mid_line(tmp_path):
  path = tmp_path / "answers.jsonl"
  with AnswerWriter(path, model_id="m") as writer:
    for qid in range(3):
      writer.write(qid, "p", f"a{qid}")
  with open(path, "a") as f:  # what a kill in the middle of writing question 3 leaves
    f.write('{"question_id": 3, "prompt": "p", "te')

  with pytest.warns(RuntimeWarning, match="truncated last line"):
    assert answered_ids(path) == {0, 1, 2}

  with pytest.warns(RuntimeWarning, match="dropping truncated last line"):
    writer = AnswerWriter(path, model_id="m")
  writer.write(3, "p", "a3")
  writer.close()
  lines = path.read_text().splitlines()
  assert [json.loads(line)["question_id"] for line in lines] == [0, 1, 2, 3]


def test_complete_last_record_without_newline_is_kept(tmp_path):
  path = tmp_path / "answers.jsonl"
  path.write_text(json.dumps({"question_id": 0, "text": "a"}) + "\n" + json.dumps({"question_id": 1, "text": "b"}))
  assert answered_ids(path) == {0, 1}
  with AnswerWriter(path, model_id="m") as writer:
    writer.write(2, "p", "c")
  assert [json.loads(line)["question_id"] for line in path.read_text().splitlines()] == [0, 1, 2]


def test_corrupt_line_in_the_middle_raises(tmp_path):
  path = tmp_path / "answers.jsonl"
  path.write_text('{"question_id": 0}\n{"question_id": \n{"question_id": 2}\n')
  with pytest.raises(ValueError, match=r"answers.jsonl:2: not valid JSON"):
    answered_ids(path)


def test_truncated_multibyte_character_in_last_line_is_tolerated(tmp_path):
  path = tmp_path / "answers.jsonl"
  cut = '{"question_id": 1, "text": "caf\u00e9'.encode("utf-8")[:-1]  # half of "é"
  path.write_bytes(b'{"question_id": 0, "text": "a"}\n' + cut)
  with pytest.warns(RuntimeWarning, match="truncated last line"):
    assert answered_ids(path) == {0}
