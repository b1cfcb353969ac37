"""Bookkeeping of benchmarks/accelerator.py: the machine's description, the time budget,
measurements that record their error instead of ending the run, timing, and the
results.json / results.md rewritten after every measurement."""

from __future__ import annotations

import gc
import importlib.util
import json
import math
import os
import platform
import statistics
import time
import traceback
from typing import Any, Callable

import jax
import numpy as np

SECTIONS = ("attention", "train", "decode")

GOALS = "Pallas attention >= 0.9x cuDNN fwd+bwd; train step >= 50% MFU on H100/H200"
GiB = 2**30

# Dense bf16 peak FLOP/s by device kind (first substring match wins; the more specific
# names first). NVIDIA: tensor-core dense bf16 (no sparsity). TPU: per chip.
PEAK_BF16 = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("H800", 989e12),
    ("H20", 148e12),
    ("B200", 2250e12),
    ("B100", 1750e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("V100", 125e12),
    ("TPU v6", 918e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 197e12),
    ("TPU v4", 275e12),
)


# ------------------------------------------------------------------ environment


def chip_peak_flops(device_kind: str) -> float | None:
  """Dense bf16 peak FLOP/s of one chip, or None for a kind not in ``PEAK_BF16`` (CPU)."""
  for name, peak in PEAK_BF16:
    if name.lower() in device_kind.lower():
      return peak
  return None


def _package_version(name: str) -> str | None:
  try:
    from importlib import metadata

    return metadata.version(name)
  except Exception:
    return None


def _driver_version() -> str | None:
  try:
    with open("/proc/driver/nvidia/version") as f:
      return f.readline().strip()
  except OSError:
    return None


def pallas_lowerings() -> dict[str, bool]:
  """Which Pallas GPU back ends this jax has (module names differ across versions)."""
  out = {}
  for name in ("triton", "mosaic_gpu"):
    try:
      out[name] = importlib.util.find_spec(f"jax.experimental.pallas.{name}") is not None
    except Exception:
      out[name] = False
  return out


def environment(mode: str, argv: list[str]) -> dict[str, Any]:
  dev = jax.devices()[0]
  plugins = {
      p: _package_version(p)
      for p in ("jax-cuda13-plugin", "jax-cuda12-plugin", "jax-cuda13-pjrt", "jax-cuda12-pjrt", "libtpu")
  }
  return {
      "mode": mode,
      "command": "bash benchmarks/accelerator.sh OUT " + " ".join(argv),
      "platform": dev.platform,
      "device_kind": dev.device_kind,
      "device_count": jax.device_count(),
      "driver": _driver_version(),
      "jax": jax.__version__,
      "jaxlib": _package_version("jaxlib"),
      "plugins": {k: v for k, v in plugins.items() if v},
      "flax": _package_version("flax"),
      "optax": _package_version("optax"),
      "python": platform.python_version(),
      "peak_bf16_flops": chip_peak_flops(dev.device_kind),
      "pallas_gpu_lowerings": pallas_lowerings(),
      "project_gpu_lowering": "triton (kernels/flash_gpu.py)",
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
  }


def matmul_tflops(n: int, repeats: int = 5) -> float | None:
  """The measured rate of an n x n x n bf16 matmul on random data, TFLOP/s: what the chip
  attains, next to the spec peak that MFU divides by (None if it fails)."""
  try:
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    f = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(f(a, b))
    return 2 * n**3 / time_call(f, a, b, repeats=repeats, min_call_s=0.05) / 1e12
  except Exception:
    return None


def device_memory() -> dict[str, float | None]:
  """Bytes in use and the process's peak so far, from the device (None where the backend
  has no ``memory_stats``, e.g. CPU, or an older jax)."""
  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:
    stats = {}
  get = lambda k: stats.get(k)  # noqa: E731
  return {
      "device_peak_bytes": get("peak_bytes_in_use"),
      "device_bytes_in_use": get("bytes_in_use"),
      "device_bytes_limit": get("bytes_limit"),
  }


def program_memory(compiled) -> dict[str, float | None]:
  """Argument, output, temporary bytes of one compiled program (None if unavailable)."""
  try:
    m = compiled.memory_analysis()
    arg, out, tmp = m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes
    alias = getattr(m, "alias_size_in_bytes", 0) or 0
    return {"program_bytes": arg + out + tmp - alias, "temp_bytes": tmp}
  except Exception:
    return {"program_bytes": None, "temp_bytes": None}


# ------------------------------------------------------------------ bookkeeping


class Budget:
  """When to stop starting measurements: a section may start one until its share of the
  total runs out (plus what earlier sections left), and none starts that, judged by the
  duration of the section's previous one, would end past the total."""

  def __init__(self, total_s: float):
    self.start, self.total = time.perf_counter(), total_s
    self.section_end = self.start
    self.last_s: dict[str, float] = {}

  def elapsed(self) -> float:
    return time.perf_counter() - self.start

  def open_section(self, share: float):
    self.section_end = max(self.section_end, time.perf_counter()) + share * self.total

  def spent(self, section: str | None = None) -> bool:
    now = time.perf_counter()
    expected_end = now + self.last_s.get(section, 0.0)
    return now >= self.section_end or expected_end - self.start > self.total


class Report:
  """Results so far, rewritten to ``results.json`` and ``results.md`` after each record."""

  def __init__(self, out_dir: str, env: dict[str, Any], budget: Budget):
    self.out_dir, self.env, self.budget = out_dir, env, budget
    self.rows: dict[str, list[dict]] = {s: [] for s in SECTIONS}
    self.complete = False
    os.makedirs(out_dir, exist_ok=True)

  def add(self, section: str, row: dict, line: str):
    row = {**row, "t_s": round(self.budget.elapsed(), 1)}
    self.rows[section].append(row)
    print(f"[{self.budget.elapsed():6.1f}s] {section} {line}", flush=True)
    self.write()

  def write(self):
    data = {
        "env": self.env,
        "goals": GOALS,
        "complete": self.complete,
        "elapsed_s": round(self.budget.elapsed(), 1),
        "results": self.rows,
    }
    _atomic_write(os.path.join(self.out_dir, "results.json"), json.dumps(data, indent=1, default=_json_default))
    try:
      text = markdown(data)
    except Exception as e:  # the JSON is written; a rendering bug must not end the run
      text = f"# Accelerator checks\n\nmarkdown rendering failed ({error_text(e)}); see results.json\n"
    _atomic_write(os.path.join(self.out_dir, "results.md"), text)


def _json_default(x):
  if isinstance(x, (np.generic,)):
    return x.item()
  return str(x)


def _atomic_write(path: str, text: str):
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


def error_text(e: BaseException) -> str:
  first = (str(e).strip().splitlines() or [""])[0]
  return f"{type(e).__name__}: {first[:300]}"


def measure(report: Report, section: str, key: dict, fn: Callable[[], dict], describe: Callable):
  """Runs one measurement: its row, or its error, or 'skipped' once the budget is spent."""
  label = " ".join(f"{k}={v}" for k, v in key.items())
  if report.budget.spent(section):
    report.add(section, {**key, "skipped": "time budget"}, f"{label}: skipped (time budget)")
    return None
  start = time.perf_counter()
  try:
    row = fn()
  except Exception as e:  # one failing cell (OOM, no cuDNN, a lowering error) must not end the run
    if os.environ.get("ACCELERATOR_TRACEBACKS"):
      traceback.print_exc()
    report.add(section, {**key, "error": error_text(e)}, f"{label}: ERROR {error_text(e)}")
    row = None
  else:
    report.add(section, {**key, **row}, f"{label}: {describe(row)}")
  report.budget.last_s[section] = time.perf_counter() - start
  gc.collect()
  return row


def time_call(fn: Callable, *args, repeats: int, min_call_s: float) -> float:
  """Seconds per call: the median over ``repeats`` of back-to-back calls blocked at the
  end (enough calls per repeat to last ``min_call_s``, so dispatch does not count).
  The caller has made the first (compiling) call."""
  t = time.perf_counter()
  jax.block_until_ready(fn(*args))
  one = time.perf_counter() - t
  inner = max(1, min(200, math.ceil(min_call_s / max(one, 1e-6))))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    out = None
    for _ in range(inner):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t) / inner)
  return statistics.median(times)


def max_rel_err(got, want) -> float:
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  scale = float(np.max(np.abs(want))) or 1.0
  return float(np.max(np.abs(got - want))) / scale


# ------------------------------------------------------------------ markdown


def _f(x, spec: str = ".1f", none: str = "-") -> str:
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return none
  return format(x, spec)


def _status(row: dict) -> str:
  if "skipped" in row:
    return "skipped (time budget)"
  if "error" in row:
    return "error"
  return {True: "ok", False: "**CHECK FAILED**", None: "no reference"}[row.get("check_ok")]


def summary_row(data: dict) -> str:
  """One row for benchmarks/RESULTS.md's 'Accelerator results' table."""
  env, res = data["env"], data["results"]
  ratios = []
  by = {(r["mask"], r["T"], r["impl"]): r for r in res["attention"] if "fwd_bwd_tflops" in r}
  for (mask, t, impl), r in sorted(by.items()):
    c = by.get((mask, t, "cudnn"))
    if impl == "pallas" and mask == "causal" and c:
      ratios.append(f"{t // 1024}k {r['fwd_bwd_tflops'] / c['fwd_bwd_tflops']:.2f}x")
  mfus = [f"{r['impl']}/{r['remat']} {r['mfu']:.0%}" for r in res["train"] if r.get("mfu") is not None]
  dec = [f"{r['B']}: {r['decode_tokens_per_s']:,.0f}" for r in res["decode"] if "decode_tokens_per_s" in r]
  return (
      f"| {env['device_kind']} | {env.get('driver') or '-'} | jax {env['jax']} | "
      f"{', '.join(ratios) or '-'} | {', '.join(mfus) or '-'} | {', '.join(dec) or '-'} | "
      f"`{env['command']}` |"
  )


def markdown(data: dict) -> str:
  env, res = data["env"], data["results"]
  plugins = ", ".join(f"{k} {v}" for k, v in env["plugins"].items()) or "none"
  lines = [
      f"# Accelerator checks ({env['mode']}{'' if data['complete'] else ', INCOMPLETE'})",
      "",
      f"Chip: {env['device_kind']} ({env['platform']}, {env['device_count']} device(s)); driver: "
      f"{env.get('driver') or '-'}; jax {env['jax']}, jaxlib {env['jaxlib']}, plugins: {plugins}; "
      f"flax {env['flax']}, optax {env['optax']}; python {env['python']}.",
      f"Peak used for MFU: {_f(env['peak_bf16_flops'] and env['peak_bf16_flops'] / 1e12, '.0f')} "
      f"TFLOP/s dense bf16 (spec); measured {env.get('matmul_n', '-')}^3 bf16 matmul: "
      f"{_f(env.get('matmul_bf16_tflops'), '.0f')} TFLOP/s. Pallas GPU lowerings in this jax: "
      f"{env['pallas_gpu_lowerings']}; the "
      f"project's: {env['project_gpu_lowering']}.",
      f"Command: `{env['command']}`; {data['elapsed_s']:.0f} s. Goals: {GOALS}.",
      "",
  ]
  cells = lambda s: [r for r in res[s] if r.get("what") != "section"]  # noqa: E731
  att = cells("attention")
  if att:
    lines += [
        "## Attention (bf16, causal; TFLOP/s of visible pairs, fwd+bwd = 3.5x fwd)",
        "",
        "| mask | T | B | impl | fwd TFLOP/s | fwd+bwd TFLOP/s | fwd ms | fwd+bwd ms | err out / grads | check |",
        "|---|---:|---:|---|---:|---:|---:|---:|---|---|",
    ]
    for r in att:
      lines.append(
          f"| {r['mask']} | {r['T']} | {r['B']} | {r['impl']} | {_f(r.get('fwd_tflops'))} "
          f"| {_f(r.get('fwd_bwd_tflops'))} | {_f(r.get('fwd_ms'), '.2f')} "
          f"| {_f(r.get('fwd_bwd_ms'), '.2f')} | {_f(r.get('err_out'), '.1e')} / "
          f"{_f(r.get('err_grad'), '.1e')} | {_status(r)} |"
      )
    lines.append("")
  tr = cells("train")
  if tr:
    lines += [
        "## Train step (LLaVA stage 2: projector + LLM trained, ViT frozen; bf16 compute, "
        "AdamW; attention impl in both towers)",
        "",
        "| impl | remat | B x T | params | step ms | tokens/s | MFU | program GiB "
        "| device peak GiB (so far) | compile s | loss / grad-norm err vs XLA | check |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in tr:
      gib = lambda x: None if x is None else x / GiB  # noqa: E731
      lines.append(
          f"| {r['impl']} | {r['remat']} | {r['B']} x {r['T']} | {r['params_M']:.0f}M "
          f"| {_f(r.get('step_ms'))} | {_f(r.get('tokens_per_s'), ',.0f')} | {_f(r.get('mfu'), '.1%')} "
          f"| {_f(gib(r.get('program_bytes')))} | {_f(gib(r.get('device_peak_bytes')))} "
          f"| {_f(r.get('compile_s'), '.0f')} | {_f(r.get('err_loss'), '.1e')} / "
          f"{_f(r.get('err_grad_norm'), '.1e')} | {_status(r)} |"
      )
    lines.append("")
  dec = cells("decode")
  if dec:
    lines += [
        "## Greedy decode (infer.sampler, bf16 weights, KV cache)",
        "",
        "| B | prompt (image + text) | new tokens | prefill tok/s | decode tok/s "
        "| ms / decode step | generate ms | status |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in dec:
      if r.get("what") != "speed":
        continue
      lines.append(
          f"| {r['B']} | {r['prompt']} | {r['new_tokens']} "
          f"| {_f(r.get('prefill_tokens_per_s'), ',.0f')} | {_f(r.get('decode_tokens_per_s'), ',.0f')} "
          f"| {_f(r.get('decode_ms_per_step'), '.2f')} | {_f(r.get('generate_ms'), '.0f')} "
          f"| {_status(r) if 'error' in r or 'skipped' in r else 'ok'} |"
      )
    for r in dec:
      if r.get("what") == "check":
        lines += [
            "",
            f"Check (batch {r.get('B', '-')}, {r.get('steps', '-')} steps): cached vs "
            f"uncached logits max err / max |logit| {_f(r.get('err_logits'), '.1e')}, greedy "
            f"agreement {_f(r.get('greedy_agreement'), '.0%')}: {_status(r)}.",
        ]
    lines.append("")
  errors = [(s, r) for s in SECTIONS for r in res[s] if "error" in r]
  if errors:
    lines += ["## Errors", "", "| section | cell | error |", "|---|---|---|"]
    for s, r in errors:
      cell = ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("error", "t_s"))
      lines.append(f"| {s} | {cell} | {r['error'].replace('|', '/')} |")
    lines.append("")
  lines += ["## Row for benchmarks/RESULTS.md", "", summary_row(data), ""]
  return "\n".join(lines)
