"""The embedded shapes dataset: determinism, held-out compositions, correct pictures and answers, tokenizer fit."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from llava_jax.data import synthetic as sy
from llava_jax.data.sources import ArrayRecordLlavaSource, LlavaJsonSource
from llava_jax.data.tokenize import Rejected, tokenize_conversation
from llava_jax.eval.questions import read_annotations, read_questions
from llava_jax.eval.tasks import SHORT_ANSWER, prompt_text, score
from llava_jax.tokenizer import load_tokenizer


def _rows(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _all_files(d):
  out = {}
  for root, _, names in os.walk(d):
    for n in names:
      p = os.path.join(root, n)
      with open(p, "rb") as f:
        out[os.path.relpath(p, d)] = f.read()
  return out


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
  d = tmp_path_factory.mktemp("shapes")
  return d, sy.write_synthetic(d, seed=3, n_train=300, n_val=30, image_size=28)


def test_same_seed_same_bytes_other_seed_differs(ds, tmp_path):
  d, _ = ds
  sy.write_synthetic(tmp_path / "again", seed=3, n_train=300, n_val=30, image_size=28)
  first, again = _all_files(d), _all_files(tmp_path / "again")
  assert sorted(first) == sorted(again)
  assert [k for k in first if first[k] != again[k]] == []
  sy.write_synthetic(tmp_path / "other", seed=4, n_train=300, n_val=30, image_size=28, array_record=False)
  other = _all_files(tmp_path / "other")
  assert other["stage2.jsonl"] != first["stage2.jsonl"]
  assert other["images/train_000000.png"] != first["images/train_000000.png"]


def test_files_and_layout(ds):
  d, paths = ds
  for key in ("stage1", "stage1_val", "stage2", "stage2_val", "eval_questions", "eval_annotations", "tokenizer"):
    assert os.path.isfile(paths[key]), key
  assert len(_rows(paths["stage1"])) == len(_rows(paths["stage2"])) == 300
  assert len(_rows(paths["stage2_val"])) == 30
  for stage in ("stage1", "stage2"):
    for split, n in (("train", 300), ("val", 30)):
      src = ArrayRecordLlavaSource(paths[f"array_record_{stage}"], split)
      assert len(src) == n
  # The JSONL and array_record copies hold the same samples and image bytes.
  js = LlavaJsonSource(paths["stage2"], image_root=paths["images"])
  ar = ArrayRecordLlavaSource(paths["array_record_stage2"], "train")
  for i in (0, 7, 299):
    a, b = js[i], ar[i]
    assert (a["id"], a["conversations"]) == (b["id"], b["conversations"])
    with open(a["images"][0], "rb") as f:
      assert f.read() == b["images"][0]


def test_stage_formats(ds):
  _, paths = ds
  cap = _rows(paths["stage1"])[0]
  assert cap["conversations"][0]["value"] == "<image>\n" + sy.STAGE1_PROMPT
  assert cap["conversations"][1]["value"].startswith("a ") and cap["conversations"][1]["value"].endswith(".")
  qa = _rows(paths["stage2"])[0]["conversations"]
  assert qa[0]["value"].startswith("<image>\n") and sum("<image>" in t["value"] for t in qa) == 1
  assert [t["from"] for t in qa] == ["human", "gpt"] * 3
  assert all(t["value"].endswith("\n" + SHORT_ANSWER) for t in qa[::2])
  assert all(t["value"] in sy.ANSWER_WORDS for t in qa[1::2])


def test_val_compositions_never_appear_in_training(ds):
  _, paths = ds
  caption = lambda r: r["conversations"][1]["value"]  # one caption per composition (shapes named in a fixed order)
  train = {caption(r) for r in _rows(paths["stage1"])}
  val = {caption(r) for r in _rows(paths["stage1_val"])}
  assert val and train.isdisjoint(val)
  rng = np.random.default_rng(0)
  scenes = sy.sample_scenes(rng, 200, heldout=True)
  assert all(sy.is_heldout(s) for s in scenes)
  assert not any(sy.is_heldout(s) for s in sy.sample_scenes(rng, 200, heldout=False))


@pytest.mark.parametrize("size", [28, 56])
def test_pictures_match_the_scene(size):
  rng = np.random.default_rng(size)
  cell = size / 3
  for scene in [sy.sample_scene(rng) for _ in range(30)]:
    img = sy.render_scene(scene, size)
    assert img.shape == (size, size, 3) and img.dtype == np.uint8
    drawn = {s.position: s.color for s in scene}
    for pos, (row, col) in sy._CELL.items():
      centre = img[int((row + 0.5) * cell), int((col + 0.5) * cell)]
      want = sy.COLORS[drawn[pos]] if pos in drawn else sy.BACKGROUND
      assert tuple(centre) == tuple(want), (scene, pos)
    assert tuple(img[0, 0]) == sy.BACKGROUND  # corners stay empty
    colours = {tuple(c) for c in img.reshape(-1, 3)}
    assert colours == {sy.BACKGROUND} | {sy.COLORS[s.color] for s in scene}


def test_shapes_are_distinguishable():
  masks = sy._masks(28)
  areas = {k: int(masks[k, "center"].sum()) for k in sy.SHAPES}
  assert len({masks[k, "center"].tobytes() for k in sy.SHAPES}) == 3
  assert areas["triangle"] < areas["circle"] and areas["square"] != areas["circle"]


def test_questions_have_exact_answers():
  scene = (sy.Shape("circle", "red", "left"), sy.Shape("square", "blue", "top"))
  assert sy.caption(scene) == "a red circle on the left and a blue square at the top."
  qa = {q: a for q, a, _ in sy.questions(scene)}
  assert qa == {
      "How many shapes are there?": "two",
      "What color is the circle?": "red",
      "What shape is red?": "circle",
      "Where is the circle?": "left",
      "What color is the square?": "blue",
      "What shape is blue?": "square",
      "Where is the square?": "top",
      "Is there a circle?": "yes",
      "Is there a square?": "yes",
      "Is there a triangle?": "no",
  }
  assert sy.caption(scene[:1]) == "a red circle on the left."
  # Named by kind (circle, square, triangle), not in the scene's position order.
  scene = (sy.Shape("triangle", "green", "left"), sy.Shape("square", "red", "top"), sy.Shape("circle", "blue", "right"))
  assert sy.caption(scene) == ("a blue circle on the right, a red square at the top and a green triangle on the left.")


def test_eval_files_score_with_the_synthetic_task(ds):
  d, paths = ds
  qs = read_questions(paths["eval_questions"])
  ann = read_annotations("synthetic", paths["eval_annotations"])
  assert len(qs) == 90 and {q["question_id"] for q in qs} == set(ann)
  for q in qs:
    assert os.path.isfile(os.path.join(paths["images"], q["image"])) and q["image"].startswith("val_")
    assert prompt_text(q, "synthetic") == q["text"]  # suffix already there, not appended twice
  perfect = [{"question_id": q["question_id"], "text": ann[q["question_id"]]["answer"]} for q in qs]
  assert score("synthetic", perfect, ann)["synthetic/accuracy"] == 1.0
  wrong = [dict(a, text="purple") for a in perfect]
  assert score("synthetic", wrong, ann)["synthetic/accuracy"] == 0.0


def test_tokenizer_answers_are_single_tokens_and_every_template_fits(ds):
  _, paths = ds
  tok = load_tokenizer(paths["tokenizer"])
  assert 256 <= tok.vocab_size <= 512
  image_id = tok.token_to_id(sy.IMAGE_TOKEN)
  assert image_id is not None and image_id > 3
  assert set(sy.ANSWER_WORDS) == set(sy.SHAPES) | set(sy.COLORS) | set(sy.POSITIONS) | {
      "yes",
      "no",
      "one",
      "two",
      "three",
  }
  for word in sy.ANSWER_WORDS:
    ids = tok.encode("ASSISTANT: " + word + "</s>")
    assert [tok.id_to_token(i) for i in ids[-2:]] == ["\u2581" + word, "</s>"], word
  stage1 = _rows(paths["stage1"])[:40]
  stage2 = _rows(paths["stage2"])[:40] + _rows(paths["stage2_val"])[:10]
  for template in ("plain", "llava_v1", "vicuna_v1", "chatml", "mistral_instruct", "gemma", "llama_2"):
    for rec in (stage1 if template == "plain" else stage2):
      out = tokenize_conversation(rec, tok, template, image_token_id=image_id, num_image_tokens=4, max_len=512)
      assert not isinstance(out, Rejected), (template, out)
      assert tok.unk_id not in out.input_ids.tolist(), (template, rec["id"])


def test_png_images_decode_to_the_rendered_pixels(ds):
  _, paths = ds
  rec = _rows(paths["stage1"])[5]
  with Image.open(os.path.join(paths["images"], rec["image"])) as im:
    assert im.mode == "RGB" and im.size == (28, 28)
