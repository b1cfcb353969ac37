"""Packed vs padded training on LLaVA-shaped data: llava_jax and HF transformers (PyTorch).

  JAX_PLATFORMS=cpu .venv/bin/python benchmarks/packing.py [--conversations=32] [--results=benchmarks/RESULTS.md]

``train_step.py`` compares the frameworks at equal work, on a dense batch. Instruction
data is not dense: conversations vary from a one-word VQA answer to long multi-turn
chats, and a fixed-shape batch spends the rest of each row on padding. This script
trains one epoch over the same N conversations four ways, with the same model (the
~100M LLaVA of ``train_step.py``, ViT frozen) and the same number of optimizer steps,
and reports real (non-padding) tokens per second:

  * llava_jax packed: rows of ``--max_len`` from ``llava_jax.data.packing.pack`` (what
    ``data.pack=True`` does), fixed shapes, one compilation;
  * llava_jax padded: each conversation padded to ``--max_len`` (fixed shapes, no packing);
  * HF padded: each batch padded to its longest conversation after sorting by length
    (LLaVA's ``group_by_modality_length``, with the whole epoch as one mega-batch: the
    least padding a padded batch can have);
  * HF padding-free: the packed rows of llava_jax with ``position_ids`` and no attention
    mask, which transformers turns into per-sequence causal masks (equal work with
    llava_jax packed; the script checks that both give the same loss).

Conversation lengths follow a LLaVA-665k-like mix, scaled to a 64-token image: 90% with
an image; 1-6 turns; questions of 8-32 tokens; answers half short (1-8 tokens, VQA-style)
and half long (log-normal, median 55 tokens, at most 200).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import timed_interleaved  # noqa: E402
from train_step import build_models, jax_stepper, torch_stepper  # noqa: E402  (also puts tests/ on the path)

IGNORE = -100


def conversations(
    n: int, *, image_token: int, image_tokens: int, image_size: int, max_len: int, seed: int = 0
) -> list[dict]:
  """n unpadded examples ({"input_ids", "labels", "pixel_values", "ids"}), <= max_len tokens."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    has_image = rng.random() < 0.9
    ids, labels = [1] + list(rng.integers(3, 7000, 20)), [IGNORE] * 21  # bos + system prompt
    turns = int(rng.choice([1, 2, 3, 4, 5, 6], p=[0.4, 0.2, 0.15, 0.1, 0.1, 0.05]))
    for turn in range(turns):
      question = list(rng.integers(3, 7000, rng.integers(8, 33)))
      if turn == 0 and has_image:
        question = [image_token] * image_tokens + question
      long = rng.random() < 0.5
      n_answer = min(200, int(rng.lognormal(np.log(55), 0.6))) if long else int(rng.integers(1, 9))
      answer = list(rng.integers(3, 7000, n_answer)) + [2]  # + eos, learned
      if len(ids) + len(question) + len(answer) > max_len:
        break
      ids += question + answer
      labels += [IGNORE] * len(question) + answer
    if len(ids) == 21:
      raise ValueError(f"max_len {max_len} too small for one turn")
    px = rng.normal(size=(int(has_image), image_size, image_size, 3)).astype(np.float32)
    out.append(
        {
            "input_ids": np.asarray(ids, np.int32),
            "labels": np.asarray(labels, np.int32),
            "pixel_values": px,
            "ids": f"conv{i}",
        }
    )
  return out


def batches_of(rows: list[dict], steps: int) -> list[list[dict]]:
  per = math.ceil(len(rows) / steps)
  return [rows[k * per : (k + 1) * per] for k in range(steps)]


def jax_packed(examples, *, max_len, max_images, steps):
  """Packed rows (the pipeline's packer), grouped into `steps` fixed-shape batches."""
  import grain
  from llava_jax.data import packing

  ds = grain.MapDataset.source(examples).to_iter_dataset()
  rows = list(
      packing.pack(
          ds, max_len=max_len, max_images=max_images, pad_id=0, num_bins=len(examples), seed=0, shuffle_bins=False
      )
  )
  per = math.ceil(len(rows) / steps)
  empty = {k: np.zeros_like(v) for k, v in rows[0].items() if k != "ids"}
  empty["labels"] = np.full_like(rows[0]["labels"], IGNORE)
  out = []
  for group in batches_of(rows, steps):
    group = group + [empty] * (per - len(group))
    out.append({k: np.stack([r[k] for r in group]) for k in empty})
  return out


def padded(group: list[dict], *, max_len: int, batch_size: int) -> dict:
  """Conversations padded to max_len and stacked (the pipeline's `pad_example` and
  `collate`; rows beyond the group are empty)."""
  from llava_jax.data.pipeline import collate, pad_example
  from llava_jax.data.tokenize import TokenizedSample

  rows = []
  for e in group:
    n_img = len(e["pixel_values"])
    px = np.zeros((1,) + e["pixel_values"].shape[1:], np.float32)
    px[:n_img] = e["pixel_values"]
    sample = TokenizedSample(e["ids"], e["input_ids"], e["labels"], n_img, False)
    rows.append(pad_example(sample, max_len=max_len, pad_id=0, pixel_values=px, num_images=n_img))
  batch = collate(rows, batch_size=batch_size)
  del batch["ids"]
  return batch


def jax_padded(examples, *, max_len, steps):
  """Each conversation padded to max_len; the last batch gets empty rows (one shape)."""
  per = math.ceil(len(examples) / steps)
  return [padded(group, max_len=max_len, batch_size=per) for group in batches_of(examples, steps)]


def hf_padded(examples, *, steps):
  """LLaVA's length grouping: sorted by length, each batch padded to its longest."""
  import torch

  order = sorted(examples, key=lambda e: len(e["input_ids"]))
  out = []
  for group in batches_of(order, steps):
    b = padded(group, max_len=max(len(e["input_ids"]) for e in group), batch_size=len(group))
    out.append(
        {k: torch.from_numpy(b[k]).long() for k in ("input_ids", "labels", "attention_mask")}
        | _torch_pixels([e["pixel_values"] for e in group])
    )
  return out


def hf_packed(jax_batches):
  import torch

  out = []
  for b in jax_batches:
    out.append(
        {
            "input_ids": torch.from_numpy(b["input_ids"]).long(),
            "labels": torch.from_numpy(b["labels"]).long(),
            "position_ids": torch.from_numpy(b["positions"]).long(),
            **_torch_pixels([px[m] for px, m in zip(b["pixel_values"], b["image_mask"])]),
        }
    )
  return out


def _torch_pixels(per_row) -> dict:
  import torch

  px = np.concatenate(per_row)
  return {"pixel_values": torch.from_numpy(px.transpose(0, 3, 1, 2).copy())} if len(px) else {}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--conversations", type=int, default=32)
  p.add_argument("--max_len", type=int, default=512)
  p.add_argument("--max_images", type=int, default=4, help="image slots per packed row")
  p.add_argument("--steps", type=int, default=3, help="optimizer steps per epoch (every variant)")
  p.add_argument("--repeats", type=int, default=1, help="timed epochs per variant (median)")
  p.add_argument(
      "--target_fraction", type=float, default=0.5, help="StepConfig.target_fraction of the head-at-targets variant"
  )
  p.add_argument("--results", default=None)
  a = p.parse_args()

  import jax
  import torch
  from llava_jax.train.step import StepConfig, loss_fn

  hf, cfg, params = build_models()
  examples = conversations(
      a.conversations,
      image_token=cfg.image_token_id,
      image_tokens=cfg.num_image_tokens,
      image_size=cfg.vision.image_size,
      max_len=a.max_len,
  )
  real = sum(len(e["input_ids"]) for e in examples)
  targets = sum(int(np.sum(e["labels"] != IGNORE)) for e in examples)
  data = {
      "jax packed": jax_packed(examples, max_len=a.max_len, max_images=a.max_images, steps=a.steps),
      "jax padded": jax_padded(examples, max_len=a.max_len, steps=a.steps),
      "hf padded": hf_padded(examples, steps=a.steps),
  }
  data["hf padding-free"] = hf_packed(data["jax packed"])
  for name, bs in data.items():  # every variant trains on exactly the same tokens
    got = sum(int(np.sum(np.asarray(b["labels"])[:, 1:] != IGNORE)) for b in bs)
    assert got == targets, (name, got, targets)
  slots = {name: sum(int(np.prod(b["input_ids"].shape)) for b in bs) for name, bs in data.items()}

  # Same loss on the same packed batch, before any update: the rows mean the same to both.
  b0 = data["jax packed"][0]
  jax_loss = float(loss_fn(params, b0, cfg, StepConfig())[0])
  with torch.no_grad():
    # use_cache=False as in training: with a cache, transformers skips its packed-sequence
    # detection and lets the packed examples attend to each other.
    hf_loss = float(hf(**data["hf padding-free"][0], use_cache=False).loss)
  assert abs(jax_loss - hf_loss) < 1e-4 * max(1.0, abs(hf_loss)), (jax_loss, hf_loss)

  epochs = {}
  head_at_targets = f"jax packed, head at targets ({a.target_fraction:g})"
  data[head_at_targets] = data["jax packed"]
  slots[head_at_targets] = slots["jax packed"]
  for name in ("jax packed", head_at_targets, "jax padded"):
    print(f"compiling {name}", file=sys.stderr)
    bs = data[name]
    step_cfg = StepConfig(target_fraction=a.target_fraction if name == head_at_targets else None)
    run = jax_stepper(cfg, params, bs[0], step_cfg)
    run(bs[0])  # warm-up step

    def epoch(bs=bs, run=run):
      for b in bs:
        m = run(b)
      jax.block_until_ready(m["loss"])

    epochs[name] = epoch

  torch_step = torch_stepper(hf)
  for name in ("hf padded", "hf padding-free"):
    torch_step(data[name][0])  # warm-up step
    epochs[name] = lambda bs=data[name]: [torch_step(b) for b in bs]

  print("timing epochs", file=sys.stderr)
  t = timed_interleaved(epochs, a.repeats, warmup=False)
  lines = [
      f"{a.conversations} conversations, {real:,} tokens ({targets:,} learned), max_len {a.max_len}, "
      f"{a.steps} optimizer steps per epoch, float32, torch threads {torch.get_num_threads()}; "
      f"loss on the first packed batch: llava_jax {jax_loss:.5f}, HF padding-free {hf_loss:.5f}",
      "| | token slots computed | padding | epoch time | real tokens/s |",
      "|---|---|---|---|---|",
  ]
  for name in epochs:
    lines.append(
        f"| {name} | {slots[name]:,} | {1 - real / slots[name]:.0%} | {t[name]:.1f} s | {real / t[name]:,.0f} |"
    )
  lines += [
      "",
      f"llava_jax packed vs HF padded (length-grouped): **{t['hf padded'] / t['jax packed']:.2f}x**; "
      f"vs HF padding-free (equal work): **{t['hf padding-free'] / t['jax packed']:.2f}x**; "
      f"packing within llava_jax: {t['jax padded'] / t['jax packed']:.2f}x; "
      f"head at targets: {t['jax packed'] / t[head_at_targets]:.2f}x over packed "
      f"({t['hf padded'] / t[head_at_targets]:.2f}x HF padded).",
  ]
  print("\n".join(lines))
  if a.results:
    from results import replace_section

    replace_section(
        a.results,
        "Packed training on LLaVA-shaped data (benchmarks/packing.py)",
        "Command: `JAX_PLATFORMS=cpu .venv/bin/python benchmarks/packing.py "
        f"--conversations={a.conversations} --repeats={a.repeats} --results={a.results}`\n\n" + "\n".join(lines),
    )


if __name__ == "__main__":
  main()
