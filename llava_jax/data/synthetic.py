"""The embedded dataset: coloured shapes on a plain background, with captions, VQA and a tokenizer.

    paths = write_synthetic("/tmp/shapes", seed=0, n_train=4000, n_val=200, image_size=28)
    tok = load_tokenizer(paths["tokenizer"]); image_token_id = tok.token_to_id(IMAGE_TOKEN)

A scene holds 1-3 shapes (circle, square, triangle) in distinct colours (red,
green, blue, yellow) at distinct positions (left, right, top, bottom,
center; a 3x3 grid's middle row and column), so every question below has
exactly one answer:

    caption   "a red circle on the left and a blue square at the top."
    Q / A     "What color is the square?" -> "blue"     "What shape is red?" -> "circle"
              "Where is the circle?" -> "left"          "How many shapes are there?" -> "two"
              "Is there a triangle?" -> "no"

Answers are one word (one token of the bundled tokenizer). Each question is
followed by LLaVA-1.5's "\\nAnswer the question using a single word or phrase."
(`llava_jax.eval.tasks.SHORT_ANSWER`, the suffix of the "synthetic" eval task).

Held out. A scene's composition (its set of (shape, colour, position))
belongs to the validation side iff a CRC32 of its canonical text is 0 mod 10;
training scenes are drawn only from the other 90%, so validation images show
compositions never seen in training.

Files written by `write_synthetic(out_dir)`:

    images/{train,val}_NNNNNN.png                S x S RGB
    stage1.jsonl, stage1_val.jsonl               {"id", "image", "conversations": [<image>\\n instruction, caption]}
                                                 (train with template "plain": image + caption)
    stage2.jsonl, stage2_val.jsonl               multi-turn VQA, "<image>\\n" starts the first human turn
    eval_questions.jsonl                         {"question_id", "image", "text", "category"} (val images)
    eval_annotations.jsonl                       {"question_id", "answer"}
    array_record/stage{1,2}/shapes-{train,val}.array_record-00000-of-00001   (+ tfds metadata)
    tokenizer.model                              sentencepiece (`build_tokenizer`), ~384 pieces

The tokenizer is trained on the training records rendered under every
template in `TOKENIZER_TEMPLATES` (so each template's markers and system
prompt tokenize without <unk>), plus each answer word repeated so that it is
one "▁word" piece; `<image>` and the ChatML / Gemma markers are pieces of
their own. Numbers are answered as words ("two"): with split digits, " 2"
would be two pieces; the eval normalisation treats "two" and "2" alike.

Image paths in the JSONL files are relative to `out_dir/images`. Everything
is a function of the arguments: the same seed gives byte-identical files
(4000 + 200 images with all files: ~4 s on one CPU core).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tempfile
import zlib
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from llava_jax.data.array_record import write_array_record
from llava_jax.data.templates import TEMPLATES, IMAGE_TAG, render
from llava_jax.eval.tasks import SHORT_ANSWER
from llava_jax.tokenizer import SentencePieceTokenizer, train_sentencepiece

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
POSITIONS = ("left", "top", "center", "bottom", "right")
_PHRASE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
_CELL = {"left": (1, 0), "right": (1, 2), "top": (0, 1), "bottom": (2, 1), "center": (1, 1)}  # (row, col)
BACKGROUND = (245, 245, 245)
IMAGE_TOKEN = IMAGE_TAG  # a piece of the bundled tokenizer: image_token_id = tok.token_to_id(IMAGE_TOKEN)
STAGE1_PROMPT = "Describe the image briefly."
USER_SYMBOLS = ("\n", IMAGE_TOKEN, "<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>")
_CONTROL = ("<s>", "</s>", "<unk>", "<pad>")  # sentencepiece control pieces: split out of text, never learned
HELDOUT_MOD = 10
# Number words: one token each (split_digits makes " 2" two pieces, "▁" and "2"); the eval's
# answer normalisation maps "two" and "2" alike.
_NUMBERS = {1: "one", 2: "two", 3: "three"}
ANSWER_WORDS = SHAPES + tuple(COLORS) + POSITIONS + ("yes", "no") + tuple(_NUMBERS.values())
NAME = "shapes"


@dataclasses.dataclass(frozen=True, order=True)
class Shape:
  kind: str  # one of SHAPES
  color: str  # one of COLORS
  position: str  # one of POSITIONS


Scene = tuple[Shape, ...]  # sorted by POSITIONS order


def scene_key(scene: Scene) -> str:
  """Canonical text of a scene (what the held-out hash and deduplication look at)."""
  return ";".join(f"{s.color} {s.kind} {s.position}" for s in scene)


def is_heldout(scene: Scene) -> bool:
  """Whether the scene's composition is reserved for validation (~1 in HELDOUT_MOD)."""
  return zlib.crc32(scene_key(scene).encode()) % HELDOUT_MOD == 0


def sample_scene(rng: np.random.Generator, max_shapes: int = 3) -> Scene:
  """1..max_shapes shapes, with distinct kinds, colours and positions."""
  n = int(rng.integers(1, max_shapes + 1))
  kinds = rng.permutation(len(SHAPES))[:n]
  colors = rng.permutation(len(COLORS))[:n]
  positions = rng.permutation(len(POSITIONS))[:n]
  names = list(COLORS)
  shapes = [Shape(SHAPES[k], names[c], POSITIONS[p]) for k, c, p in zip(kinds, colors, positions)]
  return tuple(sorted(shapes, key=lambda s: POSITIONS.index(s.position)))


def sample_scenes(rng: np.random.Generator, n: int, *, heldout: bool, max_shapes: int = 3) -> list[Scene]:
  """n scenes on one side of the held-out split (rejection sampling)."""
  out = []
  while len(out) < n:
    scene = sample_scene(rng, max_shapes)
    if is_heldout(scene) == heldout:
      out.append(scene)
  return out


def _masks(size: int) -> dict[tuple[str, str], np.ndarray]:
  """bool[S, S] per (kind, position): shapes fill ~80% of their grid cell."""
  y, x = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
  cell = size / 3
  r = 0.4 * cell
  out = {}
  for pos, (row, col) in _CELL.items():
    cy, cx = (row + 0.5) * cell, (col + 0.5) * cell
    dy, dx = y - cy, x - cx
    out["circle", pos] = dx * dx + dy * dy <= r * r
    out["square", pos] = (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    # Apex at the top, base at the bottom: half-width grows from 0 to r.
    out["triangle", pos] = (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
  return out


_MASK_CACHE: dict[int, dict] = {}


def render_scene(scene: Scene, size: int = 28) -> np.ndarray:
  """uint8[S, S, 3]: the scene's shapes on the plain BACKGROUND."""
  if size < 9:
    raise ValueError(f"image_size must be >= 9 (3 pixels per grid cell), got {size}")
  if size not in _MASK_CACHE:
    _MASK_CACHE[size] = _masks(size)
  masks = _MASK_CACHE[size]
  img = np.empty((size, size, 3), np.uint8)
  img[:] = BACKGROUND
  for s in scene:
    img[masks[s.kind, s.position]] = COLORS[s.color]
  return img


def caption(scene: Scene) -> str:
  """'a red circle on the left, a blue square at the bottom and a green triangle in the center.'

  Shapes are named in SHAPES order (circle, square, triangle), not in reading order: to
  write "a red circle" the model must find the circle among the image tokens and read its
  colour, i.e. stage 1 already trains the lookup by shape kind that most VQA questions
  need ("What color is the square?", "Where is the circle?", "Is there a triangle?").
  Named in position order, the captions only need a lookup by position, and the tiny
  model's stage 2 then stalls near 78% held-out accuracy instead of passing 90%.
  """
  parts = [f"a {s.color} {s.kind} {_PHRASE[s.position]}" for s in sorted(scene, key=lambda s: SHAPES.index(s.kind))]
  text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
  return text + "."


def questions(scene: Scene) -> list[tuple[str, str, str]]:
  """Every question the scene answers unambiguously: (question, answer, category), in a fixed order."""
  out = [("How many shapes are there?", _NUMBERS[len(scene)], "count")]
  for s in scene:
    out.append((f"What color is the {s.kind}?", s.color, "color"))
    out.append((f"What shape is {s.color}?", s.kind, "shape"))
    out.append((f"Where is the {s.kind}?", s.position, "position"))
  present = {s.kind for s in scene}
  for kind in SHAPES:
    out.append((f"Is there a {kind}?", "yes" if kind in present else "no", "exists"))
  return out


def pick_questions(scene: Scene, rng: np.random.Generator, n: int) -> list[tuple[str, str, str]]:
  """n distinct questions (fewer if the scene has fewer), in random order."""
  pool = questions(scene)
  return [pool[i] for i in rng.permutation(len(pool))[:n]]


def question_text(question: str) -> str:
  return f"{question}\n{SHORT_ANSWER}"


def stage1_record(sid: str, image: str, scene: Scene) -> dict:
  return {
      "id": sid,
      "image": image,
      "conversations": [
          {"from": "human", "value": f"{IMAGE_TOKEN}\n{STAGE1_PROMPT}"},
          {"from": "gpt", "value": caption(scene)},
      ],
  }


def stage2_record(sid: str, image: str, qas: Sequence[tuple[str, str, str]]) -> dict:
  turns = []
  for k, (q, a, _) in enumerate(qas):
    turns.append({"from": "human", "value": (f"{IMAGE_TOKEN}\n" if k == 0 else "") + question_text(q)})
    turns.append({"from": "gpt", "value": a})
  return {"id": sid, "image": image, "conversations": turns}


def _png_bytes(pixels: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="PNG")  # no timestamp chunks: deterministic bytes
  return buf.getvalue()


def _write_jsonl(path: str, rows: Iterable[dict]):
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")


# The templates whose text trains the embedded tokenizer: a fixed list (not every entry of
# TEMPLATES), so that adding a template does not change the demo's vocabulary.
TOKENIZER_TEMPLATES = ("chatml", "gemma", "llama_2", "llava_v1", "mistral_instruct", "plain", "vicuna_v1")


def tokenizer_sentences(records: Sequence[dict]) -> list[str]:
  """Training text for the tokenizer: each record rendered with every template (so separators and
  system prompts get pieces), control tokens and image tags removed."""
  out = []
  for rec in records:
    conv = rec["conversations"]
    for name in TOKENIZER_TEMPLATES:
      if TEMPLATES[name].image_only_prompt and len(conv) != 2:
        continue
      text = "".join(s.text for s in render(conv, name))
      for tok in _CONTROL + (IMAGE_TOKEN,):
        text = text.replace(tok, " ")
      out.append(text)
  return out


def build_tokenizer(records: Sequence[dict], vocab_size: int = 384) -> SentencePieceTokenizer:
  """A deterministic sentencepiece model over the records' text (see `tokenizer_sentences`).

  Besides sentencepiece's <unk> <s> </s> <pad> (ids 0-3) it has one piece
  per USER_SYMBOLS entry ("\\n", "<image>", ChatML and Gemma markers).
  """
  # Every record renders under every template; a stride keeps training time flat for big datasets.
  step = max(1, len(records) // 2000)
  # Each answer word, frequent enough to become one "▁word" piece however small the dataset is.
  primer = [" ".join([w] * 1000) for w in ANSWER_WORDS for _ in range(5)]
  return train_sentencepiece(
      primer + tokenizer_sentences(records[::step]), vocab_size, user_defined_symbols=USER_SYMBOLS
  )


def write_synthetic(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    n_train: int = 4000,
    n_val: int = 200,
    image_size: int = 28,
    questions_per_image: int = 3,
    eval_questions_per_image: int = 3,
    vocab_size: int = 384,
    array_record: bool = True,
    multi: dict | None = None,
) -> dict[str, str]:
  """Generates the dataset into `out_dir` (see the module docstring for the files).

  Args:
    out_dir: created if needed; files of an earlier run are overwritten.
    seed: everything is drawn from it.
    n_train, n_val: images per split (each has one caption and one
      conversation of `questions_per_image` turns).
    image_size: S.
    eval_questions_per_image: eval_questions.jsonl rows per validation image.
    vocab_size: target size of the tokenizer (smaller if the text is too small).
    array_record: also write the array_record copies.
    multi: also the multi-image and video tasks: `synthetic_multi.write_multi` keyword
      arguments (n_train, n_val, questions_per_pair, replay); same seed and image size.

  Returns:
    {name: path} for "images", "stage1", "stage1_val", "stage2", "stage2_val",
    "eval_questions", "eval_annotations", "tokenizer" and, with array_record,
    "array_record_stage1", "array_record_stage2" (directories with train/val splits).

  An `out_dir` on a bucket (`gs://`): written to a local staging directory, then
  uploaded; the tokenizer (the file training waits for) is uploaded last.
  """
  from llava_jax import storage

  out_dir = os.fspath(out_dir)
  if storage.is_remote(out_dir):
    storage.check(out_dir, "synthetic data directory", write=True)
    with tempfile.TemporaryDirectory(prefix="llava_jax_synthetic_") as tmp:
      local = os.path.join(tmp, "data")
      paths = write_synthetic(
          local,
          seed=seed,
          n_train=n_train,
          n_val=n_val,
          image_size=image_size,
          questions_per_image=questions_per_image,
          eval_questions_per_image=eval_questions_per_image,
          vocab_size=vocab_size,
          array_record=array_record,
          multi=multi,
      )
      marker = os.path.join(tmp, "tokenizer.model")
      os.replace(paths["tokenizer"], marker)  # uploaded last: a reader waits for this file
      storage.upload_tree(local, out_dir)
      storage.upload_file(marker, storage.join(out_dir, "tokenizer.model"))
    return {k: storage.join(out_dir, os.path.relpath(v, local)) for k, v in paths.items()}
  image_dir = os.path.join(out_dir, "images")
  os.makedirs(image_dir, exist_ok=True)
  paths = {"images": image_dir}
  records: dict[tuple[str, str], list[dict]] = {}
  eval_rows, eval_answers = [], []
  for split, n, heldout in (("train", n_train, False), ("val", n_val, True)):
    rng = np.random.default_rng([seed, int(heldout)])  # independent streams per split
    stage1, stage2 = [], []
    for i, scene in enumerate(sample_scenes(rng, n, heldout=heldout)):
      image = f"{split}_{i:06d}.png"
      with open(os.path.join(image_dir, image), "wb") as f:
        f.write(_png_bytes(render_scene(scene, image_size)))
      sid = f"{NAME}-{split}-{i:06d}"
      stage1.append(stage1_record(sid + "-cap", image, scene))
      stage2.append(stage2_record(sid + "-qa", image, pick_questions(scene, rng, questions_per_image)))
      if heldout:
        for k, (q, a, category) in enumerate(pick_questions(scene, rng, eval_questions_per_image)):
          qid = f"{sid}-q{k}"
          eval_rows.append({"question_id": qid, "image": image, "text": question_text(q), "category": category})
          eval_answers.append({"question_id": qid, "answer": a})
    records["stage1", split], records["stage2", split] = stage1, stage2

  for stage in ("stage1", "stage2"):
    for split in ("train", "val"):
      key = stage if split == "train" else f"{stage}_val"
      paths[key] = os.path.join(out_dir, f"{key}.jsonl")
      _write_jsonl(paths[key], records[stage, split])
  paths["eval_questions"] = os.path.join(out_dir, "eval_questions.jsonl")
  paths["eval_annotations"] = os.path.join(out_dir, "eval_annotations.jsonl")
  _write_jsonl(paths["eval_questions"], eval_rows)
  _write_jsonl(paths["eval_annotations"], eval_answers)

  if array_record:
    for stage in ("stage1", "stage2"):
      ar_dir = os.path.join(out_dir, "array_record", stage)
      paths[f"array_record_{stage}"] = ar_dir
      for split in ("train", "val"):
        report = write_array_record(
            records[stage, split], ar_dir, image_root=image_dir, num_shards=1, split=split, name=NAME, policy="raise"
        )
        assert report.written == len(records[stage, split])

  # Tokenizer text: training records only, so nothing about held-out scenes leaks into it
  # (the vocabulary of words is the same on both sides).
  tok = build_tokenizer(records["stage1", "train"] + records["stage2", "train"], vocab_size)
  paths["tokenizer"] = os.path.join(out_dir, "tokenizer.model")
  tok.save(paths["tokenizer"])
  if multi is not None:
    paths.update(write_multi_tasks(out_dir, seed=seed, image_size=image_size, multi=multi))
  return paths


def write_multi_tasks(out_dir: str, **kwargs) -> dict[str, str]:
  """The `multi` part of `write_synthetic(out_dir, **kwargs)` alone, into a directory it
  already wrote (a later stage that asks for the multi-image tasks)."""
  import inspect

  from llava_jax.data.synthetic_multi import write_multi  # local: it imports this module

  bound = inspect.signature(write_synthetic).bind(out_dir, **kwargs)
  bound.apply_defaults()
  a = bound.arguments
  return write_multi(out_dir, seed=a["seed"], image_size=a["image_size"], **(a["multi"] or {}))
