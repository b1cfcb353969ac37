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

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """Per-generation facts: libtpu's topology prefix and chip config, nominal HBM, peak."""

  prefix: str
  chip_config: str
  hbm_gib: float  # nominal, used only if the compiler does not tell
  peak_tflops: float  # bf16 dense, per chip
  cores_per_name: int  # Cloud names count TensorCores (v4, v5p) or chips (v5e, v6e)


CHIPS = {
    "v4": Chip("v4", "megacore", 32, 275, 2),
    "v5p": Chip("v5p", "megacore", 95, 459, 2),
    "v5e": Chip("v5e", "default", 16, 197, 1),
    "v6e": Chip("v6e", "default", 32, 918, 1),
}


@dataclasses.dataclass(frozen=True)
class Gpu:
  """An NVIDIA GPU as the CUDA compiler sees it (XLA's ``GpuDeviceInfoProto`` fields; the
  values are what the CUDA driver reports for the SXM parts), plus its bf16 peak."""

  name: str  # the driver's device name (device_description_str)
  compute_capability: tuple[int, int]
  core_count: int  # streaming multiprocessors
  fpus_per_core: int
  memory_bytes: int  # device memory
  memory_bandwidth: int  # bytes/s
  l2_cache_bytes: int
  clock_ghz: float
  shared_memory_per_core: int
  shared_memory_per_block_optin: int
  peak_tflops: float  # bf16 dense, per GPU

  @property
  def hbm_gib(self) -> float:
    return self.memory_bytes / GIB

  def target_config(self) -> str:
    """``stream_executor.GpuTargetConfigProto`` text: what the compiler would have read
    from a local GPU."""
    major, minor = self.compute_capability
    # Hopper's wgmma/TMA instructions are sm_90a, which XLA targets on a real H100.
    ext = " feature_extension: ACCELERATED_FEATURES" if major == 9 else ""
    info = dict(
        threads_per_block_limit=1024,
        threads_per_warp=32,
        shared_memory_per_block=49152,
        shared_memory_per_core=self.shared_memory_per_core,
        threads_per_core_limit=2048,
        core_count=self.core_count,
        fpus_per_core=self.fpus_per_core,
        block_dim_limit_x=2**31 - 1,
        block_dim_limit_y=65535,
        block_dim_limit_z=65535,
        memory_bandwidth=self.memory_bandwidth,
        l2_cache_size=self.l2_cache_bytes,
        clock_rate_ghz=self.clock_ghz,
        device_memory_size=self.memory_bytes,
        shared_memory_per_block_optin=self.shared_memory_per_block_optin,
        registers_per_core_limit=65536,
        registers_per_block_limit=65536,
    )
    fields = "\n".join(f"  {k}: {v}" for k, v in info.items())
    return (
        f"gpu_device_info {{\n{fields}\n"
        f"  cuda_compute_capability {{ major: {major} minor: {minor}{ext} }}\n}}\n"
        f'platform_name: "CUDA"\n'
        f"dnn_version_info {{ major: 9 minor: 8 patch: 0 }}\n"
        f'device_description_str: "{self.name}"\n'
    )


GPUS = {
    "h100": Gpu(
        "NVIDIA H100 80GB HBM3",
        (9, 0),
        132,
        128,
        84_942_979_072,
        3_352_320_000_000,
        50 * 2**20,
        1.98,
        233_472,
        232_448,
        989,
    ),
    "h200": Gpu(
        "NVIDIA H200", (9, 0), 132, 128, 151_397_597_184, 4_800_000_000_000, 50 * 2**20, 1.98, 233_472, 232_448, 989
    ),
    "a100": Gpu(
        "NVIDIA A100-SXM4-80GB",
        (8, 0),
        108,
        64,
        85_100_068_864,
        2_039_040_000_000,
        40 * 2**20,
        1.41,
        167_936,
        166_912,
        312,
    ),
    "a100-40": Gpu(
        "NVIDIA A100-SXM4-40GB",
        (8, 0),
        108,
        64,
        42_331_013_120,
        1_555_200_000_000,
        40 * 2**20,
        1.41,
        167_936,
        166_912,
        312,
    ),
}
_GPU_ALIASES = {"a100-80": "a100", "a100-80gb": "a100", "a100-40gb": "a100-40", "h100-80gb": "h100"}
# JAX's GPU allocator takes this share of each GPU's memory unless told otherwise.
DEFAULT_GPU_MEM_FRACTION = 0.75
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e"}
# Chip grids of the Cloud slice names (chips -> shape); 3-D tori for v4/v5p.
_GRID_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_GRID_3D = {
    4: "2x2x1",
    8: "2x2x2",
    16: "2x2x4",
    32: "2x4x4",
    64: "4x4x4",
    128: "4x4x8",
    256: "4x8x8",
    512: "8x8x8",
    1024: "8x8x16",
    2048: "8x16x16",
    4096: "16x16x16",
    8192: "16x16x32",
}


@dataclasses.dataclass(frozen=True)
class Topology:
  generation: str  # key of CHIPS, or of GPUS when platform == "cuda"
  shape: str  # chips per axis, "4x8"; GPUs: hosts x GPUs per host, "2x8"
  slices: int = 1
  platform: str = "tpu"  # "tpu" | "cuda"

  @property
  def chip(self) -> Chip | Gpu:
    return GPUS[self.generation] if self.platform == "cuda" else CHIPS[self.generation]

  @property
  def name(self) -> str:
    prefix = "cuda:" if self.platform == "cuda" else ""
    return f"{prefix}{self.generation}:{self.shape}"

  @property
  def chips_per_slice(self) -> int:
    n = 1
    for s in self.shape.split("x"):
      n *= int(s)
    return n

  def __str__(self) -> str:
    return self.name + (f" x {self.slices} slices" if self.slices > 1 else "")


def parse_topology(name: str, slices: int = 1) -> Topology:
  """``"v5e:4x8"`` / ``"v5e-32"`` / ``"v4-32"`` (+ slices) / ``"cuda:h100:2x8"`` -> Topology;
  ValueError otherwise."""
  name = name.strip().lower()
  if slices < 1:
    raise ValueError(f"--slices={slices}: must be >= 1")
  if name.startswith(("cuda:", "gpu:")):
    m = re.fullmatch(r"(?:cuda|gpu):([a-z0-9-]+):(\d+)x(\d+)", name)
    if not m:
      raise ValueError(
          f"topology {name!r}: expected cuda:<gpu>:HOSTSxGPUS, e.g. cuda:h100:1x8 (gpu one of {sorted(GPUS)})"
      )
    gpu = _GPU_ALIASES.get(m.group(1), m.group(1))
    if gpu not in GPUS:
      raise ValueError(f"topology {name!r}: unknown GPU {m.group(1)!r}; expected one of {sorted(GPUS)}")
    if slices != 1:
      raise ValueError(
          f"--slices={slices}: GPU topologies give their hosts in the name "
          f"(cuda:{gpu}:{m.group(2)}x{m.group(3)}), not as slices"
      )
    if int(m.group(2)) < 1 or int(m.group(3)) < 1:
      raise ValueError(f"topology {name!r}: hosts and GPUs per host must be >= 1")
    return Topology(gpu, f"{int(m.group(2))}x{int(m.group(3))}", platform="cuda")
  m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)+)", name)
  if m:
    gen = _ALIASES.get(m.group(1), "v5p" if m.group(1) == "v5" else m.group(1))
    if gen not in CHIPS:
      raise ValueError(f"topology {name!r}: unknown TPU generation {m.group(1)!r}; expected one of {sorted(CHIPS)}")
    dims = 3 if CHIPS[gen].chip_config == "megacore" else 2
    if len(m.group(2).split("x")) != dims:
      raise ValueError(
          f"topology {name!r}: {gen} chips form a {dims}-D grid, e.g. "
          f"{gen}:{(_GRID_3D if dims == 3 else _GRID_2D)[16]}"
      )
    return Topology(gen, m.group(2), slices)
  m = re.fullmatch(r"([a-z0-9]+)-(\d+)", name)
  if m:
    gen = _ALIASES.get(m.group(1), m.group(1))
    if gen not in CHIPS:
      raise ValueError(f"topology {name!r}: unknown TPU generation {m.group(1)!r}; expected one of {sorted(CHIPS)}")
    chip = CHIPS[gen]
    n = int(m.group(2))
    if n % chip.cores_per_name:
      raise ValueError(f"topology {name!r}: {gen} names count TensorCores, a multiple of 2")
    chips = n // chip.cores_per_name
    grid = _GRID_3D if chip.chip_config == "megacore" else _GRID_2D
    if chips not in grid:
      raise ValueError(
          f"topology {name!r}: no standard {gen} slice of {chips} chips; known "
          f"{gen}-N: {[k * chip.cores_per_name for k in sorted(grid)]}; or give "
          f"the chip grid, e.g. {gen}:{grid[16]}"
      )
    return Topology(gen, grid[chips], slices)
  raise ValueError(
      f"topology {name!r}: expected <gen>:<AxB[xC]> (v5e:4x8, v4:2x2x4), a "
      f"Cloud name (v5e-32, v4-32, v5p-32, v6e-8) or cuda:<gpu>:HOSTSxGPUS"
  )


def topology_devices(topo: Topology) -> list:
  """The topology's abstract devices (TPU: with ``slice_index`` when multi-slice)."""
  if topo.platform == "cuda":
    return _cuda_devices(topo)
  # libtpu takes a host-wide lock on load (one process per TPU host); compiling touches
  # no chip, so several compiles (tests, a benchmark, a training job) may share a host.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies

  kwargs = {"num_slices": topo.slices} if topo.slices > 1 else {}
  desc = topologies.get_topology_desc(
      topology_name=f"{topo.chip.prefix}:{topo.shape}", platform="tpu", chip_config_name=topo.chip.chip_config, **kwargs
  )
  return list(desc.devices)


def _cuda_devices(topo: Topology) -> list:
  """Compile-only CUDA devices from the jax CUDA plugin (``pip install '.[cuda_aot]'``): one
  partition of HOSTS hosts with GPUS devices each, described by ``Gpu.target_config``."""
  from jax.experimental import topologies

  hosts, gpus = topo.shape.split("x")
  try:
    desc = topologies.get_topology_desc(
        platform="cuda", topology=f"1x{hosts}x{gpus}", target_config=topo.chip.target_config()
    )
  except NotImplementedError as e:  # no plugin registered for "cuda"
    raise RuntimeError(
        f"{topo}: compiling for GPUs needs jax's CUDA plugin "
        f"(pip install '.[cuda_aot]', ~5 GB installed); a GPU is not needed"
    ) from e
  return list(desc.devices)


_REFUSAL = re.compile(r"\(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)")
_UNIT = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _refusal_bytes(message: str) -> tuple[float, float] | None:
  """(required, available) bytes from XLA's "… (16.25G) exceeds available HBM (15.75G)"."""
  m = _REFUSAL.search(message)
  if not m:
    return None
  return float(m.group(1)) * _UNIT[m.group(2)], float(m.group(3)) * _UNIT[m.group(4)]


def usable_hbm(device, chip: Chip) -> tuple[float, str]:
  """(bytes, source): the HBM the TPU compiler lets one program use on ``device``.

  Abstract devices have no ``memory_stats``; the compiler states its limit when it
  refuses a program, so a deliberately oversized one (compiled in well under a second)
  asks it. Falls back to the nominal HBM of the generation.
  """
  import jax
  import jax.numpy as jnp

  x = jax.ShapeDtypeStruct((2**18,), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(device))
  too_big = lambda v: jnp.sort(jnp.broadcast_to(v[:, None], (2**18, 2**17)) * 1.5, 0).sum()
  try:
    jax.jit(too_big).lower(x).compile()
  except Exception as e:  # noqa: BLE001 - any failure falls back to the nominal figure
    got = _refusal_bytes(str(e))
    if got:
      return got[1], "compiler-reported"
  return chip.hbm_gib * GIB, "nominal"


def _gpu_fraction(value: float | None = None) -> float:
  """The share of GPU memory JAX's allocator takes: ``value``, else
  ``$XLA_PYTHON_CLIENT_MEM_FRACTION``, else JAX's default 0.75."""
  if value is None:
    value = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", DEFAULT_GPU_MEM_FRACTION))
  if not 0 < value <= 1:
    raise ValueError(f"GPU memory fraction {value}: must be in (0, 1]")
  return value


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
