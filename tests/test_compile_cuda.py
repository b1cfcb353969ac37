"""llava_jax.compile for GPU topologies (cuda:<gpu>:HOSTSxGPUS): the tiny train step compiled
by the CUDA compiler on a CPU host, no GPU. Topology names are tested everywhere; compiles
need jax's CUDA plugin (the cuda_aot extra, ~5 GB installed), which CI does not install."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from llava_jax import compile as aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import tiny_shapes  # noqa: E402


def _has_cuda_plugin() -> bool:
  try:
    return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
  except ModuleNotFoundError:  # no jax_plugins namespace at all
    return False


needs_plugin = pytest.mark.skipif(
    not _has_cuda_plugin(),
    reason="GPU ahead-of-time compiles need jax's CUDA plugin (pip install '.[cuda_aot]', "
    "~5 GB installed; not in the test extra or CI)",
)


def _tiny(attn: str):
  c = tiny_shapes.get_config("test")
  c.model.vocab_from_tokenizer = False  # no tokenizer needed: the variant's vocabulary
  c.model.llm_overrides.attn_impl = attn
  c.model.vision_overrides.attn_impl = attn
  c.mesh = dict(data=1, fsdp=-1, tensor=1)
  return c


@pytest.mark.parametrize(
    "name, gpu, shape, n",
    [
        ("cuda:h100:1x8", "h100", "1x8", 8),
        ("cuda:H200:2x8", "h200", "2x8", 16),
        ("cuda:a100:1x4", "a100", "1x4", 4),
        ("gpu:a100-40gb:4x8", "a100-40", "4x8", 32),
    ],
)
def test_parse_gpu_topology(name, gpu, shape, n):
  t = aot.parse_topology(name)
  assert (t.platform, t.generation, t.shape, t.chips_per_slice) == ("cuda", gpu, shape, n)
  assert str(t) == f"cuda:{gpu}:{shape}" and t.chip is aot.GPUS[gpu]


@pytest.mark.parametrize(
    "name, slices, match",
    [
        ("cuda:v100:1x8", 1, "unknown GPU 'v100'"),
        ("cuda:h100:8", 1, "HOSTSxGPUS"),
        ("cuda:h100:0x8", 1, ">= 1"),
        ("cuda:h100:1x8", 2, "hosts in the name"),
    ],
)
def test_parse_gpu_topology_errors(name, slices, match):
  with pytest.raises(ValueError, match=match):
    aot.parse_topology(name, slices)


def test_target_config_describes_the_gpu():
  text = aot.GPUS["h100"].target_config()
  assert "device_memory_size: 84942979072" in text and "core_count: 132" in text
  assert "major: 9 minor: 0 feature_extension: ACCELERATED_FEATURES" in text  # sm_90a
  assert 'device_description_str: "NVIDIA H100 80GB HBM3"' in text
  assert "feature_extension" not in aot.GPUS["a100"].target_config()


def test_gpu_mem_fraction(monkeypatch):
  monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
  assert aot._gpu_fraction() == 0.75  # JAX's default
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", ".9")
  assert aot._gpu_fraction() == 0.9 and aot._gpu_fraction(0.5) == 0.5
  with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
    aot._gpu_fraction(1.5)


@needs_plugin
def test_gpu_devices():
  devices = aot.topology_devices(aot.parse_topology("cuda:h200:2x4"))
  assert len(devices) == 8 and devices[0].platform == "gpu"
  assert devices[0].device_kind == "NVIDIA H200"
  assert sorted(d.process_index for d in devices) == [0] * 4 + [1] * 4  # one process a host


@needs_plugin
@pytest.mark.slow
def test_pallas_step_has_the_triton_kernel(monkeypatch):
  """The CPU host compiles for GPU devices: attention must be the Triton kernel, not the
  interpreter, and the memory figure the buffer assignment's, against the allocator's pool."""
  monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
  r = aot.compile_step(_tiny("pallas"), aot.parse_topology("cuda:h100:1x4"))
  assert r["fits"] and r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  assert r["platform"] == "cuda" and r["triton_kernels"] > 0 and r["mosaic_kernels"] == 0
  assert r["hbm_bytes"] == 0.75 * aot.GPUS["h100"].memory_bytes
  m = r["memory"]
  assert "buffer assignment" in m["source"] and m["temporaries"] > 0
  assert m["total"] == m["arguments"] + m["outputs"] + m["temporaries"] + m["code"]
  assert r["collectives"]["all-gather"] > 0  # FSDP gathers the param shards
  assert len(r["differences_from_a_run"]) == 2  # no image-token callback, no Triton GEMMs
  text = aot.format_report(r, "tiny")
  assert "per-GPU memory" in text and "Triton (Pallas) kernel calls" in text


@needs_plugin
@pytest.mark.slow
def test_cli_gpu_exit_statuses(tmp_path):
  def cli(*args):
    out = tmp_path / "r.json"
    out.unlink(missing_ok=True)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "llava_jax.compile",
            "--config=configs/tiny_shapes.py:test",
            "--config.model.vocab_from_tokenizer=False",
            "--config.mesh.data=1",
            "--config.mesh.fsdp=-1",
            *args,
            f"--json={out}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    return proc, (json.loads(out.read_text()) if out.exists() else None)

  # A pool of 1e-5 of 40 GiB (~420 KiB) cannot hold the step: exit 1, with the fraction needed.
  proc, r = cli("--topology=cuda:a100-40:2x2", "--gpu_mem_fraction=0.00001")
  assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
  assert "does not fit (by " in proc.stdout and "XLA_PYTHON_CLIENT_MEM_FRACTION >= " in proc.stdout
  assert r["fits"] is False and r["chips"] == 4 and r["gpu_mem_fraction"] == 1e-5
  # 3-way tensor parallelism over 4 GPUs: refused before compiling, exit 2.
  proc, r = cli("--topology=cuda:a100-40:2x2", "--config.mesh.tensor=3")
  assert proc.returncode == 2, proc.stdout + proc.stderr[-3000:]
  assert r["fits"] is None and "cuda:a100-40:2x2" in proc.stderr
