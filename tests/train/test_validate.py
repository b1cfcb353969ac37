"""train.validate: the set-up errors name the param / config key, on 8 fake CPU devices."""

import os
import sys

import jax
import pytest

from llava_jax.train import validate
from llava_jax.train.setup import build_setup, model_config

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "configs"))
import tiny_shapes  # noqa: E402


def _config(**mesh):
  c = tiny_shapes.get_config("test")
  c.model.vocab_from_tokenizer = False
  if mesh:
    c.mesh = mesh
  return c


def _build(c):
  return build_setup(c, model_config(c, None))


def test_tiny_config_passes():
  c = _config()
  setup = _build(c)  # build_setup runs check_mesh and check_setup
  validate.check_setup(c, setup)
  assert dict(setup.mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}


def test_kv_heads_that_do_not_divide_the_tensor_axis():
  c = _config(data=2, fsdp=1, tensor=4)  # the tiny LLM has 2 kv heads (and 4 query heads)
  with pytest.raises(ValueError) as e:
    _build(c)
  msg = str(e.value)
  assert "logical axis 'kv_heads', size 2" in msg, msg
  assert "mesh axis 'tensor' (size 4)" in msg, msg
  assert "llm/" in msg and "dimension" in msg
  assert "('kv_heads', None)" in msg  # the rule override that fixes it
  assert "query" not in msg and "'heads', size 4" not in msg  # 4 heads divide: not listed


def test_qwen2_half_b_over_tensor_4_names_each_param():
  c = _config(data=2, fsdp=1, tensor=4)
  c.model.llm = "qwen2-0.5b"  # 14 heads, 2 kv heads
  c.model.llm_overrides = dict(num_layers=2)  # same shapes per layer, fewer layers
  with pytest.raises(ValueError) as e:
    _build(c)
  msg = str(e.value)
  assert "'kv_heads', size 2" in msg and "'heads', size 14" in msg, msg
  assert "does not divide 14" in msg and "does not divide 2" in msg


def test_sharding_rules_override_makes_it_pass():
  c = _config(data=2, fsdp=1, tensor=4)
  c.sharding_rules = [("kv_heads", None), ("act_kv_heads", None)]
  _build(c)


def test_global_batch_that_does_not_divide():
  c = _config()
  c.train.batch_size = 12  # 8 data shards
  with pytest.raises(ValueError) as e:
    _build(c)
  msg = str(e.value)
  assert "train.batch_size=12" in msg and "8 shards" in msg and "multiple of 8" in msg, msg
  assert "('data', 'fsdp')" in msg and "e.g. 16" in msg


def test_microbatch_that_does_not_divide():
  c = _config()
  c.train.batch_size, c.train.grad_accum = 8, 2  # microbatches of 4 rows over 8 shards
  with pytest.raises(ValueError) as e:
    _build(c)
  msg = str(e.value)
  assert "train.grad_accum=2 = 4 rows per microbatch" in msg, msg
  assert "multiple of 16" in msg
  c.train.batch_size, c.train.grad_accum = 9, 2
  with pytest.raises(ValueError, match="train.batch_size=9 is not a multiple of train.grad_accum=2"):
    _build(c)


def test_mesh_that_does_not_match_the_devices():
  c = _config(data=2, fsdp=2, tensor=1)
  with pytest.raises(ValueError) as e:
    _build(c)
  msg = str(e.value)
  assert "mesh.data=2 x mesh.fsdp=2 x mesh.tensor=1 needs 4 devices" in msg, msg
  assert "8 devices" in msg and "multiply to 8" in msg
  c = _config(data=3, fsdp=-1, tensor=1)
  with pytest.raises(ValueError, match="needs a multiple of 3 devices"):
    _build(c)


def test_dcn_factors_that_do_not_match_the_slices():
  c = _config(data=-1, fsdp=1, tensor=1, dcn_data=2)  # CPU devices form one slice
  with pytest.raises(ValueError) as e:
    validate.check_mesh(c, jax.devices(), what="8 CPU devices")
  msg = str(e.value)
  assert "mesh.dcn_data=2" in msg and "= 2 slices" in msg and "8 CPU devices has 1 slice" in msg, msg
