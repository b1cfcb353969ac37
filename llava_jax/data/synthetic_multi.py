"""Multi-image and "video" tasks of the embedded dataset: questions no single image answers.

    paths = write_multi("/tmp/shapes", seed=0, n_train=3000, n_val=100, image_size=42)

Two kinds of sample, drawn from the shapes scenes of `synthetic` (same colours, shapes,
grid and held-out rule), with every `<image>` where the text puts it (train them with a
template "NAME@inline", e.g. "vicuna_v1@inline"):

    pair    "Image one: <image>\\nImage two: <image>\\n" then, in random order, questions about
            both images: "Which image has more shapes, the first or the second?" -> "first"
            (the counts differ), "Which image shows the circle, the first or the second?"
            -> "second" (exactly one shows it), "Is there a square in both images?" -> "no".
    video   a three-frame video file of one shape moving along the middle row or column, or
            staying: "Frames: <video>\\nWhich way does the circle move?" -> "right"
            (or "left", "up", "down", "none"); training conversations also ask where the
            shape is in the first and in the last frame, in random order with it. Positions along the row are left, center,
            right (column: top, center, bottom); a moving shape goes from a start cell to
            another in one direction, the middle frame the middle cell or a repeat of an
            end (left, left, center); a still one stays in one of the five cells. No frame
            alone tells the answer, even knowing which frame it is (a first frame on the
            left starts "right" or "none"; a centre frame fits every answer): the task
            needs the first and the last frame compared.

Each video is a real file (`video_{split}_NNNNNN.mkv`, FFV1: lossless, so its decoded
frames are the rendered ones), read by the training pipeline and the evaluator as any
video is (`data.example`: PyAV, F = `data.video_frames` = 3 frames sampled). The tiny
model has no video token, so it sees a video as its frames: "Frames: <video>" becomes
"Frames: <image> <image> <image>" (LLaVA-Interleave's way); `configs/tiny_shapes.py`
with `video=1` gives it a video token instead (one video slot, the frames' features
unpooled). The pooled video path of LLaVA-OneVision models is proved against
transformers by the parity tests.

Held out: a pair is on the validation side iff both its scenes are (`synthetic.is_heldout`),
a video iff its (colour, shape, direction) is one of the held-out ones (`video_heldout`).

Files (`out_dir` is the `write_synthetic` directory; its tokenizer is not changed, so the
stage-1/2 runs the multi-image stage starts from keep their vocabulary):

    images/pair_{train,val}_NNNNNN_K.png          the K-th image of a pair
    images/video_{train,val}_NNNNNN.mkv           a video (FRAMES frames, FFV1)
    stage3.jsonl, stage3_val.jsonl                  pairs + videos (+ `replay` stage-2 conversations)
    eval_multi_questions.jsonl                      {"question_id", "image": [...] | "video", "text", "category"}
    eval_multi_annotations.jsonl                    category "compare", "presence", "both" or "motion"
"""

from __future__ import annotations

import json
import os

import numpy as np

from llava_jax.data import synthetic as sy
from llava_jax.data.video import write_video

FRAMES = 3  # per video
DIRECTIONS = ("left", "right", "up", "down", "none")  # the video answers
_LINES = {"row": ("left", "center", "right"), "column": ("top", "center", "bottom")}
_DIRECTION = {("row", 1): "right", ("row", -1): "left", ("column", 1): "down", ("column", -1): "up"}
PAIR_PROMPT = "Image one: <image>\nImage two: <image>\n"
VIDEO_PROMPT = "Frames: <video>\n"  # the video's FRAMES frames, for a model that takes them as images


def pair_questions(a: sy.Scene, b: sy.Scene) -> list[tuple[str, str, str]]:
  """Every (question, answer, category) the two scenes answer unambiguously."""
  out = []
  if len(a) != len(b):
    out.append(
        ("Which image has more shapes, the first or the second?", "first" if len(a) > len(b) else "second", "compare")
    )
  kinds_a, kinds_b = {s.kind for s in a}, {s.kind for s in b}
  for kind in sy.SHAPES:
    if (kind in kinds_a) != (kind in kinds_b):
      answer = "first" if kind in kinds_a else "second"
      out.append((f"Which image shows the {kind}, the first or the second?", answer, "presence"))
    out.append((f"Is there a {kind} in both images?", "yes" if kind in kinds_a & kinds_b else "no", "both"))
  return out


def pick_pair_questions(a: sy.Scene, b: sy.Scene, rng: np.random.Generator, n: int) -> list[tuple[str, str, str]]:
  """n questions of different categories (in random order), each drawn among its category's:
  "both" questions exist for every pair, so drawing from the whole pool would drown the others."""
  by_category: dict[str, list] = {}
  for qa in pair_questions(a, b):
    by_category.setdefault(qa[2], []).append(qa)
  categories = sorted(by_category)
  out = []
  for c in rng.permutation(len(categories))[:n]:
    pool = by_category[categories[c]]
    out.append(pool[int(rng.integers(len(pool)))])
  return out


def sample_video(rng: np.random.Generator) -> tuple[sy.Shape, str, list[str]]:
  """(the shape at its start cell, the direction or "none", the FRAMES positions of the frames)."""
  kind = sy.SHAPES[int(rng.integers(len(sy.SHAPES)))]
  color = list(sy.COLORS)[int(rng.integers(len(sy.COLORS)))]
  if rng.integers(len(DIRECTIONS)) == 0:  # one answer in five: it stays
    position = sy.POSITIONS[int(rng.integers(len(sy.POSITIONS)))]
    return sy.Shape(kind, color, position), "none", [position] * FRAMES
  axis = ("row", "column")[int(rng.integers(2))]
  start, end = rng.permutation(3)[:2]
  step = 1 if end > start else -1
  if abs(end - start) == 2:
    cells = [start, start + step, end]
  else:  # one cell: the middle frame repeats the start or the end
    cells = [start, start, end] if rng.integers(2) else [start, end, end]
  positions = [_LINES[axis][int(c)] for c in cells]
  return sy.Shape(kind, color, positions[0]), _DIRECTION[axis, step], positions


def video_heldout(shape: sy.Shape, direction: str) -> bool:
  """Whether (colour, shape, direction) is reserved for validation: 2 of the 12 coloured
  shapes per answer, so each is seen moving (or staying) other ways in training, never this way."""
  k = list(sy.COLORS).index(shape.color) * len(sy.SHAPES) + sy.SHAPES.index(shape.kind)
  return (k + DIRECTIONS.index(direction)) % 6 == 0


def _conversation(prompt: str, qas: list[tuple[str, str, str]]) -> list[dict]:
  turns = []
  for k, (q, a, _) in enumerate(qas):
    turns.append({"from": "human", "value": (prompt if k == 0 else "") + sy.question_text(q)})
    turns.append({"from": "gpt", "value": a})
  return turns


def _save(image_dir: str, name: str, pixels: np.ndarray) -> str:
  with open(os.path.join(image_dir, name), "wb") as f:
    f.write(sy._png_bytes(pixels))
  return name


def write_multi(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    n_train: int = 3000,
    n_val: int = 100,
    image_size: int = 42,
    questions_per_pair: int = 2,
    frame_questions: int = 2,
    replay: int = 0,
) -> dict[str, str]:
  """Writes the pairs and videos into `out_dir` (see the module docstring).

  Args:
    out_dir: the `write_synthetic` directory (its `stage2.jsonl` is read for `replay`).
    seed: everything is drawn from it (with a stream of its own: the single-image data
      of the same seed is unchanged).
    n_train, n_val: pairs and videos per split (each n: n pairs and n videos).
    image_size: S, as the single-image data's.
    questions_per_pair: conversation turns per pair.
    frame_questions: turns of a video conversation besides its motion question (0-2:
      where the shape is in the first, then the last frame), in random order with it.
    replay: stage-2 training conversations mixed into stage3.jsonl (so the single-image
      skills are kept).

  Returns:
    {name: path} for "stage3", "stage3_val", "eval_multi_questions", "eval_multi_annotations".
  """
  out_dir = os.fspath(out_dir)
  image_dir = os.path.join(out_dir, "images")
  os.makedirs(image_dir, exist_ok=True)
  records = {}
  eval_rows, eval_answers = [], []
  for split, n, heldout in (("train", n_train, False), ("val", n_val, True)):
    rng = np.random.default_rng([seed, int(heldout), 3])
    rows = []
    scenes = sy.sample_scenes(rng, 2 * n, heldout=heldout)
    for i in range(n):
      a, b = scenes[2 * i], scenes[2 * i + 1]
      sid = f"{sy.NAME}-pair-{split}-{i:06d}"
      images = [
          _save(image_dir, f"pair_{split}_{i:06d}_{k}.png", sy.render_scene(s, image_size))
          for k, s in enumerate((a, b))
      ]
      qas = pick_pair_questions(a, b, rng, questions_per_pair)
      rows.append({"id": sid, "image": images, "conversations": _conversation(PAIR_PROMPT, qas)})
      if heldout:
        q, answer, category = qas[0]
        eval_rows.append(
            {"question_id": sid, "image": images, "text": PAIR_PROMPT + sy.question_text(q), "category": category}
        )
        eval_answers.append({"question_id": sid, "answer": answer})
    i = 0
    while i < n:
      shape, direction, positions = sample_video(rng)
      if video_heldout(shape, direction) != heldout:
        continue
      sid = f"{sy.NAME}-video-{split}-{i:06d}"
      frames = np.stack([sy.render_scene((sy.Shape(shape.kind, shape.color, p),), image_size) for p in positions])
      clip = f"video_{split}_{i:06d}.mkv"
      write_video(os.path.join(image_dir, clip), frames)
      q = f"Which way does the {shape.kind} move?"
      # With the motion question, in random order, where the shape is in the first and the
      # last frame: the two looks the answer is made of (the held-out question is asked first).
      qas = [(q, direction, "motion")] + [
          (f"Where is the {shape.kind} in the {which} frame?", positions[k], "frame")
          for which, k in (("first", 0), ("last", -1))
      ][:frame_questions]
      qas = [qas[j] for j in rng.permutation(len(qas))]
      rows.append({"id": sid, "video": clip, "conversations": _conversation(VIDEO_PROMPT, qas)})
      if heldout:
        eval_rows.append(
            {"question_id": sid, "video": clip, "text": VIDEO_PROMPT + sy.question_text(q), "category": "motion"}
        )
        eval_answers.append({"question_id": sid, "answer": direction})
      i += 1
    if replay and not heldout:
      with open(os.path.join(out_dir, "stage2.jsonl"), encoding="utf-8") as f:
        single = [json.loads(line) for line in f]
      rows += [single[j] for j in rng.permutation(len(single))[:replay]]
    records[split] = [rows[j] for j in rng.permutation(len(rows))]
  paths = {
      "stage3": os.path.join(out_dir, "stage3.jsonl"),
      "stage3_val": os.path.join(out_dir, "stage3_val.jsonl"),
      "eval_multi_questions": os.path.join(out_dir, "eval_multi_questions.jsonl"),
      "eval_multi_annotations": os.path.join(out_dir, "eval_multi_annotations.jsonl"),
  }
  sy._write_jsonl(paths["eval_multi_questions"], eval_rows)
  sy._write_jsonl(paths["eval_multi_annotations"], eval_answers)
  sy._write_jsonl(paths["stage3_val"], records["val"])
  sy._write_jsonl(paths["stage3"], records["train"])  # last: what prepare_synthetic looks for
  return paths
