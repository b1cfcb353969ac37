"""The evaluator on a tiny random HF LLaVA: deterministic answers, resume, bad images, eval.json."""

import json
import shutil

import pytest

import tiny_checkpoint
from llava_jax.eval.answers import read_answers
from llava_jax.eval.run import answers_path, run_eval
from llava_jax.infer.loading import load_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  paths = tiny_checkpoint.write_tiny_llava(str(tmp_path_factory.mktemp("tiny_llava")))
  return load_model(paths["model"]), paths


def _run(model, paths, out, **kw):
  kw = {"questions": paths["questions"], "annotations": paths["annotations"], **kw}
  return run_eval(model, out, task="synthetic", batch_size=2, max_new_tokens=6, progress=False, **kw)


def _texts(out):
  return {r["question_id"]: r["text"] for r in read_answers(answers_path(out, "synthetic"))}


def test_two_runs_give_identical_answers_and_eval_json(tiny, tmp_path):
  model, paths = tiny
  a = _run(model, paths, tmp_path / "a")
  _run(model, paths, tmp_path / "b")
  assert _texts(tmp_path / "a") == _texts(tmp_path / "b")
  assert set(_texts(tmp_path / "a")) == {"q0", "q1", "q2"}
  assert any(_texts(tmp_path / "a").values())  # the random model does say something
  written = json.loads((tmp_path / "a" / "eval.json").read_text())
  assert written == a
  assert written["synthetic/n"] == 3 and written["synthetic/missing"] == 0
  assert written["synthetic/errors"] == 0 and "synthetic/accuracy" in written
  assert written["step"] is None


def test_resume_skips_answered_ids(tiny, tmp_path):
  model, paths = tiny
  partial = _run(model, paths, tmp_path, limit=2)
  assert partial["synthetic/n"] == 2 and partial["synthetic/missing"] == 0
  first = read_answers(answers_path(tmp_path, "synthetic"))
  full = _run(model, paths, tmp_path)
  rows = read_answers(answers_path(tmp_path, "synthetic"))
  assert [r["question_id"] for r in rows] == ["q0", "q1", "q2"]  # q0, q1 not asked again
  assert [r["answer_id"] for r in rows[:2]] == [r["answer_id"] for r in first]
  assert full["synthetic/n"] == 3


def test_bad_or_missing_image_gives_an_error_answer(tiny, tmp_path):
  model, paths = tiny
  data = tmp_path / "data"
  shutil.copytree(paths["images"], data / "images")
  (data / "images" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
  rows = [json.loads(line) for line in open(paths["questions"])]
  rows[2]["image"] = "images/missing.png"
  (data / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  result = _run(model, paths, tmp_path / "out", questions=data / "questions.jsonl")
  answers = {r["question_id"]: r for r in read_answers(answers_path(tmp_path / "out", "synthetic"))}
  assert set(answers) == {"q0", "q1", "q2"}
  assert "cannot decode image" in answers["q1"]["metadata"]["error"]
  assert "q2" in answers["q2"]["metadata"]["error"] and answers["q2"]["text"] == ""
  assert "error" not in answers["q0"]["metadata"]
  assert result["synthetic/errors"] == 2 and result["synthetic/n"] == 3


def test_questions_with_several_images(tiny, tmp_path):
  """A question may list several images (one <image> tag each, kept in order): it is
  answered as LoadedModel.answer answers it with those images; the file's other
  questions get the same answers as in a single-image file (the extra slots are empty),
  and tags that do not match the images give an error row."""
  from llava_jax.data.images import load_image
  from llava_jax.eval.tasks import prompt_text

  model, paths = tiny
  _run(model, paths, tmp_path / "single")
  single = _texts(tmp_path / "single")
  rows = [json.loads(line) for line in open(paths["questions"])]
  data = tmp_path / "data"
  shutil.copytree(paths["images"], data / "images")
  two = [rows[0]["image"], rows[1]["image"]]
  question = dict(rows[0], question_id="two", image=two, text="Compare <image> with <image>. Same?")
  bad = dict(rows[0], question_id="bad", image=two, text="Only <image> here?")
  (data / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [question] + rows[1:] + [bad]))
  out = tmp_path / "multi"
  _run(model, paths, out, questions=data / "questions.jsonl", annotations=None)
  answers = {r["question_id"]: r for r in read_answers(answers_path(out, "synthetic"))}
  want = model.answer(
      [{"from": "human", "value": prompt_text(question, "synthetic")}],
      [load_image(str(data / name)) for name in two],
      max_new_tokens=6,
  )
  assert answers["two"]["text"] == want and "error" not in answers["two"]["metadata"]
  assert answers["two"]["metadata"]["prompt"].count("<image>") == 2
  assert {q: answers[q]["text"] for q in ("q1", "q2")} == {q: single[q] for q in ("q1", "q2")}
  assert "1 <image> tags for 2 images" in answers["bad"]["metadata"]["error"]
