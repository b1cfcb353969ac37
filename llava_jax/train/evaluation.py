"""In-training evaluation on a held-out conversation file (teacher forced, one pass).

``answer_exact_match`` counts an answer (a contiguous run of target tokens, i.e. the
assistant's reply plus its end token) as right when every token is the argmax given the
reference prefix. That is exactly the condition under which greedy decoding reproduces
the answer and stops, so it equals greedy exact match, at the cost of one forward pass.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

from llava_jax.models.configs import LlavaConfig
from llava_jax.models.llava import Llava
from llava_jax.train.step import IGNORE, MODEL_KEYS, token_loss


def answer_runs(weights: np.ndarray) -> list[list[tuple[int, int]]]:
  """Per row, [start, end) spans of consecutive target positions. weights float[B, T]."""
  out = []
  for row in weights > 0:
    spans, start = [], None
    for i, w in enumerate(row):
      if w and start is None:
        start = i
      elif not w and start is not None:
        spans.append((start, i))
        start = None
    if start is not None:
      spans.append((start, len(row)))
    out.append(spans)
  return out


def make_eval_fn(cfg: LlavaConfig, batches: Callable[[], Any]) -> Callable[[Any, int], dict]:
  """``eval_fn(params, step)`` over the batches yielded by ``batches()`` (a fresh pass)."""
  @jax.jit
  def forward(params, batch):
    logits = Llava(cfg).apply({"params": params}, batch["input_ids"], batch["pixel_values"],
                              batch["attention_mask"], positions=batch.get("positions"),
                              image_mask=batch["image_mask"])
    nll, w, correct = token_loss(logits, batch["labels"], batch["attention_mask"])
    return (nll * w).sum(), w, correct

  def eval_fn(params, step):
    del step
    nll_sum = tokens = right_tokens = answers = right_answers = 0.0
    for batch in batches():
      model_batch = {k: batch[k] for k in MODEL_KEYS if k in batch}
      s, w, c = jax.device_get(forward(params, model_batch))
      nll_sum += float(s)
      tokens += float(w.sum())
      right_tokens += float((c * w).sum())
      for row, spans in enumerate(answer_runs(w)):
        for a, b in spans:
          answers += 1
          right_answers += float(c[row, a:b].all())
    if not answers:
      raise ValueError("evaluation data has no answer tokens (all labels are IGNORE)")
    return {"val_loss": nll_sum / tokens, "val_token_accuracy": right_tokens / tokens,
            "answer_exact_match": right_answers / answers, "val_answers": int(answers)}

  return eval_fn


def eval_fn_from_config(config) -> Callable | None:
  """Builds the held-out evaluation named by ``config.data.val`` (None if absent)."""
  d = config.data
  if not d.get("val") or not config.train.get("eval_every"):
    return None
  from llava_jax.data import images as images_lib, pipeline, sources
  from llava_jax.train.loop import model_config, prepare_synthetic
  from llava_jax.tokenizer import load_tokenizer
  prepare_synthetic(config)
  tokenizer = load_tokenizer(d.tokenizer)
  cfg = model_config(config, tokenizer)
  image_config = images_lib.image_config_for(cfg.vision.kind, cfg.vision.image_size, d.get("image_mode"))
  source = sources.open_source(d.val, image_root=d.get("image_root"))

  def batches():
    it = pipeline.make_dataset(
        source, tokenizer=tokenizer, template=d.template, image_config=image_config,
        image_token_id=cfg.image_token_id, num_image_tokens=cfg.num_image_tokens,
        max_len=d.max_len, max_images=d.get("max_images", 1),
        batch_size=config.train.get("eval_batch_size", config.train.batch_size), seed=0,
        shuffle=False, num_epochs=1, policy=d.get("policy", "skip"), drop_remainder=False,
        shard_index=0, shard_count=1)
    try:
      yield from it
    finally:
      it.close()

  return make_eval_fn(cfg, batches)


__all__ = ["answer_runs", "make_eval_fn", "eval_fn_from_config", "IGNORE"]
