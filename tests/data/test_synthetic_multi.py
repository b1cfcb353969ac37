"""The multi-image and video tasks of the embedded dataset: answers need every image, the
held-out split, determinism, the tokenizer untouched, and examples the pipeline takes."""

import json
import os

import numpy as np
import pytest

from llava_jax.data import pipeline as P
from llava_jax.data import synthetic as sy
from llava_jax.data import synthetic_multi as sm
from llava_jax.data.images import image_config_for, preprocess
from llava_jax.data.sources import LlavaJsonSource
from llava_jax.data.video import sample_frames
from llava_jax.tokenizer import load_tokenizer


def _rows(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
  d = tmp_path_factory.mktemp("shapes_multi")
  paths = sy.write_synthetic(
      d, seed=1, n_train=100, n_val=20, image_size=28, array_record=False, multi=dict(n_train=120, n_val=40, replay=30)
  )
  return d, paths


def test_pair_answers_need_both_images():
  rng = np.random.default_rng(0)
  for _ in range(300):
    a, b = sy.sample_scene(rng), sy.sample_scene(rng)
    for (q, answer, category), (q2, swapped, _) in zip(sm.pair_questions(a, b), sm.pair_questions(b, a)):
      assert q == q2
      if category in ("compare", "presence"):  # swapping the images swaps the answer
        assert {answer, swapped} == {"first", "second"}
      else:
        assert answer == swapped and answer == ("yes" if category == "both" and _both(a, b, q) else "no")


def _both(a, b, question):
  kind = question.split()[3]
  return kind in {s.kind for s in a} and kind in {s.kind for s in b}


def test_no_single_frame_tells_the_direction():
  rng = np.random.default_rng(0)
  seen: dict[tuple[int, str], set] = {}
  for _ in range(2000):
    shape, direction, positions = sm.sample_video(rng)
    assert len(positions) == sm.FRAMES and (positions[0] != positions[-1]) == (direction != "none")
    for k, p in enumerate(positions):
      seen.setdefault((k, p), set()).add(direction)
  # Every (frame index, position) that occurs fits at least two answers.
  assert len(seen) == 3 * 5 and all(len(d) >= 2 for d in seen.values()), seen


def test_files_split_and_determinism(ds, tmp_path):
  d, paths = ds
  train, val = _rows(paths["stage3"]), _rows(paths["stage3_val"])
  questions, answers = _rows(paths["eval_multi_questions"]), _rows(paths["eval_multi_annotations"])
  kinds = lambda rows: {r["id"].split("-")[1] for r in rows}
  assert kinds(train) == {"pair", "video", "train"} and kinds(val) == {"pair", "video"}  # "train": replayed stage 2
  assert len(train) == 120 + 120 + 30 and len(val) == 80 and len(questions) == len(answers) == 80
  assert {q["category"] for q in questions} == {"compare", "presence", "both", "motion"}
  assert {a["answer"] for a in answers if a["question_id"].split("-")[1] == "video"} == set(sm.DIRECTIONS)
  for q in questions:
    if "video" in q:  # a real video file of FRAMES frames
      assert q["text"].count("<video>") == 1 and sy.IMAGE_TAG not in q["text"]
      assert len(sample_frames(str(d / "images" / q["video"]), num_frames=sm.FRAMES).frames) == sm.FRAMES
    else:
      assert q["text"].count(sy.IMAGE_TAG) == len(q["image"]) and all(
          os.path.exists(d / "images" / i) for i in q["image"]
      )
  # Held out: no training video moves a held-out (colour, shape) in its held-out direction.
  for r in train:
    if r["id"].split("-")[1] == "video":
      turns = r["conversations"]
      k = next(k for k, t in enumerate(turns) if "Which way does the " in t["value"])
      kind = turns[k]["value"].split("Which way does the ")[1].split()[0]
      assert not sm.video_heldout(sy.Shape(kind, _video_color(d, r), "center"), turns[k + 1]["value"])
      assert len(turns) == 6 and {t["value"] for t in turns[1::2]} <= set(sm.DIRECTIONS) | set(sy.POSITIONS)
  # Deterministic, and written into an existing directory without touching its tokenizer.
  again = tmp_path / "again"
  sy.write_synthetic(again, seed=1, n_train=100, n_val=20, image_size=28, array_record=False)
  tokenizer = (again / "tokenizer.model").read_bytes()
  sy.write_multi_tasks(str(again), seed=1, image_size=28, multi=dict(n_train=120, n_val=40, replay=30))
  assert (again / "tokenizer.model").read_bytes() == tokenizer == open(paths["tokenizer"], "rb").read()
  for key in ("stage3", "stage3_val", "eval_multi_questions", "eval_multi_annotations"):
    assert (again / os.path.basename(paths[key])).read_bytes() == open(paths[key], "rb").read(), key


def _video_color(d, record):
  pixels = sample_frames(str(d / "images" / record["video"]), num_frames=1).frames[0]
  colors = {tuple(p) for p in pixels.reshape(-1, 3)} - {sy.BACKGROUND}
  return next(name for name, rgb in sy.COLORS.items() if rgb in colors)


def test_the_pipeline_takes_every_sample_with_images_in_place(ds):
  d, paths = ds
  tok = load_tokenizer(paths["tokenizer"])
  image_token_id = tok.token_to_id(sy.IMAGE_TOKEN)
  example = P.ExampleSpec(
      tokenizer=tok,
      template="vicuna_v1@inline",
      image_config=image_config_for("clip", 28),
      image_token_id=image_token_id,
      num_image_tokens=4,
      max_len=160,
      max_images=3,
      video=P.VideoSpec(frames=sm.FRAMES),  # no video token: a video is its frames, as images
  )
  config = P.PipelineConfig(example, batch_size=10, seed=0, shuffle=False, num_epochs=1, drop_remainder=False)
  it = P.make_dataset(LlavaJsonSource(paths["stage3"], image_root=paths["images"]), config)
  batches = list(it)
  assert sum(it.counts().values()) == 0, it.counts()
  rows = sum(int((b["ids"] != "").sum()) for b in batches)
  assert rows == 270
  pair = next(
      (b, r) for b in batches for r in range(len(b["ids"])) if b["ids"][r].startswith("shapes-pair")
  )  # "Image one: <image>\nImage two: <image>": text, 4 image tokens, text, 4 image tokens
  b, r = pair
  ids = b["input_ids"][r]
  where = np.flatnonzero(ids == image_token_id)
  assert len(where) == 8 and where[3] + 1 < where[4] and b["image_mask"][r].tolist() == [True, True, False]
  assert "two" in tok.decode(ids[where[3] + 1 : where[4]].tolist()).lower()
  # A video: its three decoded frames in the three image slots, "Frames: <image> <image> <image>".
  b, r = next((b, r) for b in batches for r in range(len(b["ids"])) if b["ids"][r].startswith("shapes-video"))
  assert b["image_mask"][r].tolist() == [True, True, True] and (b["input_ids"][r] == image_token_id).sum() == 12
  rec = next(x for x in _rows(paths["stage3"]) if x["id"] == b["ids"][r])
  frames = sample_frames(str(d / "images" / rec["video"]), num_frames=sm.FRAMES).frames
  for k in range(3):
    np.testing.assert_array_equal(b["pixel_values"][r, k], preprocess(frames[k], example.image_config))
