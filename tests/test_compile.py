"""llava_jax.compile: the tiny train step compiled by libtpu for TPU topologies, on CPU."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("libtpu", reason="ahead-of-time TPU compiles need libtpu (the test extra)")

from llava_jax import compile as aot  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import tiny_shapes  # noqa: E402

TINY = ["--config=configs/tiny_shapes.py:test", "--config.model.vocab_from_tokenizer=False"]


def _tiny(attn: str, arg: str = "test", **mesh):
  c = tiny_shapes.get_config(arg)
  c.model.vocab_from_tokenizer = False  # no tokenizer needed: the variant's vocabulary
  c.model.llm_overrides.attn_impl = attn
  c.model.vision_overrides.attn_impl = attn
  c.mesh = mesh or dict(data=1, fsdp=-1, tensor=1)
  return c


@pytest.mark.parametrize(
    "name, gen, shape, chips",
    [
        ("v5e:4x8", "v5e", "4x8", 32),
        ("v5e-32", "v5e", "4x8", 32),
        ("v5e-256", "v5e", "16x16", 256),
        ("v4-32", "v4", "2x2x4", 16),
        ("v5p-32", "v5p", "2x2x4", 16),
        ("v5p:2x2x4", "v5p", "2x2x4", 16),
        ("v6e-8", "v6e", "2x4", 8),
        ("v5litepod-16", "v5e", "4x4", 16),
    ],
)
def test_parse_topology(name, gen, shape, chips):
  t = aot.parse_topology(name)
  assert (t.generation, t.shape, t.chips_per_slice) == (gen, shape, chips)


@pytest.mark.parametrize(
    "name, match",
    [
        ("v9:2x2", "unknown TPU generation"),
        ("v4:2x2", "3-D grid"),
        ("v4-33", "multiple of 2"),
        ("v5e-24", "no standard v5e slice"),
        ("tpu", "expected <gen>"),
    ],
)
def test_parse_topology_errors(name, match):
  with pytest.raises(ValueError, match=match):
    aot.parse_topology(name)


def test_topology_devices_and_slices():
  assert len(aot.topology_devices(aot.parse_topology("v4-32"))) == 16
  devices = aot.topology_devices(aot.parse_topology("v5e:2x2", slices=2))
  assert len(devices) == 8 and sorted({d.slice_index for d in devices}) == [0, 1]
  assert devices[0].platform == "tpu"


def test_usable_hbm_is_the_compilers():
  devices = aot.topology_devices(aot.parse_topology("v5e:2x2"))
  hbm, source = aot.usable_hbm(devices[0], aot.CHIPS["v5e"])
  assert source == "compiler-reported" and 15 * aot.GIB < hbm <= 16 * aot.GIB


def test_count_collectives_and_refusal_parsing():
  hlo = """
  %all-gather.1 = bf16[8,4]{1,0} all-gather(bf16[2,4]{1,0} %p), dimensions={0}
  %ags = (bf16[2], bf16[8]) all-gather-start(bf16[2] %q), dimensions={0}
  %agd = bf16[8] all-gather-done((bf16[2], bf16[8]) %ags)
  %rs = f32[2]{0} reduce-scatter(f32[8]{0} %g), dimensions={0}, to_apply=%add
  %cp = (f32[4], f32[4]) collective-permute-start(f32[4] %x), source_target_pairs={{0,1}}
  %ar = f32[] all-reduce(f32[] %l), to_apply=%add
  """
  assert aot.count_collectives(hlo) == {
      "all-gather": 2,
      "reduce-scatter": 1,
      "all-reduce": 1,
      "all-to-all": 0,
      "collective-permute": 1,
  }
  msg = (
      "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
      "temporaries (16.25G) exceeds available HBM (15.75G)."
  )
  assert aot._refusal_bytes(msg) == (16.25 * aot.GIB, 15.75 * aot.GIB)


def test_pallas_step_has_the_mosaic_kernel():
  """The CPU host compiles for TPU devices: attention must be the Mosaic kernel, not the
  interpreter (which lowers to plain HLO and would silently replace it)."""
  r = aot.compile_step(_tiny("pallas"), aot.parse_topology("v5e:2x2"))
  assert r["fits"] and r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  assert r["mosaic_kernels"] > 0
  m = r["memory"]
  assert m["total"] == m["arguments"] + m["outputs"] + m["temporaries"] + m["code"]
  assert "buffer assignment" in m["source"] and m["temporaries"] > 0
  ma = m["memory_analysis"]  # counts the donated state apart: our total is below its sum
  assert m["total"] < (
      ma["argument_size_in_bytes"]
      + ma["output_size_in_bytes"]
      + ma["temp_size_in_bytes"]
      + ma["generated_code_size_in_bytes"]
  )
  assert r["collectives"]["all-gather"] > 0  # FSDP gathers the param shards
  assert r["flops_per_step"] > 0 and r["compile_s"] > 0


def test_anyres_step_compiles():
  """An any-resolution step (P tiles per image slot, the layout gather; configs/llava_next.py,
  llava_onevision.py) compiles for TPU with the Mosaic kernels."""
  from llava_jax.train.setup import batch_spec, model_config

  c = _tiny("pallas", "test,anyres=1")
  cfg = model_config(c)
  spec = batch_spec(c, cfg)
  assert spec["pixel_values"].shape == (8, 1, cfg.tiles_per_image, 42, 42, 3) and cfg.tiles_per_image == 5
  assert spec["image_index"].shape == (8, 1, cfg.image_token_budget, 1)
  r = aot.compile_step(c, aot.parse_topology("v5e:2x2"))
  assert r["fits"] and r["mosaic_kernels"] > 0 and r["memory"]["temporaries"] > 0


@pytest.mark.slow
def test_two_slices_pallas():
  c = _tiny("pallas", data=1, fsdp=-1, tensor=1, dcn_data=2)
  r = aot.compile_step(c, aot.parse_topology("v5e:2x2", slices=2))
  assert r["fits"] and r["chips"] == 8 and r["slices"] == 2
  assert r["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
  assert r["mosaic_kernels"] > 0


def test_layout_errors_come_before_compiling():
  c = _tiny("xla")
  c.train.batch_size = 6  # 4 chips of fsdp
  with pytest.raises(ValueError, match="train.batch_size=6"):
    aot.compile_step(c, aot.parse_topology("v5e:2x2"))
  with pytest.raises(ValueError, match="= 1 slices, but v5e:2x2 x 2 slices has 2"):
    aot.compile_step(_tiny("xla"), aot.parse_topology("v5e:2x2", slices=2))


def _cli(*args, tmp_path):
  out = tmp_path / "r.json"
  proc = subprocess.run(
      [sys.executable, "-m", "llava_jax.compile", *TINY, *args, f"--json={out}"],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=600,
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  return proc, (json.loads(out.read_text()) if out.exists() else None)


@pytest.mark.slow
def test_cli_fits_with_xla_attention(tmp_path):
  proc, r = _cli("--topology=v5e-4", "--config.mesh.data=1", "--config.mesh.fsdp=-1", tmp_path=tmp_path)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
  assert "verdict       fits" in proc.stdout and "per-chip memory" in proc.stdout
  assert r["fits"] and r["mosaic_kernels"] == 0 and r["attn_impl"]["llm"] == "xla"
  assert r["topology"] == "v5e:2x2"


@pytest.mark.slow
def test_cli_does_not_fit(tmp_path):
  # 131072 rows of 128 tokens on 4 chips: the compiler refuses the temporaries.
  proc, r = _cli("--topology=v5e:2x2", "--config.train.batch_size=131072", tmp_path=tmp_path)
  assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
  assert "does not fit (by " in proc.stdout and "exceeds available HBM" in proc.stdout
  assert r["fits"] is False and r["over_by_bytes"] > 0
