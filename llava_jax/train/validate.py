"""Checks of a train set-up that fail early, in config terms, before anything compiles.

Without them the same mistakes surface as a jit ``IndivisibleError`` over a flattened
state path, or as a mesh-shape error that names no config key. Each message says what
was expected, what was found, and which config key to change:

    check_mesh(config, devices)   # before the mesh is built: mesh.* against the devices
    check_setup(config, setup)    # after build_setup: param shardings and the global batch
"""

from __future__ import annotations

import math
from typing import Sequence

import jax

from llava_jax import sharding

_MAX_LISTED = 5  # offending params listed in one message


class SetupError(ValueError):
  """The config cannot be laid over the devices (raised by every check here)."""


def _mesh_entries(config) -> tuple[dict[str, int], dict[str, int]]:
  """(ICI, DCN) factors per mesh axis from ``config.mesh`` (``run_config.MeshOptions``)."""
  from llava_jax.train import run_config

  m = run_config.parse(config).mesh
  return m.ici(), m.dcn()


def check_mesh(config, devices: Sequence[jax.Device], *, what: str = "the job") -> None:
  """Raises SetupError unless ``config.mesh`` can be laid over ``devices``.

  ``mesh.data * mesh.fsdp * mesh.tensor`` (one entry may be -1: the rest) must equal the
  devices per slice, and ``mesh.dcn_data * dcn_fsdp * dcn_tensor`` the number of slices
  (devices grouped by ``slice_index``). ``what`` names the devices in the message (e.g.
  the topology, ``"v5e:4x8 x 2 slices"``).
  """
  ici, dcn = _mesh_entries(config)
  n = len(devices)
  slices = len({getattr(d, "slice_index", 0) for d in devices})
  n_dcn = math.prod(dcn.values())
  keys = lambda prefix, f: " x ".join(f"{prefix}{a}={f[a]}" for a in sharding.MESH_AXES)
  if any(v < 1 for v in dcn.values()):
    raise SetupError(f"config mesh: {keys('mesh.dcn_', dcn)}; dcn factors must be >= 1")
  if n_dcn != slices:
    raise SetupError(
        f"config mesh: {keys('mesh.dcn_', dcn)} = {n_dcn} slices, but {what} has {slices} "
        f"slice(s) of {n // slices} devices; set the mesh.dcn_* factors to multiply to {slices}"
    )
  per_slice = n // slices
  if list(ici.values()).count(-1) > 1:
    raise SetupError(f"config mesh: {keys('mesh.', ici)}: at most one entry may be -1")
  fixed = math.prod(v for v in ici.values() if v != -1)
  if -1 in ici.values():
    ok = fixed > 0 and per_slice % fixed == 0
  else:
    ok = fixed == per_slice
  if not ok:
    where = f"{per_slice} devices per slice" if slices > 1 else f"{per_slice} devices"
    raise SetupError(
        f"config mesh: {keys('mesh.', ici)} needs "
        f"{'a multiple of ' if -1 in ici.values() else ''}{fixed} devices, but {what} has "
        f"{where}; change mesh.data/mesh.fsdp/mesh.tensor so they multiply to {per_slice} "
        f"(e.g. --config.mesh.fsdp=-1 takes every remaining device)"
    )


def _path(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _axes_tuple(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def check_params(setup) -> None:
  """Raises SetupError listing each param dimension that its mesh axes do not divide.

  Walks the params' logical PartitionSpecs (``train.state.param_specs``) alongside the
  shardings ``build_setup`` resolved from them with the config's rules, so the message
  names the param, its dimension, the logical axis and the mesh axis with its size.
  """
  from llava_jax.train import state as state_lib  # heavy (model code); imported on use

  logical = state_lib.param_specs(setup.cfg)
  shapes = setup.abstract_params()
  mesh = setup.mesh
  problems = []

  def visit(path, spec, shape, shard):
    for dim, entry in enumerate(shard.spec):
      axes = _axes_tuple(entry)
      ways = math.prod(mesh.shape[a] for a in axes)
      if ways > 1 and shape.shape[dim] % ways:
        name = spec[dim] if spec is not None and dim < len(spec) else None
        over = " x ".join(f"'{a}' (size {mesh.shape[a]})" for a in axes)
        problems.append(
            (
                name,
                (
                    f"param {_path(path)} {shape.dtype}{list(shape.shape)}: dimension {dim} "
                    f"(logical axis '{name}', size {shape.shape[dim]}) is sharded over mesh axis "
                    f"{over}, {ways} ways, which does not divide {shape.shape[dim]}"
                ),
            )
        )

  jax.tree_util.tree_map_with_path(
      visit,
      logical,
      shapes,
      setup.shardings.params,
      is_leaf=lambda x: x is None or isinstance(x, jax.sharding.PartitionSpec),
  )
  if problems:
    more = len(problems) - _MAX_LISTED
    names = sorted({str(name) for name, _ in problems})
    raise SetupError(
        "param shardings do not divide:\n  "
        + "\n  ".join(m for _, m in problems[:_MAX_LISTED])
        + (f"\n  ... and {more} more" if more > 0 else "")
        + f"\nchange the mesh (mesh.data/mesh.fsdp/mesh.tensor, now "
        f"{dict(mesh.shape)}) or keep these logical axes whole with config.sharding_rules, "
        f"e.g. {[(n, None) for n in names]}"
    )


def check_batch(config, setup) -> None:
  """Raises SetupError unless each microbatch splits evenly over the batch mesh axes.

  The global batch ``train.batch_size`` is cut into ``train.grad_accum`` microbatches
  along B; each must divide over the mesh axes of the logical ``batch`` rule (default
  ``data`` x ``fsdp``).
  """
  from llava_jax.train import run_config

  t = run_config.parse(config).train
  b, k = t.batch_size, t.grad_accum
  mesh, rules = setup.mesh, setup.rules
  axes = _axes_tuple(sharding.batch_axes(rules))
  shards = sharding.batch_shards(mesh, rules)
  if k < 1 or b % k:
    raise SetupError(f"train.batch_size={b} is not a multiple of train.grad_accum={k}; change one of them")
  micro = b // k
  if micro % shards:
    split = " x ".join(f"{a}={mesh.shape[a]}" for a in axes) or "none"
    step = shards * k
    suggest = -(-b // step) * step
    raise SetupError(
        f"train.batch_size={b} / train.grad_accum={k} = {micro} rows per microbatch do not "
        f"split over the batch mesh axes {axes} ({split}: {shards} shards); set "
        f"train.batch_size to a multiple of {shards * k} (e.g. {suggest}), lower "
        f"train.grad_accum, or split the batch over fewer devices (mesh.data/mesh.fsdp, or "
        f"the 'batch' rule in config.sharding_rules)"
    )


def check_setup(config, setup) -> None:
  """All checks that need the built set-up (``check_params``, ``check_batch``)."""
  check_params(setup)
  check_batch(config, setup)


__all__ = ["SetupError", "check_mesh", "check_params", "check_batch", "check_setup"]
