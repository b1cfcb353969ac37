"""The run config is read once, typed and validated (``llava_jax/train/run_config.py``):
misspelt or unknown keys are refused with the nearest known one, required keys named,
wrong types and choices refused; every shipped config parses; defaults come from one place."""

import dataclasses
import glob
import importlib.util
import os
import subprocess
import sys

import pytest

from llava_jax.train import run_config
from llava_jax.train.optim import OptimConfig
from llava_jax.train.step import StepConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tiny(arg="test,root=/r"):
  spec = importlib.util.spec_from_file_location("tiny_shapes", f"{ROOT}/configs/tiny_shapes.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


@pytest.mark.parametrize("path", sorted(glob.glob(f"{ROOT}/configs/*.py")), ids=os.path.basename)
def test_every_shipped_config_parses_and_imports_no_sibling(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  run = run_config.parse(mod.get_config())
  assert run.train.steps > 0 and run.model.vision and run.data.template
  assert "sys.path" not in open(path).read()  # one skeleton, imported from the package


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("train.stepz", 3, "unknown config key train.stepz (did you mean train.steps?)"),
        ("data.polcy", "skip", "did you mean data.policy?"),
        ("optimizer", {}, "unknown config key optimizer (did you mean optim?)"),
        ("model.llm_overrides.num_layer", 2, "did you mean model.llm_overrides.num_layers?"),
        ("data.synthetic.n_trian", 8, "did you mean data.synthetic.n_train?"),
        ("mesh.fdsp", 2, "did you mean mesh.fsdp?"),
    ],
)
def test_misspelt_keys_are_refused_naming_the_nearest(key, value, message):
  c = _tiny().to_dict()
  node = c
  *parents, last = key.split(".")
  for p in parents:
    node = node[p]
  node[last] = value
  with pytest.raises(
      run_config.ConfigError,
      match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?").replace(".", r"\."),
  ):
    run_config.parse(c)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("train.steps", "10", "config key train.steps: expected int, got str '10'"),
        ("train.keep", True, "config key train.keep: expected int, got bool"),
        ("data.policy", "ignore", "config key data.policy: 'ignore'; expected one of ['skip', 'raise']"),
        ("train.on_nonfinite", "continue", "expected one of ['stop', 'skip']"),
        ("optim.lr_rules", [".*"], "expected a list of (name, value) pairs"),
        ("data.template", "vicuna_v2", "data.template: unknown conversation template 'vicuna_v2'"),
        ("data.template", "vicuna_v1@front", "data.template: template 'vicuna_v1@front': unknown image placement"),
    ],
)
def test_wrong_types_and_choices_are_refused(key, value, message):
  c = _tiny().to_dict()
  section, name = key.split(".")
  c[section][name] = value
  with pytest.raises(run_config.ConfigError) as e:
    run_config.parse(c)
  assert message in str(e.value)


def test_required_keys_are_named_and_placeholders_count_as_unset():
  c = _tiny().to_dict()
  del c["data"]["train"]
  with pytest.raises(run_config.ConfigError, match="config key data.train is required"):
    run_config.parse(c)
  with pytest.raises(run_config.ConfigError, match="config key model.vision is required"):
    run_config.parse(run_config.skeleton())  # the skeleton alone names what a file must set


def test_defaults_are_stated_once_and_filled():
  run = run_config.parse({k: v for k, v in _tiny().to_dict().items() if k != "mesh"})
  assert run.mesh == run_config.MeshOptions(data=-1)  # no mesh section: data parallel
  assert run_config.parse({**_tiny().to_dict(), "mesh": {"fsdp": -1, "data": 1}}).mesh.tensor == 1
  # The optimizer's and the step's defaults are theirs, referenced, not restated.
  assert run_config.OptimOptions(lr=1.0).warmup_ratio == OptimConfig().warmup_ratio
  assert run_config.TrainOptions(steps=1, batch_size=1).grad_accum == StepConfig().grad_accum
  # The skeleton holds every key of the schema, with the schema's defaults.
  sk = run_config.skeleton()
  for section in ("data", "train", "optim", "mesh", "init", "model"):
    cls = {f.name: f.type for f in dataclasses.fields(run_config.RunConfig)}[section]
    names = {f.name for f in dataclasses.fields(getattr(run_config, cls) if isinstance(cls, str) else cls)}
    assert names - {"synthetic", "anyres", "video"} <= set(sk[section]), section  # optional sections
  assert sk.train.keep == run_config.TrainOptions(steps=1, batch_size=1).keep
  # frozen: settings cannot drift during a run
  with pytest.raises(dataclasses.FrozenInstanceError):
    run.train.steps = 3


def test_parse_arg_refuses_unknown_names():
  assert run_config.parse_arg("size=13b", size="7b", data="/d") == {"size": "13b", "data": "/d"}
  assert run_config.parse_arg("stage2,root=/r", positional="stage", stage="stage1", root="x") == {
      "stage": "stage2",
      "root": "/r",
  }
  with pytest.raises(ValueError, match="unknown config argument 'szie' .*did you mean size"):
    run_config.parse_arg("szie=13b", size="7b")


def test_a_misspelt_key_in_a_config_file_stops_the_trainer_before_any_work(tmp_path):
  """Through the command a user types: a config file's typo fails at start, naming it."""
  cfg = tmp_path / "typo.py"
  cfg.write_text(
      "import importlib.util\n"
      f"spec = importlib.util.spec_from_file_location('t', {ROOT + '/configs/tiny_shapes.py'!r})\n"
      "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
      "def get_config(arg):\n"
      "  c = m.get_config(arg)\n"
      "  c.train.ckpt_evry = 5\n"
      "  return c\n"
  )
  proc = subprocess.run(
      [sys.executable, "-m", "llava_jax.train", f"--config={cfg}:test,root={tmp_path}/r", f"--workdir={tmp_path}/w"],
      capture_output=True,
      text=True,
      timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert proc.returncode != 0
  assert "unknown config key train.ckpt_evry (did you mean train.ckpt_every?)" in proc.stderr
  assert not os.path.exists(f"{tmp_path}/r/data")  # nothing written: refused first
