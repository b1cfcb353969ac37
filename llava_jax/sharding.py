"""Mesh axes and logical-axis rules: the one place that knows mesh axis names.

Modules name logical axes only (``batch, seq, embed, mlp, heads, kv_heads, head_dim,
vocab, layers`` for params, ``act_*`` for activations). ``LOGICAL_RULES`` maps them onto
the mesh ``("data", "fsdp", "tensor")``; configs may override individual rules. The same
code runs on 1 CPU or a TPU pod: only the mesh shape changes.
"""
from __future__ import annotations

import contextlib
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


def make_mesh(shape: Sequence[int] | Mapping[str, int] = (-1, 1, 1),
              devices: Sequence[jax.Device] | None = None,
              dcn: Sequence[int] | Mapping[str, int] | None = None) -> Mesh:
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
      raise ValueError(f"mesh dcn factors {dcn_shape} ask for {n_slices} slices; the devices "
                       f"form {len(slices)} (slice_index values {sorted(slices)})")
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
    raise ValueError(f"{what} shape {dict(zip(MESH_AXES, shape))} needs {int(np.prod(shape))} "
                     f"devices, have {n_devices}")
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


def logical_to_sharding(logical_specs: Any, mesh: Mesh,
                        overrides: Iterable[tuple[str, Any]] | None = None) -> Any:
  """Maps a pytree of logical ``PartitionSpec``s to ``NamedSharding``s on ``mesh``."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules(overrides))


def param_shardings(boxed_params: Any, mesh: Mesh,
                    overrides: Iterable[tuple[str, Any]] | None = None) -> Any:
  """Shardings for a (boxed, e.g. from ``jax.eval_shape(model.init, ...)``) param tree."""
  return logical_to_sharding(nn.get_partition_spec(boxed_params), mesh, overrides)


def batch_axes(overrides: Iterable[tuple[str, Any]] | None = None):
  """Mesh axes of the logical ``batch`` axis under the (overridden) rules."""
  for name, axes in rules(overrides):
    if name == "batch":
      return axes
  return None


def batch_sharding(mesh: Mesh, ndim: int,
                   overrides: Iterable[tuple[str, Any]] | None = None) -> NamedSharding:
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
  return NamedSharding(mesh, P())
