"""In-training evaluation on a held-out conversation file (teacher forced, one pass).

``answer_exact_match`` counts an answer (a contiguous run of target tokens, i.e. the
assistant's reply plus its end token) as right when every token is the argmax given the
reference prefix. That is exactly the condition under which greedy decoding reproduces
the answer and stops, so it equals greedy exact match, at the cost of one forward pass.

The trainer builds it from what it holds (``make_eval``: model config, the run's
``ExampleSpec`` (tokenizer, template, image preprocessing), mesh). Every process reads its rows of each global eval batch (a finite
pass that keeps every slot, so all processes run the same number of steps); the counts
are reduced on device, so each process gets the global figures.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp

from llava_jax import sharding
from llava_jax.models.llava import Llava
from llava_jax.train.step import IGNORE, apply_model, token_loss


def answer_counts(weights, correct):
  """(answers, right answers) over a batch; an answer is a run of consecutive targets.

  weights float32[B, T] (> 0 on targets); correct bool[B, T]. Returns two float32 scalars.
  """
  on = weights > 0
  start = on & ~jnp.pad(on, ((0, 0), (1, 0)))[:, :-1]
  run = jnp.cumsum(start, axis=1) * on  # 1, 2, ... per answer of the row; 0 elsewhere
  wrong = on & ~correct
  t = weights.shape[1]
  wrong_run = jax.vmap(lambda r, w: jnp.zeros((t + 1,), bool).at[r].max(w))(run, wrong)
  answers = start.sum().astype(jnp.float32)
  return answers, answers - wrong_run[:, 1:].sum().astype(jnp.float32)


def eval_batch_size(requested: int, mesh, rules=None) -> int:
  """The global eval batch: ``requested`` rounded up so that the batch axes and the
  processes divide it (extra rows are empty and carry no weight)."""
  unit = math.lcm(sharding.batch_shards(mesh, rules), jax.process_count())
  return -(-requested // unit) * unit


def make_eval_fn(
    cfg,
    params_shardings,
    mesh,
    rules,
    batches: Callable[[], Iterable[dict]],
    global_rows: int,
    batch_ndims: dict[str, int],
) -> Callable[[Any, int], dict]:
  """``eval_fn(params, step)`` over the (process-local) batches of ``batches()``.

  Each local batch holds ``global_rows / process_count`` rows; it becomes a global array
  on ``mesh`` and one jitted pass returns the summed statistics, replicated.
  ``batch_ndims``: the model keys of a batch and their ranks.
  """
  keys = tuple(batch_ndims)
  batch_shardings = {k: sharding.batch_sharding(mesh, ndim, rules) for k, ndim in batch_ndims.items()}

  def stats(params, batch):
    logits = apply_model(Llava(cfg), params, batch)
    nll, w, correct = token_loss(logits, batch["labels"], batch["attention_mask"])
    answers, right = answer_counts(w, correct)
    return jnp.stack([(nll * w).sum(), w.sum(), (correct * w).sum(), answers, right])

  forward = jax.jit(stats, in_shardings=(params_shardings, batch_shardings), out_shardings=sharding.replicated(mesh))

  def eval_fn(params, step):
    del step
    total = jnp.zeros((5,), jnp.float32)
    for batch in batches():
      local = {k: batch[k] for k in keys}
      global_batch = {
          k: jax.make_array_from_process_local_data(batch_shardings[k], v, (global_rows,) + v.shape[1:])
          for k, v in local.items()
      }
      with sharding.use_mesh(mesh, rules):
        total = total + forward(params, global_batch)
    nll_sum, tokens, right_tokens, answers, right_answers = (float(x) for x in jax.device_get(total))
    if not answers:
      raise ValueError("evaluation data has no answer tokens (all labels are IGNORE)")
    return {
        "val_loss": nll_sum / tokens,
        "val_token_accuracy": right_tokens / tokens,
        "answer_exact_match": right_answers / answers,
        "val_answers": int(answers),
    }

  return eval_fn


def make_eval(config, cfg, example, params_shardings, mesh, rules) -> Callable | None:
  """The held-out evaluation named by ``config.data.val`` (None if absent or eval_every=0),
  on examples made as in training (``example``: the run's ``pipeline.ExampleSpec``)."""
  from llava_jax.train import run_config

  config = run_config.parse(config)
  d = config.data
  if not d.val or not config.train.eval_every:
    return None
  from llava_jax.data import pipeline, sources

  source = sources.open_source(d.val, image_root=d.image_root)
  rows = eval_batch_size(config.train.eval_batch_size or config.train.batch_size, mesh, rules)
  one_pass = pipeline.PipelineConfig(
      example,
      batch_size=rows,
      seed=0,
      shuffle=False,
      num_epochs=1,
      policy=d.policy,
      drop_remainder=False,
      read_threads=d.read_threads or pipeline.default_read_threads(d.val, d.image_root),
  )

  def batches():
    it = pipeline.make_dataset(source, one_pass)
    try:
      yield from it
    finally:
      it.close()

  empty = pipeline.empty_example(example)  # one row: the batch's keys and ranks
  ndims = {k: empty[k].ndim + 1 for k in example.keys() if k != "ids"}
  return make_eval_fn(cfg, params_shardings, mesh, rules, batches, rows, ndims)


__all__ = ["answer_counts", "eval_batch_size", "make_eval_fn", "make_eval", "IGNORE"]
