r"""Attention memory (CPU) and speed (GPU/TPU): XLA reference vs the Pallas flash kernel.

  python benchmarks/attention.py                      # memory table, any backend
  python benchmarks/attention.py --results=benchmarks/RESULTS.md   # also record it

Memory (every backend): peak temporary bytes of the compiled XLA reference
(``memory_analysis().temp_size_in_bytes``; it materialises float32[B, H, T, S] scores)
against the flash kernel's footprint. A compiled non-interpret Pallas kernel needs a
TPU/GPU, so the per-grid-step VMEM footprint of the TPU kernels is computed analytically
from their block shapes (constant in T); the whole-program temp bytes of the kernel path
compiled on CPU in interpret mode are shown too (linear in T; they include the
interpreter's copies of whole arrays, so they overstate the real kernel).

Speed (only on GPU/TPU): forward and forward+backward TFLOP/s of the XLA reference, cuDNN
(GPU, ``jax.nn.dot_product_attention(implementation="cudnn")``), the official Pallas TPU
kernel (``jax.experimental.pallas.ops.tpu.flash_attention``) and ours.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from pathlib import Path

from absl import app, flags

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import replace_section  # noqa: E402

from llava_jax.kernels import flash_tpu
from llava_jax.kernels.flash_attention import BlockSizes, flash_attention
from llava_jax.kernels.reference import mha_reference

_RESULTS = flags.DEFINE_string(
    "results", None, "Markdown file whose memory section to add or replace (e.g. benchmarks/RESULTS.md)."
)
_SEQ_LENS = flags.DEFINE_list(
    "seq_lens", ["512", "1024", "2048", "4096", "8192"], "Sequence lengths T (= S) of the memory table."
)
_SPEED_SEQ_LENS = flags.DEFINE_list(
    "speed_seq_lens", ["1024", "2048", "4096", "8192"], "Sequence lengths of the GPU/TPU speed table."
)

SECTION = "## Attention memory (benchmarks/attention.py)"
MEM_B, MEM_H, MEM_D, MEM_DTYPE = 1, 8, 64, jnp.float32
MiB = 2**20


def _specs(b, t, h, d, dtype):
  x = jax.ShapeDtypeStruct((b, t, h, d), dtype)
  return x, x, x


def _grad_of_sum(fn):
  return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))


def _temp_bytes(fn, specs) -> int:
  return jax.jit(fn).lower(*specs).compile().memory_analysis().temp_size_in_bytes


def tpu_vmem_bytes(t: int, d: int, itemsize: int, blocks: BlockSizes) -> dict[str, int]:
  """Analytic VMEM per grid step of the three TPU kernels (``flash_tpu``), in bytes:
  double-buffered input/output blocks, scratch, and the float32 [bq, bk] tiles that are
  live at once (scores, probabilities, dp/ds in backward, two int32 position iotas)."""
  blocks = flash_tpu.fit_blocks(blocks, t, t, interpret=False)
  lanes, sub, f32 = flash_tpu.NUM_LANES, flash_tpu.NUM_SUBLANES, 4

  def step(bq, bk, in_tiles, out_tiles, scratch, live_tiles):
    return 2 * (in_tiles + out_tiles) + scratch + live_tiles * bq * bk * f32

  bq, bk = blocks.block_q, blocks.block_k
  fwd = step(
      bq,
      bk,
      in_tiles=(bq + 2 * bk) * d * itemsize,
      out_tiles=bq * d * itemsize + sub * bq * f32,
      scratch=2 * bq * lanes * f32 + bq * d * f32,
      live_tiles=4,
  )
  bq, bk = blocks.block_q_dq, blocks.block_k_dq
  dq = step(
      bq,
      bk,
      in_tiles=(2 * bq + 2 * bk) * d * itemsize + 2 * sub * bq * f32,
      out_tiles=bq * d * itemsize,
      scratch=bq * d * f32,
      live_tiles=6,
  )
  bq, bk = blocks.block_q_dkv, blocks.block_k_dkv
  dkv = step(
      bq,
      bk,
      in_tiles=(2 * bq + 2 * bk) * d * itemsize + 2 * sub * bq * f32,
      out_tiles=2 * bk * d * itemsize,
      scratch=2 * bk * d * f32,
      live_tiles=6,
  )
  return {"fwd": fwd, "bwd": max(dq, dkv)}


def memory_table(seq_lens) -> str:
  itemsize = jnp.dtype(MEM_DTYPE).itemsize
  blocks = BlockSizes.default("tpu")
  reference = lambda q, k, v: mha_reference(q, k, v, causal=True)  # noqa: E731
  kernel = lambda q, k, v: flash_attention(  # noqa: E731
      q, k, v, causal=True, backend="tpu", interpret=True, block_sizes=blocks
  )
  rows = [
      f"B={MEM_B}, H={MEM_H}, D={MEM_D}, {jnp.dtype(MEM_DTYPE).name}, causal, T = S; "
      f"TPU default blocks {blocks}; jax {jax.__version__}, backend "
      f"{jax.default_backend()}.",
      "",
      "| T | XLA ref fwd temp (compiled) | XLA ref fwd+bwd temp (compiled) "
      "| kernel VMEM/step fwd (analytic) | kernel VMEM/step bwd (analytic) "
      "| kernel path fwd temp (CPU interpret, compiled) "
      "| kernel path fwd+bwd temp (CPU interpret, compiled) |",
      "|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for t in seq_lens:
    specs = _specs(MEM_B, t, MEM_H, MEM_D, MEM_DTYPE)
    vmem = tpu_vmem_bytes(t, MEM_D, itemsize, blocks)
    cells = [
        _temp_bytes(reference, specs),
        _temp_bytes(_grad_of_sum(reference), specs),
        vmem["fwd"],
        vmem["bwd"],
        _temp_bytes(kernel, specs),
        _temp_bytes(_grad_of_sum(kernel), specs),
    ]
    rows.append(f"| {t} | " + " | ".join(f"{c / MiB:,.1f} MiB" for c in cells) + " |")
    print(rows[-1], flush=True)
  return "\n".join(rows)


# ------------------------------------------------------------------------------ speed


def _time(fn, *args, iters: int = 10) -> float:
  jax.block_until_ready(fn(*args))  # compile + warm up
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def speed_table(seq_lens, b: int = 4, h: int = 16, k: int = 16, d: int = 128) -> str:
  backend = jax.default_backend()
  impls = {
      "xla": lambda q, kk, v: mha_reference(q, kk, v, causal=True),
      "pallas (ours)": lambda q, kk, v: flash_attention(q, kk, v, causal=True, interpret=False),
  }
  if backend == "gpu":
    impls["cudnn"] = lambda q, kk, v: jax.nn.dot_product_attention(q, kk, v, is_causal=True, implementation="cudnn")
  if backend == "tpu":
    from jax.experimental.pallas.ops.tpu import flash_attention as official

    def official_tpu(q, kk, v):  # takes [B, H, T, D]; transposes are part of the cost
      out = official.flash_attention(*(x.swapaxes(1, 2) for x in (q, kk, v)), causal=True, sm_scale=1.0 / math.sqrt(d))
      return out.swapaxes(1, 2)

    impls["pallas (jax official TPU)"] = official_tpu
  rows = [
      f"B={b}, H={h}, K={k}, D={d}, bfloat16, causal; {jax.devices()[0].device_kind}",
      "",
      "| T | impl | fwd TFLOP/s | fwd+bwd TFLOP/s |",
      "|---:|---|---:|---:|",
  ]
  for t in seq_lens:
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (b, t, h, d), jnp.bfloat16)
    kk = jax.random.normal(keys[1], (b, t, k, d), jnp.bfloat16)
    v = jax.random.normal(keys[2], (b, t, k, d), jnp.bfloat16)
    flops = 4 * b * h * t * t * d / 2  # two matmuls, causal half
    for name, fn in impls.items():
      try:
        fwd = _time(jax.jit(fn), q, kk, v)
        fwd_bwd = _time(jax.jit(_grad_of_sum(fn)), q, kk, v)
        cells = f"{flops / fwd / 1e12:.1f} | {3.5 * flops / fwd_bwd / 1e12:.1f}"
      except Exception as e:  # an unavailable implementation should not stop the table
        cells = f"failed: {type(e).__name__} | -"
      rows.append(f"| {t} | {name} | {cells} |")
      print(rows[-1], flush=True)
  return "\n".join(rows)


def main(argv):
  del argv
  command = "python " + " ".join(sys.argv)
  parts = [f"Command: `{command}`", "", memory_table([int(t) for t in _SEQ_LENS.value])]
  if jax.default_backend() in ("gpu", "tpu"):
    parts += ["", "### Speed", "", speed_table([int(t) for t in _SPEED_SEQ_LENS.value])]
  if _RESULTS.value:
    replace_section(_RESULTS.value, SECTION[len("## ") :], "\n".join(parts))


if __name__ == "__main__":
  app.run(main)
