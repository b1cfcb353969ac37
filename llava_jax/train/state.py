"""Creating and sharding the train state on a mesh.

Param shardings come from the modules' logical axis names (``sharding.py`` rules);
optimizer-state leaves (Adam's mu/nu …) take the sharding of the param they mirror and
scalars (counts) are replicated (``sharding.mirror_shardings``). The same code runs on a
1-device mesh and on a pod.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from llava_jax import sharding
from llava_jax.models.configs import LlavaConfig
from llava_jax.models.llava import init_params
from llava_jax.train.step import TrainState, init_state


def param_specs(cfg: LlavaConfig) -> Any:
  """Tree of logical PartitionSpecs matching the (unboxed) param tree."""
  boxed = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), boxed=True))
  return nn.get_partition_spec(boxed)


def state_shardings(cfg: LlavaConfig, optimizer: optax.GradientTransformation, mesh: Mesh, rules=None) -> TrainState:
  """NamedShardings for every leaf of the TrainState."""
  p_shard = sharding.logical_to_sharding(param_specs(cfg), mesh, rules)
  abstract_params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
  opt_shard = sharding.mirror_shardings(abstract_opt, abstract_params, p_shard, mesh)
  replicated = sharding.replicated(mesh)
  return TrainState(step=replicated, params=p_shard, opt_state=opt_shard, rng=replicated)


def create_state(
    cfg: LlavaConfig, optimizer: optax.GradientTransformation, mesh: Mesh, rng, params: Any | None = None, rules=None
) -> tuple[TrainState, TrainState]:
  """Initialises (or places given ``params``) directly into their shards.

  Returns ``(state, shardings)``. Random init runs under jit with ``out_shardings`` so a
  large model is never materialised on one device.
  """
  shardings = state_shardings(cfg, optimizer, mesh, rules)
  if params is None:
    init = lambda r: init_state(init_params(cfg, r), optimizer, r)
    with sharding.use_mesh(mesh, rules):
      state = jax.jit(init, out_shardings=shardings)(rng)
    return state, shardings
  params = jax.device_put(params, shardings.params)
  with sharding.use_mesh(mesh, rules):
    state = jax.jit(lambda p, r: init_state(p, optimizer, r), out_shardings=shardings)(params, rng)
  return state, shardings


def jit_train_step(train_step: Callable, shardings: TrainState, mesh: Mesh, batch_example: dict):
  """``jax.jit`` with state/batch shardings and the old state's buffers donated."""
  batch_shardings = {k: sharding.batch_sharding(mesh, jnp.ndim(v)) for k, v in batch_example.items()}
  return jax.jit(
      train_step,
      in_shardings=(shardings, batch_shardings),
      out_shardings=(shardings, sharding.replicated(mesh)),
      donate_argnums=(0,),
  )
