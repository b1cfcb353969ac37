"""Training checkpoints (orbax ``CheckpointManager``) and the run directory layout.

A training workdir holds::

  run.json        model config, tokenizer path, template, image preprocessing, full config
  checkpoints/N/  params | train (opt_state, step, rng) | data (grain iterator state)
  metrics.jsonl   eval.json   tb/ (TensorBoard)

``params`` is its own item so inference restores only the weights; restoring takes an
abstract tree with shardings, so a checkpoint written on one mesh loads onto another.
Saves are async and atomic, so a run killed mid-save never loses the previous
checkpoint: locally orbax writes to a temporary directory and renames it on commit; on a
bucket (``gs://``, where rename is a copy) it writes in place and marks the step
committed with a last ``commit_success.txt``, and steps without one are not restored.
The workdir's own files go through ``llava_jax.storage``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from llava_jax import storage
from llava_jax.checkpoint.convert.common import write_json
from llava_jax.data.images import ImageConfig
from llava_jax.models.configs import LlavaConfig

RUN_FILE = "run.json"
CKPT_DIR = "checkpoints"


def check_run_info(workdir: str, model: LlavaConfig) -> None:
  """Refuses a workdir whose checkpoints hold a different model config than ``model``."""
  path = storage.join(workdir, RUN_FILE)
  if not storage.exists(path) or not storage.isdir(storage.join(workdir, CKPT_DIR)):
    return
  old = storage.read_json(path)
  if old.get("model") != json.loads(json.dumps(model.to_dict(), default=_jsonable)):
    raise ValueError(
        f"{workdir} holds checkpoints of a different model config; use a new --workdir (or delete it) to start over"
    )


def write_run_info(
    workdir: str, *, model: LlavaConfig, tokenizer: str, template: str, image: ImageConfig, config: dict | None = None
):
  """Writes ``run.json``; on resume, refuses a different model than the checkpoints hold."""
  path = storage.join(workdir, RUN_FILE)
  info = {
      "model": model.to_dict(),
      "tokenizer": storage.absolute(tokenizer),
      "template": template,
      "image": dataclasses.asdict(image),
      "config": config or {},
  }
  info = json.loads(json.dumps(info, default=_jsonable))
  check_run_info(workdir, model)
  storage.makedirs(workdir)
  write_json(info, path)


def _jsonable(o):
  if isinstance(o, (np.integer, np.floating)):
    return o.item()
  if isinstance(o, (tuple, set)):
    return list(o)
  return str(o)


def read_run_info(workdir: str) -> dict:
  path = storage.join(workdir, RUN_FILE)
  if not storage.exists(path):
    raise FileNotFoundError(f"{workdir} is not a training run directory (no {RUN_FILE})")
  return storage.read_json(path)


class Checkpointer:
  """Keep-N, every-K async checkpoints of ``{params, train, data}``.

  Every process calls ``save``/``restore`` (orbax writes each process's shards of the
  params and optimizer state). ``data`` is one JSON item holding every process's
  data-iterator state (``{"processes": [state_0, ...]}``, gathered before the save and
  written by process 0), so a run resumes with any number of processes.
  """

  def __init__(self, workdir: str, *, keep: int = 2, every: int = 1000, async_save: bool = True):
    self.every = every
    self.manager = ocp.CheckpointManager(
        storage.absolute(storage.join(workdir, CKPT_DIR)),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def due(self, step: int, *, force: bool = False) -> bool:
    """Whether ``save(step)`` would write (callers gather the data states only then)."""
    return force or step % self.every == 0

  def save(self, step: int, state, data_states: list | None = None, *, force: bool = False) -> bool:
    """Saves if ``step`` is a multiple of ``every`` (or ``force``); returns whether it did.

    ``data_states``: every process's data-iterator state, in process order.
    """
    if not self.due(step, force=force):
      return False
    train = {"opt_state": state.opt_state, "step": state.step, "rng": state.rng}
    args = {"params": ocp.args.StandardSave(state.params), "train": ocp.args.StandardSave(train)}
    if data_states is not None:
      args["data"] = ocp.args.JsonSave({"processes": list(data_states)})
    saved = self.manager.save(step, args=ocp.args.Composite(**args), force=force)
    if saved and jax.process_index() == 0:
      logging.info("checkpoint %d queued (async) under %s", step, self.manager.directory)
    return saved

  def restore(self, step: int, abstract_state, *, with_data: bool = True):
    """Restores onto the shardings carried by ``abstract_state`` (ShapeDtypeStructs).

    Returns ``(state, data or None)``: data is ``{"processes": [...]}`` (or, for
    checkpoints written before per-process states, the one iterator state).
    """
    train = {"opt_state": abstract_state.opt_state, "step": abstract_state.step, "rng": abstract_state.rng}
    args = {"params": ocp.args.StandardRestore(abstract_state.params), "train": ocp.args.StandardRestore(train)}
    items = self.manager.item_metadata(step)
    if with_data and "data" in (items.keys() if hasattr(items, "keys") else []):
      args["data"] = ocp.args.JsonRestore()
    out = self.manager.restore(step, args=ocp.args.Composite(**args))
    t = out["train"]
    state = abstract_state.replace(params=out["params"], opt_state=t["opt_state"], step=t["step"], rng=t["rng"])
    return state, (out["data"] if "data" in args else None)

  def restore_intact(self, abstract_state, *, on_corrupt: str = "fallback"):
    """The newest checkpoint that restores: ``(state, data, step)``.

    A checkpoint that fails to restore (truncated files, bad JSON, missing items) is
    named in the log; with ``on_corrupt="fallback"`` it is moved aside to
    ``checkpoints/N.corrupt`` (kept, not deleted) and the next older one is tried; with
    ``"raise"`` the error says which it is and how to remove it. ``step`` is None when
    none was left (training starts over).
    """
    if on_corrupt not in ("fallback", "raise"):
      raise ValueError(f"train.on_corrupt_checkpoint must be 'fallback' or 'raise', got {on_corrupt!r}")
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        state, data = self.restore(step, abstract_state)
        return state, data, step
      except Exception as e:  # orbax / tensorstore / JSON errors of a damaged checkpoint
        path = storage.join(os.fspath(self.manager.directory), str(step))
        if on_corrupt == "raise":
          raise RuntimeError(
              f"checkpoint {step} ({path}) cannot be restored: "
              f"{type(e).__name__}: {str(e)[:500]}. Remove it to resume from the "
              f"one before: rm -r {path}"
          ) from e
        logging.error(
            "checkpoint %d (%s) cannot be restored (%s: %s); moving it to %s.corrupt and trying the one before",
            step,
            path,
            type(e).__name__,
            str(e)[:300],
            path,
        )
        self._move_aside(path)
    return None, None, None

  def _move_aside(self, path: str):
    from llava_jax import distributed

    if distributed.is_primary() and storage.exists(path):
      target = path + ".corrupt"
      k = 1
      while storage.exists(target):
        target, k = f"{path}.corrupt{k}", k + 1
      storage.rename(path, target)
    distributed.barrier(f"llava_jax:corrupt:{path}")
    self.manager.reload()

  def wait(self, timeout: float | None = None):
    """Waits for an in-flight async save. With ``timeout`` (multi-process error paths,
    where the other processes may never reach orbax's commit barrier) gives up after that
    many seconds instead of hanging."""
    if timeout is None:
      self.manager.wait_until_finished()
      return
    import threading

    done = threading.Thread(target=self.manager.wait_until_finished, daemon=True)
    done.start()
    done.join(timeout)
    if done.is_alive():
      logging.error("the in-flight checkpoint did not commit within %.0f s; giving up", timeout)

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree, shardings):
  """ShapeDtypeStructs with the given shardings (restore targets)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def restore_params(workdir: str, cfg: LlavaConfig, step: int | None = None, shardings=None):
  """Only the ``params`` item of a run's checkpoint (latest by default)."""
  from llava_jax.models.llava import init_params

  manager = ocp.CheckpointManager(
      storage.absolute(storage.join(workdir, CKPT_DIR)), options=ocp.CheckpointManagerOptions(read_only=True)
  )
  saved = sorted(manager.all_steps())
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoints under {storage.join(workdir, CKPT_DIR)}")
  if step not in saved:
    raise FileNotFoundError(f"{workdir} has no checkpoint of step {step}; saved steps: {saved}")
  shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, shapes)
  out = manager.restore(
      step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_like(shapes, shardings)))
  )
  manager.close()
  return step, out["params"]


@dataclasses.dataclass
class Run:
  cfg: LlavaConfig
  params: Any
  tokenizer: Any
  template: str
  image: ImageConfig
  step: int


def load_run(workdir: str, step: int | None = None, *, shardings=None) -> Run:
  """Everything inference needs from a training workdir."""
  from llava_jax.tokenizer import load_tokenizer

  info = read_run_info(workdir)
  cfg = LlavaConfig.from_dict(info["model"])
  step, params = restore_params(workdir, cfg, step, shardings)
  image = ImageConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in info["image"].items()})
  return Run(
      cfg=cfg,
      params=params,
      tokenizer=load_tokenizer(info["tokenizer"]),
      template=info["template"],
      image=image,
      step=int(step),
  )
