"""The training loop: config -> run files, set-up, data, state -> steps, logs, checkpoints, evals.

``train(config, workdir)`` reads top to bottom as the run does:

1. ``_prepare_run``: the embedded data (if the config asks for it), the tokenizer, the
   model config, image preprocessing, ``run.json``;
2. ``setup.build_setup``: mesh, shardings, optimizer, the jitted step (the same set-up
   ``llava_jax.compile`` compiles ahead of time);
3. ``_restore_or_init``: the latest checkpoint (params, optimizer, step, RNG and every
   process's data-iterator state) or a fresh state with the configured initial weights;
4. ``_compile``: the step, compiled once for the real batch shapes;
5. the loop: global batch from every process's rows, step, metrics, checkpoint, eval.

Restarting with the same command resumes from the latest checkpoint, so the loss
sequence continues exactly; on a different number of processes it continues at the
first global batch no process had started (``pipeline.resume_batch``). With several
processes (a pod; ``llava_jax.distributed``) every process runs this same function on
its own rows of each global batch; only process 0 writes metrics and ``run.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import re
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from llava_jax import distributed
from llava_jax import storage
from llava_jax.checkpoint import orbax as ckpt
from llava_jax.checkpoint.lock import WorkdirLock, WorkdirLockedError
from llava_jax.data import images as images_lib
from llava_jax.models.configs import LlavaConfig
from llava_jax.train import evaluation
from llava_jax.train import metrics as metrics_lib
from llava_jax.train import optim
from llava_jax.train import preemption
from llava_jax.train import run_config
from llava_jax.train.setup import TrainSetup, build_setup, model_config  # noqa: F401 (re-export)

# Config keys naming files the run reads, and (second set) directories it writes.
INPUT_KEYS = (
    "data.train",
    "data.val",
    "data.tokenizer",
    "data.image_root",
    "data.eval_questions",
    "data.eval_annotations",
    "init.hf_llava",
    "init.vision_hf",
    "init.llm_hf",
    "init.from_run",
)
OUTPUT_KEYS = ("data.synthetic.dir",)


def check_paths(config, workdir: str) -> None:
  """Refuses, before any work, a workdir, data or weights path whose scheme llava_jax
  cannot use (``storage.check``: which, and why)."""
  storage.check(workdir, "--workdir", write=True)
  for key in OUTPUT_KEYS:
    value = _dotted(config, key)
    if value:
      storage.check(value, f"config.{key}", write=True)
  for key in INPUT_KEYS:
    value = _dotted(config, key)
    for part in (value.split(",") if isinstance(value, str) else ()):
      if part:
        storage.check(part, f"config.{key}")


def _dotted(run: run_config.RunConfig, key: str):
  """``run.data.synthetic["dir"]`` for ``"data.synthetic.dir"`` (None where unset)."""
  node = run
  for name in key.split("."):
    node = node.get(name) if isinstance(node, dict) else getattr(node, name, None)
    if node is None:
      return None
  return node


def prepare_synthetic(config) -> None:
  """Writes the embedded dataset if the config asks for it and it is not there yet.

  Process 0 writes first; the others then write their own copy only if they do not see
  it (pod hosts have disks of their own; a local pod shares one).
  """
  syn = run_config.parse(config).data.synthetic
  if not syn:
    return
  marker = storage.join(syn["dir"], "tokenizer.model")
  multi_marker = storage.join(syn["dir"], "stage3.jsonl")  # written last by write_multi

  def write():
    from llava_jax.data import synthetic

    kwargs = {k: v for k, v in syn.items() if k != "dir"}
    if not storage.exists(marker):
      logging.info("writing the embedded synthetic dataset to %s", syn["dir"])
      synthetic.write_synthetic(syn["dir"], **kwargs)
    elif syn.get("multi") is not None and not storage.exists(multi_marker):  # a later stage asks for more
      logging.info("writing the multi-image and video tasks to %s", syn["dir"])
      synthetic.write_multi_tasks(syn["dir"], **kwargs)

  if distributed.is_primary():
    write()
  distributed.barrier("llava_jax:synthetic_data")
  if not distributed.is_primary():
    write()


def initial_params(init: run_config.InitOptions, cfg: LlavaConfig, params_sharding=None) -> dict[str, Any]:
  """Weights to start from, by ``/``-joined param name: a HF LLaVA, converted HF towers,
  and/or a previous run's params matching ``init.from_run_params``. Empty: random init.

  A previous run is restored straight onto ``params_sharding``; converted checkpoints
  arrive as host arrays and are placed leaf by leaf (``place_params``), so no device
  ever holds a full unsharded model.
  """
  out: dict[str, Any] = {}

  def add(prefix: str, tree, pattern: str = ".*"):
    for n, a in zip(jax.tree.leaves(optim.param_names(tree)), jax.tree.leaves(tree)):
      if re.fullmatch(pattern, prefix + n):
        out[prefix + n] = a

  if init.hf_llava:
    from llava_jax.checkpoint.convert.hf import load_hf_llava

    loaded_cfg, p = load_hf_llava(
        init.hf_llava, vision_overrides={"scan": cfg.vision.scan}, llm_overrides={"scan": cfg.llm.scan}
    )
    if loaded_cfg.llm.vocab_size != cfg.llm.vocab_size:
      raise ValueError(f"{init.hf_llava}: vocab {loaded_cfg.llm.vocab_size} != config {cfg.llm.vocab_size}")
    add("", p)
  if init.vision_hf:
    from llava_jax.checkpoint.convert.hf import load_hf_vision

    add(
        "img/",
        load_hf_vision(
            init.vision_hf,
            select_layer=cfg.vision.select_layer,
            select_feature=cfg.vision.select_feature,
            scan=cfg.vision.scan,
        )[1],
    )
  if init.llm_hf:
    from llava_jax.checkpoint.convert.hf import load_hf_llm

    add("llm/", load_hf_llm(init.llm_hf, scan=cfg.llm.scan, remat=cfg.llm.remat)[1])
  if init.from_run:
    step, prev = ckpt.restore_params(init.from_run, cfg, shardings=params_sharding)
    add("", prev, init.from_run_params)
    logging.info("initialising params matching %r from %s (step %d)", init.from_run_params, init.from_run, step)
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
    if isinstance(new, jax.Array) and new.sharding == leaf.sharding:
      return new.astype(leaf.dtype)
    return jax.device_put(np.asarray(new).astype(leaf.dtype), leaf.sharding)

  return jax.tree.map(pick, names, params)


@dataclasses.dataclass(frozen=True)
class Run:
  """What ``_prepare_run`` reads once: the config's tokenizer, model and image preprocessing,
  and what one example is for them (shared by the training and the eval pipelines)."""

  tokenizer: Any
  cfg: LlavaConfig
  image_config: images_lib.ImageConfig
  example: Any  # data.pipeline.ExampleSpec


def _prepare_run(config, workdir: str) -> Run:
  from llava_jax.tokenizer import load_tokenizer

  prepare_synthetic(config)
  tokenizer = load_tokenizer(config.data.tokenizer, template=config.data.template)
  cfg = model_config(config, tokenizer)
  image_config = images_lib.image_config_for(cfg.vision.kind, cfg.vision.image_size, config.data.image_mode)
  ckpt.check_run_info(workdir, cfg)  # every process: refuse before any work
  if distributed.is_primary():
    ckpt.write_run_info(
        workdir,
        model=cfg,
        tokenizer=config.data.tokenizer,
        template=config.data.template,
        image=image_config,
        config=run_config.to_dict(config),
    )
  from llava_jax.data.pipeline import ExampleSpec

  d = config.data
  example = ExampleSpec.for_model(
      cfg,
      tokenizer=tokenizer,
      template=d.template,
      image_config=image_config,
      max_len=d.max_len,
      max_images=d.max_images,
      over_budget=d.over_budget,
      video_frames=d.video_frames,
      max_videos=d.max_videos,
  )
  return Run(tokenizer, cfg, image_config, example)


def make_train_iterator(config, run: Run, *, start_batch: int = 0):
  """This process's rows of each global training batch (``data.pipeline``)."""
  from llava_jax.data import pipeline, sources

  d = config.data
  source = sources.open_source(d.train, image_root=d.image_root)
  return pipeline.make_dataset(
      source,
      pipeline.PipelineConfig(
          run.example,
          batch_size=config.train.batch_size,
          seed=config.seed,
          policy=d.policy,
          pack=d.pack,
          pack_bins=d.pack_bins,
          start_batch=start_batch,
          worker_count=d.workers,
          read_threads=d.read_threads or pipeline.default_read_threads(d.train, d.image_root),
      ),
  )


def _restore_or_init(config, run: Run, setup: TrainSetup, checkpointer: ckpt.Checkpointer):
  """(state, data iterator): from the newest intact checkpoint, or fresh."""
  latest = checkpointer.latest_step()
  if latest is None:  # random init directly into its shards, then the configured weights on top
    state = setup.init_state(jax.random.key(config.seed))
    overrides = initial_params(config.init, run.cfg, setup.shardings.params)
    if overrides:
      state = state.replace(params=place_params(state.params, overrides))
    return state, make_train_iterator(config, run)
  state, saved, step = checkpointer.restore_intact(
      setup.abstract_state(), on_corrupt=config.train.on_corrupt_checkpoint
  )
  if step is None:  # every checkpoint was corrupt and moved aside: start over
    return _restore_or_init(config, run, setup, checkpointer)
  return state, _resume_data(config, run, saved, step)


def _resume_data(config, run: Run, saved, step: int):
  from llava_jax.data import pipeline

  processes = saved.get("processes") if isinstance(saved, dict) else None
  n, me = jax.process_count(), jax.process_index()
  if processes is None:  # no data state, or one saved before per-process states
    data = make_train_iterator(config, run)
    if saved is not None:
      data.set_state(saved)
  elif len(processes) == n:
    mine = processes[me]
    data = make_train_iterator(config, run, start_batch=mine["position"]["start_batch"])
    data.set_state(mine)
  else:
    start = pipeline.resume_batch(processes)
    logging.info(
        "checkpoint %d was written by %d processes, resuming on %d: data continues at global batch %d",
        step,
        len(processes),
        n,
        start,
    )
    data = make_train_iterator(config, run, start_batch=start)
  logging.info("resumed from checkpoint %d", step)
  return data


def _compile(setup: TrainSetup, state, config):
  t0 = time.perf_counter()
  compiled = setup.lower(state, setup.batch_spec(config)).compile()
  logging.info("train step compiled in %.1f s", time.perf_counter() - t0)
  return compiled


def train(config: ml_collections.ConfigDict | run_config.RunConfig, workdir: str) -> dict:
  """Runs (or resumes) training; returns the last logged metrics ({} if already done).

  Holds the workdir's lock for the whole run (``checkpoint/lock.py``). SIGTERM / Ctrl-C
  stop after the current step with a checkpoint of it (``train.checkpoint_on_stop``) and
  a non-zero exit; any other error first lets an in-flight checkpoint finish. A
  non-finite loss or gradient is never applied nor saved (``train.on_nonfinite``).
  The config is read once, typed and validated (``run_config.parse``): an unknown or
  misspelt key stops here, before any work.
  """
  config = run_config.parse(config)
  check_paths(config, workdir)
  with _workdir_lock(workdir), preemption.StopSignal() as stop:
    return _train(config, workdir, stop)


@contextlib.contextmanager
def _workdir_lock(workdir: str):
  """Process 0 holds the lock; every process learns the outcome (and raises the same)."""
  lock = WorkdirLock(workdir)
  error = None
  if distributed.is_primary():
    try:
      lock.acquire()
    except WorkdirLockedError as e:
      error = str(e)
  error = distributed.gather_json(error)[0]
  if error is not None:
    raise WorkdirLockedError(error)
  try:
    yield lock
  finally:
    lock.release()


def _train(config, workdir: str, stop: preemption.StopSignal) -> dict:
  run = _prepare_run(config, workdir)
  setup = build_setup(config, run.cfg)
  trainable, total = setup.param_counts()
  logging.info(
      "model: %s trainable of %s params; mesh %s over %d processes",
      f"{trainable:,}",
      f"{total:,}",
      dict(setup.mesh.shape),
      jax.process_count(),
  )
  t = config.train
  checkpointer = ckpt.Checkpointer(workdir, keep=t.keep, every=t.ckpt_every, async_save=t.async_checkpoint)
  state, data = _restore_or_init(config, run, setup, checkpointer)
  start = int(state.step)
  compiled = _compile(setup, state, config)
  eval_fn = evaluation.make_eval(config, run.cfg, run.example, setup.shardings.params, setup.mesh, setup.rules)
  peak = (t.peak_tflops or 0) * 1e12 or metrics_lib.measure_matmul_peak()
  throughput = metrics_lib.Throughput(setup.step_flops(config), peak, jax.device_count())
  writer = metrics_lib.MetricWriter(workdir, tensorboard=t.tensorboard, resume_step=start)
  guard = NonFiniteGuard(t.on_nonfinite, t.max_nonfinite)
  log_every, eval_every = t.log_every, t.eval_every
  crash_after = t.crash_after_step  # fault injection for resume tests
  primary = distributed.is_primary()
  last: dict = {}
  # A live bar on a terminal; in log files (pods, CI) a plain line per logged step instead.
  bar = tqdm(
      total=t.steps,
      initial=start,
      desc="train",
      dynamic_ncols=True,
      mininterval=1.0,
      disable=None if t.progress and primary else True,
  )
  t_start = time.perf_counter()
  try:
    for step in range(start + 1, t.steps + 1):
      batch = next(data)
      state, m = compiled(state, setup.global_batch(batch))
      guard.add(step, m)
      mask = batch["attention_mask"]  # segment ids: examples per row = the row's largest id
      throughput.update(int(np.count_nonzero(mask)), int(np.sum(np.max(mask, axis=1))))
      final = step == t.steps
      if step % log_every == 0 or final or step == start + 1:
        guard.check()
        last = {
            **_log(step, jax.device_get(m), config, setup, throughput, data, mask),
            "skipped/nonfinite_steps": guard.skipped,
        }
        writer.write(step, last)
        bar.set_postfix(loss=f"{last['loss']:.4f}", acc=f"{last['token_accuracy']:.3f}")
        if bar.disable and primary:
          per_step = (time.perf_counter() - t_start) / (step - start)
          logging.info(
              "step %d/%d loss %.4f token_acc %.3f %.0f tokens/s, ETA %s",
              step,
              t.steps,
              last["loss"],
              last["token_accuracy"],
              last["tokens_per_s"],
              _hms(per_step * (t.steps - step)),
          )
      bar.update(1)
      stopping = stop.should_stop(step)
      save = stopping and t.checkpoint_on_stop
      if checkpointer.due(step, force=final or save):
        guard.check()  # never a checkpoint after an update that was not finite
        checkpointer.save(step, state, distributed.gather_json(data.get_state()), force=final or save)
      if stopping:
        checkpointer.wait()
        logging.warning(
            "stopped by %s after step %d%s",
            _signal_name(stop.signum),
            step,
            f"; checkpoint {step} written" if save else "",
        )
        stop.stop()
      if eval_fn is not None and eval_every and (step % eval_every == 0 or final):
        results = eval_fn(state.params, step)
        writer.write_eval(step, results)
        if primary:
          logging.info("eval at step %d: %s", step, results)
      if crash_after is not None and step == crash_after:
        os._exit(42)  # like a kill: no cleanup, an in-flight async save may be lost
  except BaseException as e:
    _explain(e, workdir)
    try:
      checkpointer.wait(timeout=None if jax.process_count() == 1 else 300.0)
    except Exception as wait_error:  # the in-flight save failed too: say so, raise the first
      _explain(wait_error, workdir)
      logging.error("the in-flight checkpoint did not complete: %s", str(wait_error)[:300])
    raise
  finally:
    bar.close()
    writer.close()
    data.close()
  checkpointer.close()
  return last


_STORAGE_ERRORS = {
    errno.ENOSPC: "the disk is full",
    errno.EROFS: "the file system is read-only",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EACCES: "permission denied",
}


def _explain(error: BaseException, workdir: str) -> None:
  """One clear line first for storage errors, which orbax otherwise buries in tracebacks."""
  seen, e = set(), error
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    why = _STORAGE_ERRORS.get(getattr(e, "errno", None))
    if why is None and "No space left on device" in str(e):
      why = _STORAGE_ERRORS[errno.ENOSPC]
    if why is not None:
      logging.error(
          "cannot write under %s: %s (%s). Checkpoints already committed are intact; "
          "free space or fix permissions, then rerun the same command to resume.",
          workdir,
          why,
          str(e)[:200],
      )
      return
    e = e.__cause__ or e.__context__


def _signal_name(signum) -> str:
  import signal

  return signal.Signals(signum).name if signum else "a signal"


class NonFiniteGuard:
  """Watches each step's ``nonfinite`` flag (the step already dropped such an update).

  ``check()`` (at log steps and before every checkpoint; it reads the flags of the
  steps since the last check, so no step synchronises on its own) raises
  FloatingPointError naming the first bad step under ``policy="stop"``, and under
  ``"skip"`` once more than ``max_skips`` updates were dropped.
  """

  def __init__(self, policy: str, max_skips: int):
    if policy not in ("stop", "skip"):
      raise ValueError(f"train.on_nonfinite must be 'stop' or 'skip', got {policy!r}")
    self.policy, self.max_skips, self.skipped = policy, int(max_skips), 0
    self._pending: list = []

  def add(self, step: int, m):
    self._pending.append((step, m["nonfinite"], m["loss"], m["grad_norm"]))

  def check(self):
    pending, self._pending = jax.device_get(self._pending), []
    for step, bad, loss, grad_norm in pending:
      if not bad:
        continue
      self.skipped += 1
      what = f"step {step}: loss {float(loss)}, gradient norm {float(grad_norm)}"
      if self.policy == "stop":
        raise FloatingPointError(
            f"non-finite {what}. The update was not applied and no checkpoint was written "
            "after it. Lower optim.lr (or optim.grad_clip), or set "
            "train.on_nonfinite=skip to drop such updates (at most train.max_nonfinite)."
        )
      logging.warning("non-finite %s: update skipped (%d so far)", what, self.skipped)
      if self.skipped > self.max_skips:
        raise FloatingPointError(
            f"{self.skipped} non-finite updates skipped, more than "
            f"train.max_nonfinite={self.max_skips} (last: {what})"
        )


def _log(step, m, config, setup: TrainSetup, throughput, data, mask) -> dict:
  """One metrics row; counters summed over processes (every process must call this)."""
  counts = {**data.counts(), **{f"adjusted/{k}": v for k, v in data.notes().items()}}  # notes: trained, adjusted
  report = throughput.report(
      reduce=distributed.sum_over_processes,
      extra=list(counts.values()) + [float(np.count_nonzero(mask)), float(mask.size)],
  )
  extra = report.pop("extra")
  summed = dict(zip(counts, (int(v) for v in extra[: len(counts)])))
  fill = extra[len(counts)] / max(extra[len(counts) + 1], 1.0)
  return {
      **{k: float(v) for k, v in m.items()},
      "lr": float(optim.current_lr(setup.optim, step - 1)),
      **report,
      "batch_fill": fill,
      **{k if k.startswith("adjusted/") else f"skipped/{k}": v for k, v in summed.items()},
  }


def _hms(seconds: float) -> str:
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h}:{m:02d}:{s:02d}"


__all__ = ["train", "prepare_synthetic", "initial_params", "place_params", "make_train_iterator", "model_config"]
