"""Every param's mesh sharding for the shipped configs, against checked-in snapshots.

A change to the logical-axis rules, a config's ``sharding_rules``, a module's axis names
or the param tree shows up as a diff of ``tests/sharding_snapshots/<config>.txt``. After
checking that the diff is what you meant, regenerate the files with

    UPDATE_SHARDING_SNAPSHOTS=1 bash launch/test.sh tests/test_sharding_snapshot.py

Each line: param path, shape, then per dimension ``logical axis:mesh axes`` (``None``: no
logical name; ``-``: kept whole; ``data+fsdp``: split over both), resolved with
``sharding.logical_to_sharding`` on an abstract ``data=1, fsdp=4, tensor=2`` mesh (no
devices; only the rules decide, not the sizes).
The models are built as ``train.setup`` builds them, without a tokenizer
(``model_config(config, None)``: the variant's vocabulary; tiny_shapes, whose vocabulary
comes from the tokenizer written with its data, is read with the variant's too).
"""

import importlib.util
import os

import jax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from llava_jax import sharding
from llava_jax.models.llava import init_params
from llava_jax.train import setup, state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SNAPSHOTS = os.path.join(ROOT, "tests", "sharding_snapshots")
UPDATE = os.environ.get("UPDATE_SHARDING_SNAPSHOTS") == "1"
MESH = AbstractMesh((1, 4, 2), sharding.MESH_AXES)
CONFIGS = {  # snapshot name -> (config file, get_config argument)
    "llava15_stage1_7b": ("llava15_stage1.py", "size=7b"),
    "llava15_stage2_7b": ("llava15_stage2.py", "size=7b"),
    "siglip_qwen2_stage1": ("siglip_qwen2.py", "stage=1"),
    "tiny_shapes_stage1": ("tiny_shapes.py", "stage1"),
}


def _config(file: str, arg: str):
  path = os.path.join(ROOT, "configs", file)
  spec = importlib.util.spec_from_file_location(file[:-3], path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config(arg)
  if config.model.get("vocab_from_tokenizer", False):
    config.model.vocab_from_tokenizer = False  # no tokenizer here: the variant's vocabulary
  return config


def _axes(mesh_axes) -> str:
  if mesh_axes is None:
    return "-"
  return mesh_axes if isinstance(mesh_axes, str) else "+".join(mesh_axes)


def _key(path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


def snapshot(file: str, arg: str) -> str:
  """The snapshot text of one config (see the module docstring)."""
  config = _config(file, arg)
  cfg = setup.model_config(config, None)
  rules = setup.sharding_overrides(config)
  logical = state.param_specs(cfg)
  mesh_specs = jax.tree.map(lambda s: s.spec, sharding.logical_to_sharding(logical, MESH, rules))
  shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  is_spec = lambda x: isinstance(x, PartitionSpec)
  lines = [f"# configs/{file}:{arg} on mesh {dict(MESH.shape)}; sharding_rules overrides: {list(rules)}"]
  for (path, names), spec, leaf in zip(
      jax.tree_util.tree_flatten_with_path(logical, is_leaf=is_spec)[0],
      jax.tree.leaves(mesh_specs, is_leaf=is_spec),
      jax.tree.leaves(shapes),
  ):
    names = tuple(names) + (None,) * (len(leaf.shape) - len(names))
    spec = tuple(spec) + (None,) * (len(leaf.shape) - len(spec))
    dims = " ".join(f"{n}:{_axes(a)}" for n, a in zip(names, spec))
    lines.append(f"{_key(path)}  {list(leaf.shape)}  {dims}")
  return "\n".join(lines) + "\n"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_param_shardings_match_the_snapshot(name):
  got = snapshot(*CONFIGS[name])
  path = os.path.join(SNAPSHOTS, f"{name}.txt")
  if UPDATE:
    os.makedirs(SNAPSHOTS, exist_ok=True)
    with open(path, "w") as f:
      f.write(got)
  assert os.path.exists(path), f"no snapshot {path}; write it with UPDATE_SHARDING_SNAPSHOTS=1"
  with open(path) as f:
    want = f.read()
  if got != want:
    import difflib

    diff = "".join(difflib.unified_diff(want.splitlines(True), got.splitlines(True), "snapshot", "now"))
    pytest.fail(
        f"param shardings of {name} differ from {path} (after checking the change, "
        f"regenerate with UPDATE_SHARDING_SNAPSHOTS=1):\n{diff[:6000]}"
    )


def test_every_snapshot_has_a_config():
  """A renamed or dropped config must not leave a stale snapshot that nothing checks."""
  found = sorted(f[:-4] for f in os.listdir(SNAPSHOTS) if f.endswith(".txt"))
  assert found == sorted(CONFIGS)
