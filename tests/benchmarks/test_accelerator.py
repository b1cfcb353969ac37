"""benchmarks/accelerator.py: the GPU checks run as a bare GPU machine would run them.

The smoke mode runs through the wrapper (``bash benchmarks/accelerator.sh OUT --smoke``)
in a fresh interpreter where the data/tokenizer packages a lent GPU machine lacks cannot be
imported (a ``sitecustomize`` meta-path finder raises ImportError for them), so the
script and every llava_jax module it imports must do without them.
"""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import accelerator  # noqa: E402
import accelerator_report as report_lib  # noqa: E402

# Not on the lent GPU machine (grain, tfds, ml_collections, array_record, sentencepiece),
# or there but not needed by the checks (torch, transformers, ...): neither may be imported.
HIDDEN = (
    "grain",
    "tensorflow",
    "tensorflow_datasets",
    "ml_collections",
    "array_record",
    "sentencepiece",
    "PIL",
    "jinja2",
    "tokenizers",
    "safetensors",
    "torch",
    "transformers",
    "orbax",
)

SITECUSTOMIZE = textwrap.dedent("""
    import atexit, json, os, sys, traceback

    HIDDEN = set(os.environ["HIDE_MODULES"].split(","))
    attempts = []

    class Hide:
      def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
          stack = [f.filename for f in traceback.extract_stack()]
          attempts.append({"module": name, "from_project": any(
              "/llava_jax/" in f or "/benchmarks/" in f for f in stack)})
          raise ImportError(f"{name} is hidden (not on the accelerator machine)")
        return None

    sys.meta_path.insert(0, Hide())

    @atexit.register
    def _report():
      with open(os.environ["HIDE_REPORT"], "w") as f:
        json.dump({"attempts": attempts, "loaded": sorted({m.split(".")[0] for m in sys.modules})}, f)
""")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  """Runs the smoke mode once; returns (results.json, results.md, log, hide report, files)."""
  tmp = tmp_path_factory.mktemp("accelerator")
  hook, out = tmp / "hook", tmp / "out"
  hook.mkdir()
  (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
  env = {
      **os.environ,
      "PYTHON": sys.executable,
      "PYTHONPATH": str(hook),
      "JAX_PLATFORMS": "cpu",
      "HIDE_MODULES": ",".join(HIDDEN),
      "HIDE_REPORT": str(tmp / "hidden.json"),
  }
  proc = subprocess.run(
      ["bash", os.path.join(ROOT, "benchmarks", "accelerator.sh"), str(out), "--smoke"],
      cwd=tmp,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  return (
      json.loads((out / "results.json").read_text()),
      (out / "results.md").read_text(),
      (out / "log.txt").read_text(),
      json.loads((tmp / "hidden.json").read_text()),
      sorted(p.name for p in out.iterdir()),
  )


@pytest.mark.slow
def test_smoke_runs_without_data_packages(smoke):
  data, _, _, hidden, _ = smoke
  assert {"jax", "flax", "optax", "numpy", "llava_jax"} <= set(hidden["loaded"])
  assert not set(HIDDEN) & set(hidden["loaded"])
  assert not [a for a in hidden["attempts"] if a["from_project"]], hidden["attempts"]
  assert data["complete"] and data["env"]["mode"] == "smoke"


@pytest.mark.slow
def test_smoke_measures_and_checks_every_section(smoke):
  data, md, log, _, files = smoke
  res = data["results"]
  cells = {(r["mask"], r["impl"]): r for r in res["attention"]}
  assert set(cells) == {(m, i) for m in ("causal", "segments") for i in ("pallas", "cudnn", "xla")}
  for mask in ("causal", "segments"):
    for impl in ("pallas", "xla"):
      r = cells[mask, impl]
      assert r["check_ok"] and r["err_out"] < accelerator.ATTN_TOL, r
      assert r["fwd_tflops"] > 0 and r["fwd_bwd_tflops"] > 0
    assert "cuDNN" in cells[mask, "cudnn"]["error"]  # no GPU: recorded, and the run went on
  train = {r["impl"]: r for r in res["train"]}
  assert set(train) == {"xla", "pallas", "cudnn"}
  for impl in ("xla", "pallas"):
    r = train[impl]
    assert r["check_ok"] and math.isfinite(r["loss"]) and r["tokens_per_s"] > 0, r
    assert r["mfu"] is None  # no bf16 peak for a CPU
  assert train["pallas"]["err_loss"] < accelerator.LOSS_TOL
  assert "error" in train["cudnn"]
  check, speed = res["decode"]
  assert check["what"] == "check" and check["check_ok"] and check["err_logits"] < accelerator.LOGIT_TOL
  assert speed["what"] == "speed" and speed["decode_tokens_per_s"] > 0 and speed["prefill_tokens_per_s"] > 0
  for heading in ("## Attention", "## Train step", "## Greedy decode", "## Errors", "## Row for benchmarks/RESULTS.md"):
    assert heading in md
  progress = [line for line in log.splitlines() if line.startswith("[")]
  assert len(progress) == len(res["attention"]) + len(res["train"]) + len(res["decode"])
  assert files == ["log.txt", "results.json", "results.md"]  # the device tool returns <= 8 files


def test_spent_budget_skips_every_cell(tmp_path, monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # smoke appends a flag
  assert accelerator.main(["--smoke", "--budget_s=0", f"--out={tmp_path}"]) == 0
  data = json.loads((tmp_path / "results.json").read_text())
  rows = [r for s in report_lib.SECTIONS for r in data["results"][s]]
  assert rows and all(r.get("skipped") == "time budget" for r in rows), rows
  assert data["env"]["command"] == "bash benchmarks/accelerator.sh OUT --smoke --budget_s=0"
  assert "skipped (time budget)" in (tmp_path / "results.md").read_text()


def test_budget_shares_and_estimates():
  budget = report_lib.Budget(100.0)
  assert budget.spent("attention")  # no section opened yet
  budget.open_section(0.5)
  assert not budget.spent("attention")
  budget.last_s["train"] = 120.0  # its previous cell would end past the total
  assert budget.spent("train") and not budget.spent("attention")


@pytest.mark.parametrize(
    "kind, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA GH200 480GB", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A10G", 70e12),
        ("TPU v5 lite", 197e12),
        ("TPU v5p", 459e12),
        ("cpu", None),
    ],
)
def test_chip_peak(kind, peak):
  assert report_lib.chip_peak_flops(kind) == peak


def test_report_rewritten_after_each_row(tmp_path):
  """A run cut short keeps what it measured: both files are complete after every row,
  and errors or skipped cells render next to figures."""
  env = {
      "mode": "default",
      "command": "bash benchmarks/accelerator.sh OUT",
      "platform": "gpu",
      "device_kind": "NVIDIA H200",
      "device_count": 1,
      "driver": "NVRM 570",
      "jax": "0.11.2",
      "jaxlib": "0.11.2",
      "plugins": {},
      "flax": "x",
      "optax": "y",
      "python": "3.12",
      "peak_bf16_flops": 989e12,
      "pallas_gpu_lowerings": {"triton": True},
      "project_gpu_lowering": "triton",
  }
  report = report_lib.Report(str(tmp_path), env, report_lib.Budget(100.0))
  att = dict(mask="causal", T=4096, B=4, err_out=1e-3, err_grad=2e-3, check_ok=True, fwd_ms=1.0, fwd_bwd_ms=3.0)
  report.add("attention", {**att, "impl": "pallas", "fwd_tflops": 400.0, "fwd_bwd_tflops": 360.0}, "x")
  assert "| causal | 4096 | 4 | pallas | 400.0 | 360.0 |" in (tmp_path / "results.md").read_text()
  report.add("attention", {**att, "impl": "cudnn", "fwd_tflops": 500.0, "fwd_bwd_tflops": 400.0}, "x")
  report.add(
      "train",
      {
          "impl": "pallas",
          "remat": "none",
          "B": 4,
          "T": 2048,
          "params_M": 1202.9,
          "error": "XlaRuntimeError: RESOURCE_EXHAUSTED: out of memory",
      },
      "x",
  )
  report.add(
      "decode",
      {"what": "speed", "impl": "xla", "B": 64, "prompt": 257, "new_tokens": 128, "skipped": "time budget"},
      "x",
  )
  md = (tmp_path / "results.md").read_text()
  assert "INCOMPLETE" in md and "RESOURCE_EXHAUSTED" in md and "skipped (time budget)" in md
  assert "4k 0.90x" in md  # Pallas / cuDNN fwd+bwd in the RESULTS.md row
  data = json.loads((tmp_path / "results.json").read_text())
  assert [len(data["results"][s]) for s in report_lib.SECTIONS] == [2, 1, 1] and not data["complete"]
