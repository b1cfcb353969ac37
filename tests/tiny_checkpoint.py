"""A tiny random HF LLaVA directory with a sentencepiece tokenizer, 3 PNGs and a
LLaVA-format question/annotation file: what ``load_model``, the CLIs and the evaluator
read, built in a second on CPU."""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

import tiny_hf
from llava_jax.data.templates import TEMPLATES
from llava_jax.tokenizer import train_sentencepiece

QUESTIONS = ["What color is the square?", "How many circles are there?", "Is there a red triangle?"]
ANSWERS = ["red", "two", "yes"]


def _sentences() -> list[str]:
  t = TEMPLATES["llava_v1"]
  words = (
      "red green blue yellow square circle triangle one two three yes no shape color "
      "image picture left right top bottom the a is there what how many"
  ).split()
  base = [t.system, "USER:", "ASSISTANT:", "Answer the question using a single word or phrase."]
  return base + QUESTIONS + [" ".join(words[i:] + words[:i]) for i in range(len(words))]


def write_tiny_llava(path: str, seed: int = 5) -> dict:
  """Writes the model dir at ``path`` and data under ``path/data``; returns their paths."""
  model = tiny_hf.llava("clip", "llama", seed=seed)
  model.save_pretrained(path)
  tok = train_sentencepiece(_sentences(), vocab_size=110)
  assert tok.vocab_size <= 127, tok.vocab_size  # below the image token id and the LM vocab
  tok.save(os.path.join(path, "tokenizer.model"))
  data = os.path.join(path, "data")
  os.makedirs(os.path.join(data, "images"), exist_ok=True)
  rng = np.random.default_rng(seed)
  questions, answers = [], []
  for i, (q, a) in enumerate(zip(QUESTIONS, ANSWERS)):
    name = f"images/{i}.png"
    Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 36, 3), dtype=np.uint8)).save(os.path.join(data, name))
    questions.append({"question_id": f"q{i}", "image": name, "text": q})
    answers.append({"question_id": f"q{i}", "answer": a})
  for fname, rows in (("questions.jsonl", questions), ("annotations.jsonl", answers)):
    with open(os.path.join(data, fname), "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
  return {
      "model": path,
      "questions": os.path.join(data, "questions.jsonl"),
      "annotations": os.path.join(data, "annotations.jsonl"),
      "image": os.path.join(data, "images/0.png"),
      "images": os.path.join(data, "images"),
  }
