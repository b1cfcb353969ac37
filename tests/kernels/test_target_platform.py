"""Pallas interpret mode follows the devices being compiled for, not the host's backend."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from llava_jax import sharding
from llava_jax.kernels import attention as attention_lib
from llava_jax.kernels import flash_attention as fa


def _tpu_devices(n):
  pytest.importorskip("libtpu", reason="TPU topology devices need libtpu (the test extra)")
  import os

  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies

  desc = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu", chip_config_name="default")
  return list(desc.devices)[:n]


def test_cpu_without_and_with_a_mesh():
  assert fa.target_platform() == jax.default_backend() == "cpu"
  with sharding.use_mesh(sharding.make_mesh((-1, 1, 1))):
    assert fa.target_platform() == "cpu"


@pytest.mark.parametrize("n", [1, 4])
def test_tpu_mesh_compiles_the_mosaic_kernel(n):
  """Under a mesh of TPU devices (one device included) the compiled program calls the
  Mosaic kernel; interpret mode would lower to plain HLO without a custom call."""
  mesh = sharding.make_mesh((n, 1, 1), devices=_tpu_devices(n))
  # float32: the tests set matmul precision "highest", which Mosaic refuses for bf16 dots.
  q = jax.ShapeDtypeStruct((n, 256, 2, 128), jnp.float32, sharding=NamedSharding(mesh, P("data")))
  f = lambda q: attention_lib.attention(q, q, q, impl="pallas").sum()
  with sharding.use_mesh(mesh):
    assert fa.target_platform() == "tpu"
    hlo = jax.jit(jax.grad(f)).lower(q).compile().as_text()
  assert hlo.count('custom_call_target="tpu_custom_call"') >= 2  # forward and backward


def test_explicit_interpret_wins():
  mesh = sharding.make_mesh((1, 1, 1), devices=_tpu_devices(1))
  q = jax.ShapeDtypeStruct((1, 128, 1, 128), jnp.float32, sharding=NamedSharding(mesh, P()))
  f = lambda q: fa.flash_attention(q, q, q, interpret=True)
  with sharding.use_mesh(mesh):
    hlo = jax.jit(f).lower(q).compile().as_text()
  assert "tpu_custom_call" not in hlo
