"""Mesh axes and logical-axis rules: the one place that knows mesh axis names.

Modules name logical axes only (``batch, seq, embed, mlp, heads, kv_heads, head_dim,
vocab, layers`` for params, ``act_*`` for activations). ``LOGICAL_RULES`` maps them onto
the mesh ``("data", "fsdp", "tensor")``; configs may override individual rules. The same
code runs on 1 CPU or a TPU pod: only the mesh shape changes.

Besides the rules: shardings of params (``param_shardings``), of state that mirrors them
(``mirror_shardings``: optimizer moments), of batches (``batch_sharding``) and replicated
values; and, for code traced under ``use_mesh`` (the Pallas kernels' ``shard_map``), the
enclosing mesh (``context_mesh``), its platform, and the mesh axes a logical axis may be
split over (``dividing_mesh_axes``).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# (logical axis, mesh axis or axes or None). First match wins, as in flax.linen.partitioning.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # Parameters.
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("patch_h", None),
    ("patch_w", None),
    ("channels", None),
    ("norm", None),
    # Activations.
    ("act_batch", ("data", "fsdp")),
    ("act_seq", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_head_dim", None),
    ("act_vocab", "tensor"),
    ("batch", ("data", "fsdp")),
    ("seq", None),
)


def make_mesh(
    shape: Sequence[int] | Mapping[str, int] = (-1, 1, 1),
    devices: Sequence[jax.Device] | None = None,
    dcn: Sequence[int] | Mapping[str, int] | None = None,
) -> Mesh:
  """Builds a ``("data", "fsdp", "tensor")`` mesh; one ``-1`` entry takes the remaining devices.

  ``dcn`` (multi-slice): how many slices each axis spans. ``shape`` is then the mesh of
  one slice (ICI) and the full mesh is ``shape * dcn`` per axis, built with
  ``mesh_utils.create_hybrid_device_mesh`` so that only the ``dcn`` factors cross the
  data-centre network (devices are grouped into slices by their ``slice_index``).

  Uses ``jax.sharding.Mesh`` (Auto axes), not ``jax.make_mesh`` (Explicit by default),
  because sharding here is driven by logical-axis annotations and ``jit`` shardings.
  """
  devices = list(devices if devices is not None else jax.devices())
  dcn_shape = _axis_list(dcn, default=1) if dcn is not None else [1] * len(MESH_AXES)
  if any(d < 1 for d in dcn_shape):
    raise ValueError(f"mesh dcn factors {dcn_shape} must be >= 1")
  n_slices = int(np.prod(dcn_shape))
  if n_slices > 1:
    if len(devices) % n_slices:
      raise ValueError(f"{len(devices)} devices cannot form {n_slices} slices (dcn {dcn_shape})")
    ici = _resolve(_axis_list(shape, default=1), len(devices) // n_slices, what="per-slice mesh")
    from jax.experimental import mesh_utils

    slices = {getattr(d, "slice_index", 0) for d in devices}
    if len(slices) != n_slices:
      raise ValueError(
          f"mesh dcn factors {dcn_shape} ask for {n_slices} slices; the devices "
          f"form {len(slices)} (slice_index values {sorted(slices)})"
      )
    dev_array = mesh_utils.create_hybrid_device_mesh(ici, dcn_shape, devices=devices)
    return Mesh(dev_array, MESH_AXES)
  shape = _resolve(_axis_list(shape, default=1), len(devices), what="mesh")
  try:
    from jax.experimental import mesh_utils

    dev_array = mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # pragma: no cover - CPU/unknown topologies
    dev_array = np.asarray(devices).reshape(shape)
  return Mesh(dev_array, MESH_AXES)


def _axis_list(shape, *, default: int) -> list[int]:
  if isinstance(shape, Mapping):
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
      raise ValueError(f"unknown mesh axes {sorted(unknown)}; expected a subset of {MESH_AXES}")
    shape = [shape.get(a, default) for a in MESH_AXES]
  shape = [int(s) for s in shape]
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh shape {shape} must have {len(MESH_AXES)} entries {MESH_AXES}")
  return shape


def _resolve(shape: list[int], n_devices: int, *, what: str) -> list[int]:
  """Fills the one ``-1`` entry; the product must be ``n_devices``."""
  shape = list(shape)
  if shape.count(-1) > 1:
    raise ValueError(f"{what} shape {shape}: at most one -1")
  if -1 in shape:
    rest = int(np.prod([s for s in shape if s != -1]))
    if n_devices % rest:
      raise ValueError(f"{what} shape {dict(zip(MESH_AXES, shape))} does not divide {n_devices} devices")
    shape[shape.index(-1)] = n_devices // rest
  if int(np.prod(shape)) != n_devices:
    raise ValueError(
        f"{what} shape {dict(zip(MESH_AXES, shape))} needs {int(np.prod(shape))} devices, have {n_devices}"
    )
  return shape


def rules(overrides: Iterable[tuple[str, Any]] | None = None) -> tuple[tuple[str, Any], ...]:
  """Logical-axis rules with ``overrides`` taking precedence over the defaults."""
  overrides = tuple(tuple(r) for r in (overrides or ()))
  names = {r[0] for r in overrides}
  return overrides + tuple(r for r in LOGICAL_RULES if r[0] not in names)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, overrides: Iterable[tuple[str, Any]] | None = None):
  """Context in which ``nn.with_logical_constraint`` annotations resolve against ``mesh``.

  Flax applies logical constraints only when an abstract mesh is set; the concrete
  ``with mesh`` context is kept for code (and Pallas ``shard_map``) that needs devices.
  """
  with mesh, jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules(overrides)):
    yield


def logical_to_sharding(logical_specs: Any, mesh: Mesh, overrides: Iterable[tuple[str, Any]] | None = None) -> Any:
  """Maps a pytree of logical ``PartitionSpec``s to ``NamedSharding``s on ``mesh``."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules(overrides))


def param_shardings(boxed_params: Any, mesh: Mesh, overrides: Iterable[tuple[str, Any]] | None = None) -> Any:
  """Shardings for a (boxed, e.g. from ``jax.eval_shape(model.init, ...)``) param tree."""
  return logical_to_sharding(nn.get_partition_spec(boxed_params), mesh, overrides)


def batch_axes(overrides: Iterable[tuple[str, Any]] | None = None):
  """Mesh axes of the logical ``batch`` axis under the (overridden) rules."""
  for name, axes in rules(overrides):
    if name == "batch":
      return axes
  return None


def batch_sharding(mesh: Mesh, ndim: int, overrides: Iterable[tuple[str, Any]] | None = None) -> NamedSharding:
  """Leading (batch) axis split as the ``batch`` rule says (default ``data`` x ``fsdp``)."""
  return NamedSharding(mesh, P(batch_axes(overrides), *([None] * (ndim - 1))))


def batch_shards(mesh: Mesh, overrides: Iterable[tuple[str, Any]] | None = None) -> int:
  """How many ways the batch axis is split (the global batch must be a multiple)."""
  axes = batch_axes(overrides)
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return int(np.prod([mesh.shape[a] for a in axes]))


def replicated(mesh: Mesh) -> NamedSharding:
  """The same full value on every device of ``mesh``."""
  return NamedSharding(mesh, P())


def mirror_shardings(tree: Any, params: Any, shardings: Any, mesh: Mesh) -> Any:
  """Shardings for a tree of state that mirrors the params (an optimizer state).

  A leaf of ``tree`` whose dict-key path ends with a param's path and that has that
  param's shape (Adam's mu/nu …) takes that param's sharding; every other leaf (step
  counts, scalars) is replicated.

  Args:
    tree: abstract state (e.g. ``jax.eval_shape(optimizer.init, params)``).
    params: the abstract param tree; ``shardings``: its NamedShardings, same structure.
  """
  by_path = {
      _dict_path(path): (s, leaf.shape)
      for (path, s), leaf in zip(jax.tree_util.tree_flatten_with_path(shardings)[0], jax.tree.leaves(params))
  }
  rep = replicated(mesh)

  def for_leaf(path, leaf):
    keys = _dict_path(path)
    for start in range(len(keys)):
      hit = by_path.get(keys[start:])
      if hit is not None and hit[1] == leaf.shape:
        return hit[0]
    return rep

  return jax.tree_util.tree_map_with_path(for_leaf, tree)


def _dict_path(path) -> tuple[str, ...]:
  return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


# ----------------------------------------------------------------------------- inside a trace


def context_mesh() -> Mesh | None:
  """The concrete mesh of the enclosing ``use_mesh`` (``with mesh:``), else of
  ``jax.set_mesh``; None outside both.

  The one private JAX access in the code base: jax 0.10.2 has no public getter for the mesh
  of a ``with mesh:`` context. ``jax.sharding.get_mesh()`` sees only ``jax.set_mesh`` and
  raises inside ``jit``; ``jax.sharding.get_abstract_mesh()`` has no devices, and a
  ``shard_map`` over the abstract mesh fails at run time on uncommitted inputs (no device
  assignment to lower ``sdy.GlobalToLocalShape`` against).
  """
  from jax._src import mesh as mesh_lib  # see the docstring: no public getter

  physical = mesh_lib.thread_resources.env.physical_mesh
  if not physical.empty:
    return physical
  concrete = mesh_lib.get_concrete_mesh()
  return None if concrete is None or concrete.empty else concrete


def context_platform() -> str | None:
  """The platform of the devices the enclosing mesh context compiles for (``context_mesh``,
  else the abstract mesh's device: ``jax.sharding.use_abstract_mesh``), or None outside one.

  An ahead-of-time compile for a TPU topology traces on a CPU host with the topology's
  devices in the mesh: this says "tpu" there, where ``jax.default_backend()`` says "cpu".
  """
  mesh = context_mesh()
  if mesh is not None:
    return mesh.devices.flat[0].platform
  abstract = jax.sharding.get_abstract_mesh()
  device = None if abstract is None or abstract.empty else abstract.abstract_device
  return getattr(device, "platform", None) or None


def dividing_mesh_axes(mesh: Mesh, logical: Sequence[str], sizes: Sequence[Sequence[int]]) -> tuple:
  """The mesh axes of each logical axis under the active rules (``use_mesh``), or None where
  their product on ``mesh`` does not divide each of that axis's ``sizes`` (it then stays whole).

  The names resolve together, as the dims of one array (a mesh axis is used once):
  ``dividing_mesh_axes(mesh, ("act_batch", "act_heads"), ((b,), (h, k)))``.
  """
  out = []
  for axes, dims in zip(nn.logical_to_mesh_axes(tuple(logical)), sizes):
    n = 1 if axes is None else (mesh.shape[axes] if isinstance(axes, str) else math.prod(mesh.shape[a] for a in axes))
    out.append(None if axes is None or any(d % n for d in dims) else axes)
  return tuple(out)
