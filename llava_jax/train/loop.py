"""The training loop: config -> data, model, mesh, state -> steps, logs, checkpoints, evals.

The ConfigDict is read here once and turned into typed configs; everything below works on
those. Restarting with the same command resumes from the latest checkpoint (params,
optimizer, step, RNG and the grain iterator state), so the loss sequence continues exactly.
"""
from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from llava_jax import sharding
from llava_jax.checkpoint import orbax as ckpt
from llava_jax.data import images as images_lib
from llava_jax.data import packing
from llava_jax.models.configs import LLM_VARIANTS, VISION_VARIANTS, LlavaConfig, llava_config
from llava_jax.train import flops as flops_lib
from llava_jax.train import metrics as metrics_lib
from llava_jax.train import optim
from llava_jax.train import state as state_lib
from llava_jax.train.step import MODEL_KEYS, StepConfig, make_train_step


def _get(config, path: str, default=None):
  node = config
  for key in path.split("."):
    if node is None or key not in node:
      return default
    node = node[key]
  return node


def prepare_synthetic(config) -> None:
  """Writes the embedded dataset if the config asks for it and it is not there yet."""
  syn = _get(config, "data.synthetic")
  if not syn or not syn.get("dir"):
    return
  marker = os.path.join(syn["dir"], "tokenizer.model")
  if os.path.exists(marker):
    return
  from llava_jax.data.synthetic import write_synthetic
  kwargs = {k: v for k, v in syn.items() if k != "dir"}
  logging.info("writing the embedded synthetic dataset to %s", syn["dir"])
  write_synthetic(syn["dir"], **kwargs)


def model_config(config, tokenizer) -> LlavaConfig:
  """LlavaConfig from ``config.model`` (variants + overrides); vocab/ids from the tokenizer."""
  m = config.model
  vision = dataclasses.replace(VISION_VARIANTS[m.vision], **dict(m.get("vision_overrides", {})))
  llm_over = dict(m.get("llm_overrides", {}))
  if m.get("vocab_from_tokenizer", False):
    llm_over["vocab_size"] = tokenizer.vocab_size
  llm = dataclasses.replace(LLM_VARIANTS[m.llm], **llm_over)
  token = m.get("image_token", "<image>")
  image_token_id = token if isinstance(token, int) else tokenizer.token_to_id(token)
  if image_token_id is None:
    image_token_id = llm.vocab_size  # outside the vocabulary: placeholders map to row 0
  pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
  return llava_config(vision, llm, projector=m.get("projector", "mlp2x_gelu"),
                      image_token_id=image_token_id, pad_token_id=pad)


def initial_params(config, cfg: LlavaConfig, params_sharding=None) -> dict[str, Any]:
  """Weights to start from, by ``/``-joined param name: a HF LLaVA, converted HF towers,
  and/or a previous run's params matching ``init.from_run_params``. Empty: random init.

  A previous run is restored straight onto ``params_sharding``; converted checkpoints
  arrive as host arrays and are placed leaf by leaf (``place_params``), so no device
  ever holds a full unsharded model.
  """
  init = _get(config, "init", {}) or {}
  out: dict[str, Any] = {}

  def add(prefix: str, tree, pattern: str = ".*"):
    for n, a in zip(jax.tree.leaves(optim.param_names(tree)), jax.tree.leaves(tree)):
      if re.fullmatch(pattern, prefix + n):
        out[prefix + n] = a

  if init.get("hf_llava"):
    from llava_jax.checkpoint.convert.hf import load_hf_llava
    loaded_cfg, p = load_hf_llava(init["hf_llava"], vision_overrides={"scan": cfg.vision.scan},
                                  llm_overrides={"scan": cfg.llm.scan})
    if loaded_cfg.llm.vocab_size != cfg.llm.vocab_size:
      raise ValueError(f"{init['hf_llava']}: vocab {loaded_cfg.llm.vocab_size} != config {cfg.llm.vocab_size}")
    add("", p)
  if init.get("vision_hf"):
    from llava_jax.checkpoint.convert.hf import load_hf_vision
    add("img/", load_hf_vision(init["vision_hf"], select_layer=cfg.vision.select_layer,
                               select_feature=cfg.vision.select_feature, scan=cfg.vision.scan)[1])
  if init.get("llm_hf"):
    from llava_jax.checkpoint.convert.hf import load_hf_llm
    add("llm/", load_hf_llm(init["llm_hf"], scan=cfg.llm.scan, remat=cfg.llm.remat)[1])
  if init.get("from_run"):
    step, prev = ckpt.restore_params(init["from_run"], cfg, shardings=params_sharding)
    pattern = init.get("from_run_params", r"projector/.*")
    add("", prev, pattern)
    logging.info("initialising params matching %r from %s (step %d)", pattern, init["from_run"], step)
  return out


def place_params(params, overrides: dict[str, Any]):
  """``params`` with the named leaves replaced, each placed on the old leaf's sharding."""
  names = optim.param_names(params)
  unknown = sorted(set(overrides) - set(jax.tree.leaves(names)))
  if unknown:
    raise KeyError(f"initial weights for params the model does not have: {unknown[:10]}")

  def pick(name, leaf):
    if name not in overrides:
      return leaf
    new = overrides[name]
    if tuple(new.shape) != tuple(leaf.shape):
      raise ValueError(f"initial weight {name}: shape {tuple(new.shape)}, model wants {tuple(leaf.shape)}")
    return jax.device_put(jax.numpy.asarray(new, leaf.dtype), leaf.sharding)

  return jax.tree.map(pick, names, params)


def make_train_iterator(config, cfg: LlavaConfig, tokenizer, image_config):
  from llava_jax.data import pipeline, sources
  d = config.data
  source = sources.open_source(d.train, image_root=d.get("image_root"))
  return pipeline.make_dataset(
      source, tokenizer=tokenizer, template=d.template, image_config=image_config,
      image_token_id=cfg.image_token_id, num_image_tokens=cfg.num_image_tokens,
      max_len=d.max_len, max_images=d.get("max_images", 1),
      batch_size=config.train.batch_size // jax.process_count(), seed=config.seed,
      policy=d.get("policy", "skip"), worker_count=d.get("workers", 0), pack=d.get("pack", False),
      pack_bins=d.get("pack_bins", None))


def train(config: ml_collections.ConfigDict, workdir: str,
          eval_fn: Callable[[Any, int], dict] | None = None) -> dict:
  """Runs (or resumes) training; returns the last logged metrics."""
  from llava_jax.tokenizer import load_tokenizer
  prepare_synthetic(config)
  tokenizer = load_tokenizer(config.data.tokenizer)
  cfg = model_config(config, tokenizer)
  image_config = images_lib.image_config_for(cfg.vision.kind, cfg.vision.image_size,
                                             config.data.get("image_mode"))
  ckpt.write_run_info(workdir, model=cfg, tokenizer=config.data.tokenizer,
                      template=config.data.template, image=image_config,
                      config=config.to_dict())
  t = config.train
  mesh = sharding.make_mesh(dict(config.get("mesh", {"data": -1})))
  rules = tuple(tuple(r) for r in config.get("sharding_rules", ()))
  ocfg = optim.OptimConfig(
      learning_rate=config.optim.lr, warmup_ratio=config.optim.get("warmup_ratio", 0.03),
      final_lr_ratio=config.optim.get("final_lr_ratio", 0.0), total_steps=t.steps,
      weight_decay=config.optim.get("weight_decay", 0.0),
      grad_clip=config.optim.get("grad_clip", 1.0),
      lr_rules=tuple((r, m) for r, m in config.optim.lr_rules))
  step_cfg = StepConfig(grad_accum=t.get("grad_accum", 1), loss_norm=t.get("loss_norm", "token"),
                        target_fraction=t.get("target_fraction", None))

  checkpointer = ckpt.Checkpointer(workdir, keep=t.get("keep", 2), every=t.get("ckpt_every", 1000),
                                   async_save=t.get("async_checkpoint", True))
  latest = checkpointer.latest_step()
  abstract = jax.eval_shape(lambda: state_lib.init_params(cfg, jax.random.key(0)))
  optimizer = optim.make_optimizer(ocfg, abstract)
  trainable = optim.trainable_mask(abstract, ocfg)
  n_train = sum(int(np.prod(a.shape)) for a, m in zip(jax.tree.leaves(abstract), jax.tree.leaves(trainable)) if m)
  logging.info("model: %s trainable of %s params", f"{n_train:,}",
               f"{sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract)):,}")

  data = make_train_iterator(config, cfg, tokenizer, image_config)
  if latest is not None:
    shardings = state_lib.state_shardings(cfg, optimizer, mesh, rules)
    abstract_state = jax.eval_shape(
        lambda: state_lib.init_state(state_lib.init_params(cfg, jax.random.key(0)), optimizer,
                                     jax.random.key(0)))
    state, data_state = checkpointer.restore(latest, ckpt.abstract_like(abstract_state, shardings))
    if data_state is not None:
      data.set_state(data_state)
    logging.info("resumed from checkpoint %d", latest)
  else:  # random init directly into its shards, then the configured weights on top
    state, shardings = state_lib.create_state(cfg, optimizer, mesh, jax.random.key(config.seed),
                                              rules=rules)
    overrides = initial_params(config, cfg, shardings.params)
    if overrides:
      state = state.replace(params=place_params(state.params, overrides))
  start = int(state.step)

  example = {k: v for k, v in _peek(data).items() if k in MODEL_KEYS}
  train_step = state_lib.jit_train_step(make_train_step(cfg, optimizer, trainable, step_cfg),
                                        shardings, mesh, example)
  with sharding.use_mesh(mesh, rules):
    compiled = train_step.lower(state, example).compile()
  peak = (t.get("peak_tflops") or 0) * 1e12 or metrics_lib.measure_matmul_peak()
  groups = {g: any(jax.tree.leaves(trainable[g])) for g in ("img", "projector", "llm")}
  step_flops = flops_lib.train_step_flops(
      cfg, tokens=example["input_ids"].size * jax.process_count(),
      seq_len=example["input_ids"].shape[1],
      images=example["image_mask"].size * jax.process_count(), train_img=groups["img"],
      train_projector=groups["projector"], train_llm=groups["llm"])
  throughput = metrics_lib.Throughput(step_flops, peak, jax.device_count())
  writer = metrics_lib.MetricWriter(workdir, tensorboard=t.get("tensorboard", True))
  log_every, eval_every = t.get("log_every", 10), t.get("eval_every", 0)
  crash_after = t.get("crash_after_step", None)  # fault injection for resume tests
  last: dict = {}
  # A live bar on a terminal; in log files (pods, CI) a plain line per logged step instead.
  bar = tqdm(total=t.steps, initial=start, desc="train", dynamic_ncols=True, mininterval=1.0,
             disable=None if t.get("progress", True) else True)
  t_start = time.perf_counter()
  with sharding.use_mesh(mesh, rules):
    for step in range(start + 1, t.steps + 1):
      batch = next(data)
      model_batch = {k: batch[k] for k in MODEL_KEYS}
      state, m = compiled(state, model_batch)
      mask = batch["attention_mask"]  # segment ids: examples per row = the row's largest id
      throughput.update(int(np.count_nonzero(mask)), int(np.sum(np.max(mask, axis=1))))
      if step % log_every == 0 or step == t.steps or step == start + 1:
        m = jax.device_get(m)
        last = {**{k: float(v) for k, v in m.items()}, "lr": float(optim.current_lr(ocfg, step - 1)),
                **throughput.report(), "batch_fill": packing.fill(mask),
                **{f"skipped/{k}": v for k, v in data.counts().items()}}
        writer.write(step, last)
        bar.set_postfix(loss=f"{last['loss']:.4f}", acc=f"{last['token_accuracy']:.3f}")
        if bar.disable:
          per_step = (time.perf_counter() - t_start) / (step - start)
          logging.info("step %d/%d loss %.4f token_acc %.3f %.0f tokens/s, ETA %s", step, t.steps,
                       last["loss"], last["token_accuracy"], last["tokens_per_s"],
                       _hms(per_step * (t.steps - step)))
      bar.update(1)
      checkpointer.save(step, state, data.get_state(), force=step == t.steps)
      if eval_fn is not None and eval_every and (step % eval_every == 0 or step == t.steps):
        results = eval_fn(state.params, step)
        writer.write_eval(step, results)
        logging.info("eval at step %d: %s", step, results)
      if crash_after is not None and step == crash_after:
        os._exit(42)  # like a kill: no cleanup, an in-flight async save may be lost
  bar.close()
  checkpointer.close()
  writer.close()
  data.close()
  return last


def _hms(seconds: float) -> str:
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h}:{m:02d}:{s:02d}"


def _peek(data):
  """The first batch's shapes without consuming it (restores the iterator state)."""
  state = data.get_state()
  batch = next(data)
  data.set_state(state)
  return batch
