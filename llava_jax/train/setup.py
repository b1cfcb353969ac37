"""The train step's set-up, shared by ``llava_jax.train`` and ``llava_jax.compile``.

    setup = build_setup(config, model_config(config, tokenizer))          # real devices
    setup = build_setup(config, cfg, devices=topology_devices)            # AOT, no params
    compiled = setup.lower(setup.abstract_state(), setup.batch_spec()).compile()

Everything that decides *which program* a pod runs is made here, from the ConfigDict,
once: the model config, the mesh (``mesh.data/fsdp/tensor`` plus multi-slice
``mesh.dcn_*`` factors), the logical-axis rule overrides, the optimizer and its
trainable mask, the step config, the state and batch shardings and the jitted step.
Training lowers it with real arrays, compiling ahead of time lowers it with the
abstract state and batch spec: the compiled program is the trained one by construction.
No parameter is allocated here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from llava_jax import sharding
from llava_jax.models.configs import LLM_VARIANTS, VISION_VARIANTS, LlavaConfig, llava_config
from llava_jax.models.llava import init_params
from llava_jax.train import optim
from llava_jax.train import run_config
from llava_jax.train import state as state_lib
from llava_jax.train import validate
from llava_jax.data.anyres_example import sources_per_token
from llava_jax.train.step import MODEL_KEYS, StepConfig, TrainState, init_state, make_train_step


def model_config(config, tokenizer=None) -> LlavaConfig:
  """LlavaConfig from ``config.model`` (variants + overrides); vocab/ids from the tokenizer.

  Without a tokenizer (ahead-of-time compiles of configs whose tokenizer is not on this
  machine) the vocabulary is the variant's and the image token an id outside it.
  """
  m = run_config.parse(config).model
  vision = dataclasses.replace(VISION_VARIANTS[m.vision], **m.vision_overrides)
  llm_over = dict(m.llm_overrides)
  if m.vocab_from_tokenizer:
    if tokenizer is None:
      raise ValueError("model.vocab_from_tokenizer=True needs the tokenizer")
    llm_over["vocab_size"] = tokenizer.vocab_size
  llm = dataclasses.replace(LLM_VARIANTS[m.llm], **llm_over)
  token = m.image_token
  if isinstance(token, int):
    image_token_id = token
  else:
    image_token_id = tokenizer.token_to_id(token) if tokenizer is not None else None
  if image_token_id is None:
    image_token_id = llm.vocab_size  # outside the vocabulary: placeholders map to row 0
  pad = tokenizer.pad_id if tokenizer is not None and tokenizer.pad_id is not None else 0
  extra = {k: tuple(map(tuple, v)) if k == "image_grid_pinpoints" else v for k, v in (m.anyres or {}).items()}
  if m.video is not None:  # the video placeholder: a token of the tokenizer, an id, or past the vocabulary
    token = m.video.get("token", "<video>")
    video_id = token if isinstance(token, int) else tokenizer.token_to_id(token) if tokenizer is not None else None
    if video_id is None or video_id == image_token_id:
      video_id = llm.vocab_size + 1 if image_token_id == llm.vocab_size else llm.vocab_size
    extra.update(
        video_token_id=video_id,
        video_pooling=m.video.get("pooling", "bilinear"),
        video_pool_stride=m.video.get("pool_stride", 2),
    )
  return llava_config(vision, llm, projector=m.projector, image_token_id=image_token_id, pad_token_id=pad, **extra)


def optim_config(config) -> optim.OptimConfig:
  run = run_config.parse(config)
  o = run.optim
  return optim.OptimConfig(
      learning_rate=o.lr,
      warmup_ratio=o.warmup_ratio,
      final_lr_ratio=o.final_lr_ratio,
      total_steps=run.train.steps,
      weight_decay=o.weight_decay,
      grad_clip=o.grad_clip,
      lr_rules=o.lr_rules,
  )


def step_config(config) -> StepConfig:
  t = run_config.parse(config).train
  return StepConfig(grad_accum=t.grad_accum, loss_norm=t.loss_norm, target_fraction=t.target_fraction)


def mesh_from_config(config, devices=None) -> Mesh:
  """The ``("data", "fsdp", "tensor")`` mesh of ``config.mesh`` over ``devices``.

  ``mesh.dcn_data`` / ``dcn_fsdp`` / ``dcn_tensor`` (default 1) split an axis across
  slices (data-centre network) as well as within each slice (ICI); see
  ``sharding.make_mesh``.
  """
  m = run_config.parse(config).mesh
  return sharding.make_mesh(m.ici(), devices=devices, dcn=m.dcn())


def sharding_overrides(config) -> tuple[tuple[str, Any], ...]:
  return run_config.parse(config).sharding_rules


def batch_spec(config, cfg: LlavaConfig, *, batch_size: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes of one global training batch (the model keys of ``data.pipeline``'s batches).

  B = ``train.batch_size`` (global), T = ``data.max_len``, M = ``data.max_images``,
  S = the tower's image size; anyres configs: P tiles per slot and the layout keys
  (``data.anyres_example``); video slots (``data.max_videos`` V, ``data.video_frames`` F).
  """
  run = run_config.parse(config)
  b = batch_size or run.train.batch_size
  t, m, s = run.data.max_len, run.data.max_images, cfg.vision.image_size
  spec = {
      "input_ids": jax.ShapeDtypeStruct((b, t), jnp.int32),
      "labels": jax.ShapeDtypeStruct((b, t), jnp.int32),
      "attention_mask": jax.ShapeDtypeStruct((b, t), jnp.int32),
      "positions": jax.ShapeDtypeStruct((b, t), jnp.int32),
      "pixel_values": jax.ShapeDtypeStruct((b, m, s, s, 3), jnp.float32),
      "image_mask": jax.ShapeDtypeStruct((b, m), jnp.bool_),
  }
  if cfg.anyres:  # P tiles per slot and the slots' token layout (data.anyres_example)
    n, k = cfg.image_token_budget, sources_per_token(cfg)
    spec["pixel_values"] = jax.ShapeDtypeStruct((b, m, cfg.tiles_per_image, s, s, 3), jnp.float32)
    spec["image_index"] = jax.ShapeDtypeStruct((b, m, n, k), jnp.int32)
    spec["image_weight"] = jax.ShapeDtypeStruct((b, m, n, k), jnp.float32)
    spec["image_tokens"] = jax.ShapeDtypeStruct((b, m), jnp.int32)
  v, f = run.data.max_videos, run.data.video_frames
  if cfg.video_token_id is not None and v and f:  # video slots (data.example.VideoSpec)
    spec["pixel_values_videos"] = jax.ShapeDtypeStruct((b, v, f, s, s, 3), jnp.float32)
    spec["video_mask"] = jax.ShapeDtypeStruct((b, v), jnp.bool_)
  return spec


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """Everything that fixes the compiled train step (see the module docstring)."""

  cfg: LlavaConfig
  mesh: Mesh
  rules: tuple[tuple[str, Any], ...]
  optim: optim.OptimConfig
  step_cfg: StepConfig
  optimizer: optax.GradientTransformation
  trainable: Any  # bool tree over params
  shardings: TrainState  # NamedSharding per state leaf
  batch_shardings: dict[str, NamedSharding]
  global_batch_size: int
  train_step: Callable  # jitted (state, batch) -> (state, metrics)

  def abstract_params(self):
    return jax.eval_shape(lambda: init_params(self.cfg, jax.random.key(0)))

  def abstract_state(self) -> TrainState:
    """ShapeDtypeStructs of the train state, carrying their shardings (restore/AOT targets)."""
    shapes = jax.eval_shape(
        lambda: init_state(init_params(self.cfg, jax.random.key(0)), self.optimizer, jax.random.key(0))
    )
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, self.shardings)

  def batch_spec(self, config) -> dict[str, jax.ShapeDtypeStruct]:
    spec = batch_spec(config, self.cfg, batch_size=self.global_batch_size)
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.batch_shardings[k]) for k, v in spec.items()}

  def global_batch(self, local: dict) -> dict[str, jax.Array]:
    """This process's rows of a batch (numpy, ``data.pipeline``) -> global arrays.

    Every process passes its own rows (``global_batch_size / process_count`` of them);
    ``jax.make_array_from_process_local_data`` places them on the process's devices, so
    no host-local array reaches the jitted step.
    """
    out = {}
    for k in self.batch_shardings:
      v = local[k]
      shape = (self.global_batch_size,) + tuple(v.shape[1:])
      out[k] = jax.make_array_from_process_local_data(self.batch_shardings[k], v, shape)
    return out

  def init_state(self, rng) -> TrainState:
    """Random init directly into the state's shards (never a full copy on one device)."""
    state, _ = state_lib.create_state(self.cfg, self.optimizer, self.mesh, rng, rules=self.rules)
    return state

  def lower(self, state, batch):
    """``train_step.lower`` under the mesh and rules (arrays or ShapeDtypeStructs)."""
    with sharding.use_mesh(self.mesh, self.rules):
      return self.train_step.lower(state, batch)

  def trainable_groups(self) -> dict[str, bool]:
    return {g: any(jax.tree.leaves(self.trainable[g])) for g in ("img", "projector", "llm")}

  def step_flops(self, config) -> float:
    """Analytic model FLOPs of one step over the global batch (``train.flops``)."""
    from llava_jax.train import flops as flops_lib

    groups = self.trainable_groups()
    spec = batch_spec(config, self.cfg, batch_size=self.global_batch_size)
    return flops_lib.train_step_flops(
        self.cfg,
        tokens=int(np.prod(spec["input_ids"].shape)),
        seq_len=spec["input_ids"].shape[1],
        # every tile slot (anyres) and video frame goes through the tower
        images=sum(int(np.prod(spec[k].shape[:-3])) for k in ("pixel_values", "pixel_values_videos") if k in spec),
        train_img=groups["img"],
        train_projector=groups["projector"],
        train_llm=groups["llm"],
    )

  def param_counts(self) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    leaves = jax.tree.leaves(self.abstract_params())
    flags = jax.tree.leaves(self.trainable)
    total = sum(int(np.prod(a.shape)) for a in leaves)
    return sum(int(np.prod(a.shape)) for a, f in zip(leaves, flags) if f), total


def build_setup(config, cfg: LlavaConfig, *, devices=None) -> TrainSetup:
  """The train step of ``config`` on ``devices`` (default: every device of the job).

  Raises ValueError (``train.validate``) before anything compiles when ``config.mesh``
  does not match the devices, a param dimension does not divide over its mesh axes, or
  the global batch / microbatch does not divide over the batch axes. ``config`` is a
  ConfigDict or a ``run_config.RunConfig`` (read through ``run_config.parse``).
  """
  config = run_config.parse(config)
  validate.check_mesh(config, devices if devices is not None else jax.devices())
  mesh = mesh_from_config(config, devices)
  rules = sharding_overrides(config)
  ocfg, step_cfg = optim_config(config), step_config(config)
  abstract = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  optimizer = optim.make_optimizer(ocfg, abstract)
  trainable = optim.trainable_mask(abstract, ocfg)
  shardings = state_lib.state_shardings(cfg, optimizer, mesh, rules)
  batch_shardings = {k: sharding.batch_sharding(mesh, len(v.shape), rules) for k, v in batch_spec(config, cfg).items()}
  step = jax.jit(
      make_train_step(cfg, optimizer, trainable, step_cfg),
      in_shardings=(shardings, batch_shardings),
      out_shardings=(shardings, sharding.replicated(mesh)),
      donate_argnums=(0,),
  )
  setup = TrainSetup(
      cfg=cfg,
      mesh=mesh,
      rules=rules,
      optim=ocfg,
      step_cfg=step_cfg,
      optimizer=optimizer,
      trainable=trainable,
      shardings=shardings,
      batch_shardings=batch_shardings,
      global_batch_size=config.train.batch_size,
      train_step=step,
  )
  validate.check_setup(config, setup)
  return setup


__all__ = [
    "TrainSetup",
    "build_setup",
    "batch_spec",
    "model_config",
    "mesh_from_config",
    "optim_config",
    "step_config",
    "sharding_overrides",
    "MODEL_KEYS",
]
