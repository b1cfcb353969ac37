r"""Ahead-of-time compile of the train step for a TPU or GPU topology, on a host without one.

  python -m llava_jax.compile --config=configs/llava15_stage2.py:size=7b --topology=v5e:4x8
  python -m llava_jax.compile --config=configs/llava15_stage2.py:size=13b --topology=v5e-32 \
      --slices=2 --config.mesh.dcn_data=2 --json=/tmp/13b.json
  python -m llava_jax.compile --config=configs/llava15_stage2.py:size=7b --topology=cuda:h100:2x8

The step is the one training runs: ``train.setup.build_setup`` over the abstract devices
of the topology (``jax.experimental.topologies``: libtpu, ``pip install '.[tpu]'``, or
the CUDA plugin, ``pip install '.[cuda_aot]'``), lowered with abstract state and batch
shapes (no parameter is allocated, no tokenizer read) and compiled by that platform's
compiler. On TPU a compile that succeeds is a real fit check: XLA refuses a program
whose buffers exceed the chip's HBM. The GPU compiler refuses nothing; the verdict
there compares the same buffer-assignment figure with the pool JAX's GPU allocator
takes (``XLA_PYTHON_CLIENT_MEM_FRACTION`` of the device memory, 0.75 by default).
Prints per-chip memory from the compiler's buffer assignment, analytic FLOPs, the
collectives in the HLO, the Pallas kernels (Mosaic on TPU, Triton on GPU), compile
seconds and a verdict.

GPU compiles differ from a GPU run's in two ways, both stated in the report: Triton GEMM
fusions are off (``xla_gpu_enable_triton_gemm=False``: their autotuning needs a GPU
and fails without one, "Couldn't find output tile sizes"; cuBLAS GEMMs instead), and
the in-jit image-token check is left out (a host callback: it compiles only against a
GPU client; scalar-sized, no device memory).

Exit status: 0 fits, 1 does not fit (the compiler's refusal included), 2 the config
cannot be laid over the topology (``train.validate``: mesh, param or batch division);
any other failure raises (a traceback, exit 1 from Python).

``--topology``: ``v4:2x2x4``, ``v5p:2x2x4``, ``v5e:4x8``, ``v6e:2x4`` (chips per axis) or
the Cloud names ``v4-32``, ``v5p-32`` (TensorCores: 16 chips), ``v5e-32``, ``v6e-8``
(chips). ``--slices=N`` makes N such slices joined by the data-centre network; the
config's ``mesh.dcn_*`` factors must then multiply to N. GPUs: ``cuda:<gpu>:HOSTSxGPUS``
(``cuda:h100:1x8``, ``cuda:h200:2x8``; ``gpu`` in ``GPUS``: h100, h200, a100, a100-40).

What lives where. This module: the compile (``compile_step``), the figures read from it
(buffer assignment, collectives, kernels), the report and the command line.
``llava_jax.topologies``: the hardware, the chip and GPU tables (``CHIPS``, ``GPUS``),
topology names (``parse_topology``), their abstract devices (``topology_devices``) and
the memory a program may use (``usable_hbm``, ``_gpu_fraction``); the names tests and
callers read as ``compile.<name>`` are re-exported here.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import re
import sys
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags

from llava_jax.topologies import GIB, Topology, parse_topology, topology_devices, usable_hbm
from llava_jax.topologies import _gpu_fraction, _refusal_bytes

# Re-exported: the hardware tables lived here before llava_jax.topologies (tests and callers
# read compile.CHIPS, compile.GPUS, ...).
from llava_jax.topologies import CHIPS, DEFAULT_GPU_MEM_FRACTION, GPUS, Chip, Gpu  # noqa: F401

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file (get_config(arg))", lock_config=True)
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "TPU topology (v5e:4x8, v4-32, v5p:2x2x4 …) or GPUs, cuda:<gpu>:HOSTSxGPUS (cuda:h100:1x8)"
)
_SLICES = flags.DEFINE_integer("slices", 1, "number of TPU slices (multi-slice over DCN)")
_GPU_MEM_FRACTION = flags.DEFINE_float(
    "gpu_mem_fraction",
    None,
    "GPU topologies: the share of each GPU's memory the run's "
    "allocator takes; default $XLA_PYTHON_CLIENT_MEM_FRACTION, else JAX's 0.75",
)
_JSON = flags.DEFINE_string("json", None, "also write the figures to this JSON file")
flags.mark_flags_as_required(["config", "topology"])

_COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_OPCODE = re.compile(r"\s(" + "|".join(_COLLECTIVES) + r")(-start)?\(")


def count_collectives(hlo_text: str) -> dict[str, int]:
  """Collective instructions in optimized HLO text, by kind (async ``-start`` counted,
  ``-done`` not). A static count: a scanned layer body's collectives count once."""
  counts = dict.fromkeys(_COLLECTIVES, 0)
  for m in _OPCODE.finditer(hlo_text):
    counts[m.group(1)] += 1
  return counts


def _buffer_assignment_hbm(dump_dir: str) -> int | None:
  """Bytes of HBM (memory space 0) in the compiler's buffer assignment of the step."""
  for path in sorted(glob.glob(os.path.join(dump_dir, "*memory-usage-report.txt"))):
    text = open(path).read()
    m = re.search(r"Memory Space: default \(color=0\)\s*\nTotal bytes: (\d+)", text)
    if m:
      return int(m.group(1))
  return None


def compile_step(config, topo: Topology, devices=None, *, gpu_mem_fraction=None) -> dict:
  """Builds the train set-up on ``topo``, compiles it, returns the report as a dict.

  Raises ``train.validate.SetupError`` (a ValueError) when the config cannot be laid
  over the topology; a compiler refusal for lack of memory is a report with ``fits=False``.
  ``gpu_mem_fraction``: GPU topologies, see ``_gpu_fraction``.
  """
  from llava_jax.train import validate
  from llava_jax.train.setup import build_setup, model_config

  gpu = topo.platform == "cuda"
  fraction = _gpu_fraction(gpu_mem_fraction) if gpu else None
  devices = devices if devices is not None else topology_devices(topo)
  validate.check_mesh(config, devices, what=str(topo))  # build_setup checks it too, unnamed
  cfg = model_config(config, None)
  differences = []
  if gpu and cfg.check_image_tokens:
    # jax.debug.callback's GPU lowering registers the callback with the live GPU backend
    # (callback.emit_python_callback): "Unknown backend: 'gpu' requested" without one.
    cfg = dataclasses.replace(cfg, check_image_tokens=False)
    differences.append(
        "in-jit image-token check left out (a host callback, which compiles "
        "only against a GPU client; scalar-sized, no device memory)"
    )
  setup = build_setup(config, cfg, devices=devices)
  if gpu:
    hbm = fraction * topo.chip.memory_bytes
    hbm_source = (
        f"JAX's GPU allocator pool, {fraction:g} of {_gib(topo.chip.memory_bytes)}: XLA_PYTHON_CLIENT_MEM_FRACTION"
    )
    differences.append(
        "Triton GEMM fusions off (xla_gpu_enable_triton_gemm=False: their "
        "autotuning needs a GPU); GEMMs are cuBLAS calls"
    )
  else:
    hbm, hbm_source = usable_hbm(devices[0], topo.chip)
  trainable, total = setup.param_counts()
  spec = setup.batch_spec(config)
  b, t = spec["input_ids"].shape
  flops = setup.step_flops(config)
  chips = len(devices)
  report = {
      "topology": str(topo),
      "generation": topo.generation,
      "chips": chips,
      "slices": topo.slices,
      "device_kind": devices[0].device_kind,
      "mesh": {k: int(v) for k, v in setup.mesh.shape.items()},
      "global_batch": int(b),
      "seq_len": int(t),
      "grad_accum": setup.step_cfg.grad_accum,
      "params": total,
      "trainable_params": trainable,
      "trainable_groups": setup.trainable_groups(),
      "attn_impl": {"llm": cfg.llm.attn_impl, "vision": cfg.vision.attn_impl},
      "hbm_bytes": hbm,
      "hbm_source": hbm_source,
      "hbm_nominal_gib": topo.chip.hbm_gib,
      "flops_per_step": flops,
      "flops_per_chip": flops / chips,
      "ideal_step_s": flops / (chips * topo.chip.peak_tflops * 1e12),
      "peak_tflops_per_chip": topo.chip.peak_tflops,
      "platform": topo.platform,
      "differences_from_a_run": differences,
  }
  if gpu:
    report.update(gpu_mem_fraction=fraction, device_memory_bytes=topo.chip.memory_bytes)
  options = {"xla_dump_hlo_module_re": "train_step"}
  if gpu:
    options["xla_gpu_enable_triton_gemm"] = False
  t0 = time.perf_counter()
  with tempfile.TemporaryDirectory(prefix="llava_jax_compile_") as dump:
    try:
      lowered = setup.lower(setup.abstract_state(), spec)
      compiled = lowered.compile({**options, "xla_dump_to": dump})
    except Exception as e:  # noqa: BLE001 - only a memory refusal is a verdict
      message = str(e)
      if "RESOURCE_EXHAUSTED" not in message and "Ran out of memory" not in message:
        raise
      got = _refusal_bytes(message)
      report.update(
          fits=False,
          compile_s=time.perf_counter() - t0,
          refusal=message.strip().splitlines()[0][:500],
          over_by_bytes=(got[0] - got[1]) if got else None,
      )
      if got and hbm_source == "compiler-reported":
        report["hbm_bytes"] = got[1]
      return report
    report["compile_s"] = time.perf_counter() - t0
    ba_hbm = _buffer_assignment_hbm(dump)
  stats = compiled.memory_analysis()
  hlo = compiled.as_text()
  args = stats.argument_size_in_bytes
  outs = stats.output_size_in_bytes - stats.alias_size_in_bytes  # not donated into
  code = stats.generated_code_size_in_bytes
  if ba_hbm is not None:
    temps = ba_hbm - args - outs
    source = "buffer assignment: HBM total bytes (arguments + unaliased outputs + temporaries) + generated code"
  else:  # no dump: memory_analysis counts the donated state's aliased buffers apart
    temps = stats.temp_size_in_bytes
    source = "memory_analysis: arguments + outputs - aliased + temporaries + code (may over-report)"
  total_bytes = args + outs + temps + code
  report.update(
      memory={
          "arguments": args,
          "outputs": outs,
          "temporaries": temps,
          "code": code,
          "total": total_bytes,
          "source": source,
          "memory_analysis": {
              f: getattr(stats, f)
              for f in (
                  "argument_size_in_bytes",
                  "output_size_in_bytes",
                  "alias_size_in_bytes",
                  "temp_size_in_bytes",
                  "generated_code_size_in_bytes",
              )
          },
      },
      collectives=count_collectives(hlo),
      mosaic_kernels=hlo.count('custom_call_target="tpu_custom_call"'),
      triton_kernels=hlo.count('custom_call_target="__gpu$xla.gpu.triton"'),
      fits=total_bytes <= report["hbm_bytes"],
      over_by_bytes=max(total_bytes - report["hbm_bytes"], 0),
  )
  return report


def _gib(x: float) -> str:
  return f"{x / GIB:.2f} GiB" if abs(x) >= GIB / 8 else f"{x / 2 ** 20:.1f} MiB"


def _count(n: float) -> str:
  return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def format_report(r: dict, config_name: str = "") -> str:
  """The human-readable report (what the command prints)."""
  gpu = r.get("platform") == "cuda"
  unit = "GPU" if gpu else "chip"
  lines = [
      f"llava_jax.compile {config_name} on {r['topology']} ({r['chips']} {unit}s, "
      f"{r['device_kind']})".replace("  ", " ")
  ]
  mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
  lines.append(
      f"  mesh          {mesh}; global batch {r['global_batch']} x {r['seq_len']} tokens"
      f", grad_accum {r['grad_accum']}"
  )
  groups = ", ".join(g for g, on in r["trainable_groups"].items() if on) or "none"
  lines.append(f"  params        {_count(r['params'])} ({_count(r['trainable_params'])} trainable: {groups})")
  if gpu:
    hbm = f"{_gib(r['hbm_bytes'])} usable per GPU ({r['hbm_source']})"
  else:
    hbm = f"{_gib(r['hbm_bytes'])} usable HBM per chip ({r['hbm_source']}; {r['hbm_nominal_gib']} GiB nominal)"
  if "memory" in r:
    m = r["memory"]
    kernels = (
        f"{r['triton_kernels']} Triton (Pallas) kernel calls"
        if gpu
        else f"{r['mosaic_kernels']} Mosaic (Pallas) kernel calls"
    )
    lines.append(f"  attention     llm={r['attn_impl']['llm']} vision={r['attn_impl']['vision']}; {kernels} in the HLO")
    lines.append(f"  per-{unit} memory, from the {m['source']}:")
    for key in ("arguments", "outputs", "temporaries", "code"):
      note = {
          "arguments": "state and batch shards (the donated state is reused for the new one)",
          "outputs": "outputs not aliased to a donated argument",
      }.get(key, "")
      lines.append(f"    {key:<12}{_gib(m[key]):>11}  {note}".rstrip())
    pct = 100 * m["total"] / r["hbm_bytes"]
    lines.append(f"    {'total':<12}{_gib(m['total']):>11}  of {hbm}: {pct:.0f}%")
    c = r["collectives"]
    lines.append(
        "  collectives   "
        + ", ".join(f"{k} {v}" for k, v in c.items())
        + " (static HLO count: a scanned layer body counts once)"
    )
  lines.append(
      f"  FLOPs/step    {r['flops_per_step']:.3e} analytic (train.flops), "
      f"{r['flops_per_chip']:.3e} per {unit}: >= {r['ideal_step_s']:.3g} s/step at "
      f"{r['peak_tflops_per_chip']:.0f} TFLOP/s bf16 peak"
  )
  lines.append(f"  compile       {r['compile_s']:.1f} s")
  for i, d in enumerate(r.get("differences_from_a_run", [])):
    lines.append(f"  {'not as run' if i == 0 else '':<14}{d}")
  if r["fits"]:
    head = r["hbm_bytes"] - r["memory"]["total"]
    lines.append(f"  verdict       fits: {_gib(r['memory']['total'])} of {_gib(r['hbm_bytes'])}, headroom {_gib(head)}")
  else:
    over = r.get("over_by_bytes")
    by = f" (by {_gib(over)})" if over is not None else ""
    lines.append(f"  verdict       does not fit{by} in {hbm}")
    need = r["memory"]["total"] / r["device_memory_bytes"] if gpu and "memory" in r else None
    if need is not None and need <= 1:
      lines.append(
          f"  {'':<14}fits the device's {_gib(r['device_memory_bytes'])} with "
          f"XLA_PYTHON_CLIENT_MEM_FRACTION >= {math.ceil(need * 100) / 100:.2f}"
      )
    if "refusal" in r:
      lines.append(f"  compiler      {r['refusal']}")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    topo = parse_topology(_TOPOLOGY.value, _SLICES.value)
  except ValueError as e:
    raise app.UsageError(str(e))
  config = _CONFIG.value
  name = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")), "")
  from llava_jax.train.validate import SetupError

  try:
    report = compile_step(config, topo, gpu_mem_fraction=_GPU_MEM_FRACTION.value)
  except SetupError as e:
    print(f"llava_jax.compile {name} on {topo}: the config cannot be laid over this topology:\n{e}", file=sys.stderr)
    if _JSON.value:
      _write_json(_JSON.value, {"config": name, "topology": str(topo), "error": str(e), "fits": None})
    sys.exit(2)
  report["config"] = name
  print(format_report(report, name))
  if _JSON.value:
    _write_json(_JSON.value, report)
  sys.exit(0 if report["fits"] else 1)


def _write_json(path: str, obj: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f, indent=1, default=str)


def run():
  # This host compiles for the topology; it never needs (or should grab) an accelerator.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  app.run(main)


if __name__ == "__main__":
  run()
