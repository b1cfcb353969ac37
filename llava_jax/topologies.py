"""The hardware an ahead-of-time compile targets (``llava_jax.compile``): TPU and GPU topologies.

  topo = parse_topology("v5e:4x8")            # or "v5e-32", "v4-32", "cuda:h100:2x8"; slices=
  devices = topology_devices(topo)            # abstract devices: jax.experimental.topologies
  usable_hbm(devices[0], topo.chip)           # TPU: (bytes, source) a program may use

The tables: ``CHIPS`` (TPU generations: libtpu's topology prefix and chip config, nominal
HBM, bf16 peak, whether Cloud names count TensorCores or chips) and ``GPUS`` (NVIDIA parts
as the CUDA compiler sees them, ``Gpu.target_config``), with the names' aliases and the
standard chip grids of the Cloud slice names. Names: a chip grid ``<gen>:<AxB[xC]>``
(``v5e:4x8``, ``v6e:2x4``; 3-D for the megacore v4 / v5p, ``v4:2x2x4``), a Cloud name
``<gen>-N`` (``v4-32``, ``v5p-32``: TensorCores, 16 chips; ``v5e-32``, ``v6e-8``: chips),
or ``cuda:<gpu>:HOSTSxGPUS`` (``cuda:h100:1x8``; ``gpu`` a key of ``GPUS`` or an alias).

Usable memory: on TPU what the compiler says a program may use (``usable_hbm``: it states
its limit when it refuses an oversized one), on GPU the pool JAX's allocator takes
(``_gpu_fraction``: ``XLA_PYTHON_CLIENT_MEM_FRACTION`` of the device memory, 0.75 by default).

Abstract devices need libtpu (``pip install '.[tpu]'``) or jax's CUDA plugin
(``pip install '.[cuda_aot]'``); nothing here touches a chip. Compiling, the report and
the command line are ``llava_jax.compile``'s.
"""

from __future__ import annotations

import dataclasses
import os
import re

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
