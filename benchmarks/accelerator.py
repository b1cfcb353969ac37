r"""Accelerator checks: attention kernels, the train step and decoding on one GPU, in minutes.

  bash benchmarks/accelerator.sh OUT_DIR            # default sizes, < 8 min on one H200
  bash benchmarks/accelerator.sh OUT_DIR --quick    # fewer cells, < 3 min
  bash benchmarks/accelerator.sh OUT_DIR --smoke    # CPU, tiny shapes, interpret-mode kernels (CI)

Made for a machine that has only jax (+ its CUDA plugin), flax, optax and numpy: this file
imports nothing else, and of llava_jax only the models, kernels, sharding, train-step and
sampler modules (no grain, tensorflow-datasets, ml_collections, array_record,
sentencepiece; ``tests/benchmarks/test_accelerator.py`` runs it with those hidden).
llava_jax need not be installed: the wrapper runs from the repository root with
``PYTHONPATH=.``.

What it measures (each cell checked against an XLA reference before it is timed):
  attention  fwd and fwd+bwd TFLOP/s of the project's Pallas kernel (each GPU lowering it
             has: Triton), cuDNN (``jax.nn.dot_product_attention(implementation="cudnn")``)
             and XLA (``kernels.reference``), bf16, D=128, 32 query / 8 kv heads, causal and
             causal with packed segment ids, T = 1k … 16k at a fixed number of tokens per
             call. Check: output and dq/dk/dv of batch row 0, kv heads 0-1, against the
             float32 reference on the same bf16 inputs (max error / max |reference|).
  train      the project's jitted train step (``train.step/state/optim``: forward,
             backward, AdamW; projector + LLM trained, ViT frozen, as LLaVA stage 2) of a
             ~1.2B LLaVA (SigLIP-B/16-224 + a Llama-3.2-1B-shaped LLM with a 32k vocab),
             bf16 compute, 2048 tokens per row, synthetic batches, for each attention impl
             (both towers) with remat full and none: step time, tokens/s, MFU (analytic
             FLOPs, ``train.flops``, over the bf16 dense peak of the detected chip),
             compiled program memory and the device's peak bytes in use. Check: the loss
             and gradient norm of the first step, from the same initial state, against
             the run with XLA attention.
  decode     greedy ``infer.sampler.generate`` (prefill + KV-cache decode loop) at batch
             1, 8 and 64 on the same model with bf16 weights: prefill tokens/s (image
             tower included) and decode tokens/s. Check: logits of the cached path
             (``prefill`` + ``decode_step`` on the generated tokens) against one
             uncached forward pass over the whole sequence.

Timing: one warm-up call (which compiles), then the median of N repeats of back-to-back
calls blocked at the end (``block_until_ready``; on an idle chip that is device time).
Every measurement prints one line (flushed) and rewrites ``results.json`` and
``results.md`` in the output folder, so a run cut short still reports what it finished.
A measurement that fails (cuDNN unavailable, out of memory, a lowering error) is recorded
with its error and the run goes on. A time budget (``--budget_s``, shared out between the
sections in order, unused time carried forward) stops starting new measurements, so a run
ends near the budget whatever the chip's compile times are.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import inspect
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accelerator_report import (
    SECTIONS,
    Budget,
    Report,
    device_memory,
    environment,
    error_text,  # noqa: E402
    matmul_tflops,
    max_rel_err,
    measure,
    program_memory,
    time_call,
)

from llava_jax import sharding  # noqa: E402
from llava_jax.infer import sampler  # noqa: E402
from llava_jax.kernels.reference import attention_mask, mha_reference  # noqa: E402
from llava_jax.models import (
    LLM_VARIANTS,
    VISION_VARIANTS,
    LLMConfig,
    Llava,
    LlavaConfig,  # noqa: E402
    VisionConfig,
    llava_config,
)
from llava_jax.models.llava import init_params  # noqa: E402
from llava_jax.train import flops as flops_lib, optim, state as state_lib  # noqa: E402
from llava_jax.train.step import StepConfig, make_train_step  # noqa: E402

# The ~1B decoder: Llama-3.2-1B's shape (32 query / 8 kv heads of 64) with LLaVA-1.5's 32k
# vocabulary (Llama-3's 128k would make the float32 logits a quarter of the activations).
LLM_1B = LLMConfig(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=8192,
    num_layers=16,
    num_heads=32,
    num_kv_heads=8,
    head_dim=64,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=4096,
)
STAGE2_RULES = ((r"projector/.*", 1.0), (r"llm/.*", 1.0))  # the ViT stays frozen


@dataclasses.dataclass(frozen=True)
class Sizes:
  """What one mode measures. ``train_cells``: (attention impl, remat) in run order: XLA
  first (the reference of the others' check), remat "full" before "none" (the device's
  peak memory only grows, so the smaller programs are measured first)."""

  attn_seq_lens: tuple[int, ...]
  attn_tokens: int  # B * T per call: B = max(1, attn_tokens // T)
  attn_heads: tuple[int, int]  # (query heads, kv heads)
  attn_head_dim: int
  attn_impls: tuple[str, ...]
  attn_masks: tuple[str, ...]
  attn_repeats: int
  vision: VisionConfig
  llm: LLMConfig
  train_cells: tuple[tuple[str, str], ...]
  train_batch: int
  train_seq: int
  train_steps: int
  decode_batches: tuple[int, ...]
  decode_prompt_text: int  # text tokens after the image's placeholders
  decode_new_tokens: int
  decode_repeats: int
  budget_s: float
  min_call_s: float  # back-to-back calls per repeat until this long


_IMPLS = ("pallas", "cudnn", "xla")
_FULL_MATRIX = (
    ("xla", "full"),
    ("pallas", "full"),
    ("cudnn", "full"),
    ("pallas", "none"),
    ("cudnn", "none"),
    ("xla", "none"),
)

MODES = {
    "default": Sizes(
        attn_seq_lens=(1024, 2048, 4096, 8192, 16384),
        attn_tokens=16384,
        attn_heads=(32, 8),
        attn_head_dim=128,
        attn_impls=_IMPLS,
        attn_masks=("causal", "segments"),
        attn_repeats=10,
        vision=VISION_VARIANTS["siglip-B/16-224"],
        llm=LLM_1B,
        train_cells=_FULL_MATRIX,
        train_batch=4,
        train_seq=2048,
        train_steps=5,
        decode_batches=(1, 8, 64),
        decode_prompt_text=60,
        decode_new_tokens=128,
        decode_repeats=3,
        budget_s=400.0,
        min_call_s=0.02,
    ),
    "quick": Sizes(
        attn_seq_lens=(2048, 8192),
        attn_tokens=16384,
        attn_heads=(32, 8),
        attn_head_dim=128,
        attn_impls=_IMPLS,
        attn_masks=("causal",),
        attn_repeats=5,
        vision=VISION_VARIANTS["siglip-B/16-224"],
        llm=LLM_1B,
        train_cells=_FULL_MATRIX[:3],
        train_batch=4,
        train_seq=2048,
        train_steps=3,
        decode_batches=(1, 64),
        decode_prompt_text=60,
        decode_new_tokens=64,
        decode_repeats=2,
        budget_s=130.0,
        min_call_s=0.02,
    ),
    # CPU: tiny shapes, interpret-mode Pallas; cuDNN fails here and is recorded as an error.
    "smoke": Sizes(
        attn_seq_lens=(64,),
        attn_tokens=64,
        attn_heads=(2, 1),
        attn_head_dim=32,
        attn_impls=_IMPLS,
        attn_masks=("causal", "segments"),
        attn_repeats=1,
        vision=dataclasses.replace(VISION_VARIANTS["siglip-tiny"], depth=1),
        llm=dataclasses.replace(LLM_VARIANTS["tiny"], num_layers=1),
        train_cells=(("xla", "full"), ("pallas", "none"), ("cudnn", "none")),
        train_batch=2,
        train_seq=32,
        train_steps=1,
        decode_batches=(2,),
        decode_prompt_text=4,
        decode_new_tokens=3,
        decode_repeats=1,
        budget_s=600.0,
        min_call_s=0.0,
    ),
}
SHARES = {"attention": 0.35, "train": 0.45, "decode": 0.20}  # of the budget, in this order

ATTN_TOL = 2e-2  # max |err| / max |reference|, bf16 kernels vs the float32 reference
LOSS_TOL = 1e-2  # relative, first-step loss vs the XLA-attention run
GRAD_NORM_TOL = 5e-2
LOGIT_TOL = 5e-2  # max |err| / max |logit|, bf16 cached decode vs the uncached forward


# ------------------------------------------------------------------ attention


def _segment_ids(b: int, t: int, seed: int) -> np.ndarray:
  """int32[B, T]: each row packs 4 examples of random lengths (ids 1..4, no padding)."""
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(b):
    cuts = np.sort(rng.choice(np.arange(1, t), size=3, replace=False))
    rows.append(1 + np.searchsorted(cuts, np.arange(t), side="right"))
  return np.stack(rows).astype(np.int32)


def visible_pairs(t: int, segment_ids: np.ndarray | None, batch: int) -> int:
  """(query, key) pairs a causal (within-segment) mask lets through, over the batch."""
  if segment_ids is None:
    return batch * t * (t + 1) // 2
  total = 0
  for row in segment_ids:
    lengths = np.bincount(row)[1:]
    total += int(np.sum(lengths * (lengths + 1) // 2))
  return total


def cudnn_attention(q, k, v, *, segment_ids=None):
  """cuDNN attention through ``jax.nn.dot_product_attention``, with the mask the project's
  dispatcher builds (``kernels/attention.py``); checks the signature first, since it is
  not the same in every jax version."""
  params = inspect.signature(jax.nn.dot_product_attention).parameters
  missing = {"implementation", "is_causal", "mask"} - set(params)
  if missing:
    raise NotImplementedError(f"jax {jax.__version__}: jax.nn.dot_product_attention has no {sorted(missing)} argument")
  if segment_ids is None:
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
  mask = attention_mask(q.shape[1], k.shape[1], causal=True, segment_ids=segment_ids)[:, None]
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")


def attention_fn(impl: str, interpret: bool) -> Callable:
  """``f(q, k, v, segment_ids) -> out`` for one implementation (causal)."""
  if impl == "xla":
    return lambda q, k, v, s: mha_reference(q, k, v, causal=True, segment_ids=s)
  if impl == "cudnn":
    return lambda q, k, v, s: cudnn_attention(q, k, v, segment_ids=s)
  if impl == "pallas":
    from llava_jax.kernels.flash_attention import flash_attention
    # GPU: the Triton lowering; CPU (smoke): the same kernel in interpret mode; TPU: Mosaic.
    backend = "tpu" if jax.default_backend() == "tpu" else "gpu"
    return lambda q, k, v, s: flash_attention(q, k, v, causal=True, segment_ids=s, backend=backend, interpret=interpret)
  raise ValueError(f"unknown attention impl {impl!r}")


def with_grads(f: Callable) -> Callable:
  """``(q, k, v, s, do) -> (out, dq, dk, dv)``: forward and backward, as training runs them."""

  def run(q, k, v, s, do):
    out, vjp = jax.vjp(lambda q, k, v: f(q, k, v, s), q, k, v)
    return (out,) + vjp(do)

  return run


def attention_section(report: Report, sizes: Sizes, interpret: bool):
  for mask in sizes.attn_masks:
    for t in sizes.attn_seq_lens:
      attention_cells(report, sizes, interpret, mask, t)


def attention_cells(report: Report, sizes: Sizes, interpret: bool, mask: str, t: int):
  """Every implementation at one (mask, T); inputs and the reference are built once, by
  the first cell that needs them (inside its measurement, so a failure is recorded)."""
  h, kh = sizes.attn_heads
  d, b = sizes.attn_head_dim, max(1, sizes.attn_tokens // t)
  kc = min(2, kh)
  g = kc * (h // kh)  # the checked slice: batch row 0, kv heads 0..kc-1 and their query heads
  seg_host = _segment_ids(b, t, seed=t) if mask == "segments" else None
  fwd_flops = 4 * h * d * visible_pairs(t, seg_host, b)
  data: dict[str, Any] = {}

  def inputs():
    if not data:
      keys = jax.random.split(jax.random.key(t), 4)
      data["args"] = (
          jax.random.normal(keys[0], (b, t, h, d), jnp.bfloat16),
          jax.random.normal(keys[1], (b, t, kh, d), jnp.bfloat16),
          jax.random.normal(keys[2], (b, t, kh, d), jnp.bfloat16),
          None if seg_host is None else jnp.asarray(seg_host),
      )
      data["do"] = jax.random.normal(keys[3], (b, t, h, d), jnp.bfloat16)
      q, k, v, seg = data["args"]
      sl = lambda x, n: x[:1, :, :n].astype(jnp.float32)  # noqa: E731
      ref = jax.jit(with_grads(attention_fn("xla", interpret)))(
          sl(q, g), sl(k, kc), sl(v, kc), None if seg is None else seg[:1], sl(data["do"], g)
      )
      data["reference"] = jax.device_get(ref)  # float32 out, dq, dk, dv of the slice
    return data["args"], data["do"], data["reference"]

  for impl in sizes.attn_impls:

    def run(impl=impl):
      args, do, reference = inputs()
      f = attention_fn(impl, interpret)
      fwd = jax.jit(lambda q, k, v, s: f(q, k, v, s))
      both = jax.jit(with_grads(f))
      checked = jax.device_get([o[:1, :, :n] for o, n in zip(both(*args, do), (g, g, kc, kc))])
      errs = [max_rel_err(o, r) for o, r in zip(checked, reference)]
      jax.block_until_ready(fwd(*args))
      t_fwd = time_call(fwd, *args, repeats=sizes.attn_repeats, min_call_s=sizes.min_call_s)
      t_both = time_call(both, *args, do, repeats=sizes.attn_repeats, min_call_s=sizes.min_call_s)
      return {
          "err_out": errs[0],
          "err_grad": max(errs[1:]),
          "check_ok": max(errs) <= ATTN_TOL,
          "fwd_ms": t_fwd * 1e3,
          "fwd_bwd_ms": t_both * 1e3,
          "fwd_tflops": fwd_flops / t_fwd / 1e12,
          "fwd_bwd_tflops": 3.5 * fwd_flops / t_both / 1e12,
      }

    measure(
        report,
        "attention",
        {"mask": mask, "T": t, "B": b, "impl": impl},
        run,
        lambda r: (
            f"fwd {r['fwd_tflops']:.1f} / fwd+bwd {r['fwd_bwd_tflops']:.1f} TFLOP/s, "
            f"err {r['err_out']:.1e}/{r['err_grad']:.1e} "
            f"{'ok' if r['check_ok'] else 'CHECK FAILED'}"
        ),
    )


# ------------------------------------------------------------------ train step


def model_config(sizes: Sizes, impl: str, remat: str, dtype: str = "bfloat16") -> LlavaConfig:
  """The benchmark LLaVA with ``impl`` attention in both towers (scanned layers)."""
  vision = dataclasses.replace(sizes.vision, attn_impl=impl, remat=remat, scan=True, dtype=dtype)
  llm = dataclasses.replace(sizes.llm, attn_impl=impl, remat=remat, scan=True, dtype=dtype)
  return llava_config(vision, llm, check_image_tokens=False)


def synthetic_params(cfg: LlavaConfig, seed: int, dtype=jnp.float32):
  """Random weights of ``cfg``'s shapes: norm scales 1, biases 0, the rest normal with
  std 1/sqrt(the tower's width), so activations are O(1) and attention is far from
  uniform at any width (the checks then see positions and masks). Cut from one random
  vector: the model's own ``init`` traces a forward pass and draws per leaf, and its
  compile costs more than the measurements it would feed (~20 s on a CPU)."""
  abstract = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  names = jax.tree.leaves(optim.param_names(abstract))
  leaves, treedef = jax.tree.flatten(abstract)
  drawn = [not n.endswith(("scale", "bias")) for n in names]
  total = sum(math.prod(x.shape) for x, d in zip(leaves, drawn) if d)

  def make(key):
    flat = jax.random.normal(key, (total,), jnp.float32)
    out, offset = [], 0
    for name, x, d in zip(names, leaves, drawn):
      if not d:
        out.append(jnp.full(x.shape, 1 if name.endswith("scale") else 0, dtype))
        continue
      width = cfg.vision.width if name.startswith("img/") else cfg.llm.hidden_size
      size = math.prod(x.shape)
      out.append((flat[offset : offset + size] / math.sqrt(width)).reshape(x.shape).astype(dtype))
      offset += size
    return jax.tree.unflatten(treedef, out)

  return jax.jit(make)(jax.random.key(seed))


def synthetic_batch(cfg: LlavaConfig, b: int, t: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A stage-2-shaped batch: one image per row right after BOS, its placeholders and the
  prompt ignored in the loss, random text; every row full (no padding)."""
  rng = np.random.default_rng(seed)
  n = cfg.num_image_tokens
  if t < n + 2:
    raise ValueError(f"sequence length {t} too short for {n} image tokens")
  ids = rng.integers(3, cfg.llm.vocab_size - 1, size=(b, t)).astype(np.int32)
  ids[:, 1 : 1 + n] = cfg.image_token_id
  labels = ids.copy()
  labels[:, : min(1 + n + 4, t - 1)] = -100
  size = cfg.vision.image_size
  return {
      "input_ids": ids,
      "labels": labels,
      "attention_mask": np.ones_like(ids),
      "pixel_values": rng.normal(size=(b, 1, size, size, 3)).astype(np.float32),
      "image_mask": np.ones((b, 1), bool),
  }


def train_section(report: Report, sizes: Sizes):
  b, t = sizes.train_batch, sizes.train_seq
  base = model_config(sizes, "xla", "full")
  devices = jax.devices()[:1]
  mesh = sharding.make_mesh((1, 1, 1), devices)
  abstract = jax.eval_shape(lambda: init_params(base, jax.random.key(0)))
  ocfg = optim.OptimConfig(learning_rate=1e-5, warmup_ratio=0.0, total_steps=1000, lr_rules=STAGE2_RULES)
  opt = optim.make_optimizer(ocfg, abstract)
  trainable = optim.trainable_mask(abstract, ocfg)
  n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract))
  host_batch = synthetic_batch(base, b, t)
  flops = flops_lib.train_step_flops(
      base, tokens=b * t, seq_len=t, images=b, train_img=False, train_projector=True, train_llm=True
  )
  peak = report.env["peak_bf16_flops"]
  shared: dict[str, Any] = {}
  reference: dict[str, float] = {}

  def master():
    """The initial state (same for every cell) and a jitted copier: each cell trains a
    fresh copy, since the step donates its input state."""
    if not shared:
      state, shardings = state_lib.create_state(base, opt, mesh, jax.random.key(0), params=synthetic_params(base, 0))
      copy = jax.jit(lambda s: jax.tree.map(jnp.copy, s), out_shardings=shardings)
      batch_sh = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in host_batch.items()}
      shared.update(state=state, shardings=shardings, copy=copy, batch=jax.device_put(host_batch, batch_sh))
    return shared

  for impl, remat in sizes.train_cells:

    def run(impl=impl, remat=remat):
      m = master()
      cfg = model_config(sizes, impl, remat)
      step = state_lib.jit_train_step(
          make_train_step(cfg, opt, trainable, StepConfig()), m["shardings"], mesh, m["batch"]
      )
      state = m["copy"](m["state"])
      t0 = time.perf_counter()
      compiled = step.lower(state, m["batch"]).compile()
      compile_s = time.perf_counter() - t0
      state, metrics = compiled(state, m["batch"])  # the check step, from the initial state
      first = {k: float(metrics[k]) for k in ("loss", "grad_norm")}
      row = {"compile_s": compile_s, "loss": first["loss"], "grad_norm": first["grad_norm"], **program_memory(compiled)}
      if not all(math.isfinite(x) for x in first.values()):
        raise FloatingPointError(f"first step not finite: {first}")
      if impl == "xla" and not reference:
        reference.update(first)
      if reference:
        row["err_loss"] = abs(first["loss"] - reference["loss"]) / abs(reference["loss"])
        row["err_grad_norm"] = abs(first["grad_norm"] - reference["grad_norm"]) / reference["grad_norm"]
        row["check_ok"] = row["err_loss"] <= LOSS_TOL and row["err_grad_norm"] <= GRAD_NORM_TOL
      else:
        row["check_ok"] = None  # no XLA reference (it failed or was not run)
      times = []
      for _ in range(sizes.train_steps):
        t1 = time.perf_counter()
        state, metrics = compiled(state, m["batch"])
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t1)
      step_s = statistics.median(times)
      row.update(
          step_ms=step_s * 1e3,
          tokens_per_s=b * t / step_s,
          model_tflops_per_step=flops / 1e12,
          mfu=None if peak is None else flops / step_s / peak,
          **device_memory(),
      )
      del state, metrics, compiled
      return row

    measure(
        report,
        "train",
        {"impl": impl, "remat": remat, "B": b, "T": t, "params_M": round(n_params / 1e6, 1)},
        run,
        lambda r: (
            f"{r['step_ms']:.1f} ms/step, {r['tokens_per_s']:,.0f} tok/s, MFU "
            f"{'-' if r['mfu'] is None else format(r['mfu'], '.1%')}, loss err "
            f"{r.get('err_loss', float('nan')):.1e} "
            f"{ {True: 'ok', False: 'CHECK FAILED', None: 'no reference'}[r['check_ok']] }"
        ),
    )
  shared.clear()


# ------------------------------------------------------------------ decode


def decode_section(report: Report, sizes: Sizes, impl: str = "xla"):
  cfg = model_config(sizes, impl, "none")
  n = sizes.decode_new_tokens
  prompt = 1 + cfg.num_image_tokens + sizes.decode_prompt_text
  shared: dict[str, Any] = {}

  def params():
    if not shared:  # bf16 weights, as served
      shared["params"] = synthetic_params(cfg, 1, jnp.bfloat16)
    return shared["params"]

  def inputs(b):
    batch = synthetic_batch(cfg, b, prompt, seed=b)
    return batch["input_ids"], batch["pixel_values"][:, 0], batch["attention_mask"]

  def check():
    """Cached logits (prefill + decode_step on generate's own tokens) vs one uncached pass."""
    p = params()
    b = min(sizes.decode_batches)
    ids, px, mask = inputs(b)
    steps = min(8, n)  # the programs of the speed cell at this batch, so compiled once
    tokens = np.asarray(sampler.generate(cfg, p, ids, px, mask, max_new_tokens=n))
    logits, cache, positions = sampler.prefill(cfg, p, ids, px, mask, cache_len=prompt + n)
    cached = [np.asarray(logits)]
    for i in range(1, steps):
      logits, cache = sampler.decode_step(cfg, p, tokens[:, i - 1], cache, prompt + i - 1, positions)
      positions = positions + 1
      cached.append(np.asarray(logits))
    full_ids = np.concatenate([ids, tokens[:, : steps - 1]], axis=1)
    full = jax.jit(lambda p, i, x: Llava(cfg).apply({"params": p}, i, x, jnp.ones_like(i)))(p, full_ids, px)
    want = np.asarray(full)[:, prompt - 1 :]
    got = np.stack(cached, axis=1)
    err = max_rel_err(got, want)
    agree = float(np.mean(np.argmax(want, -1) == tokens[:, :steps]))
    return {"B": b, "steps": steps, "err_logits": err, "greedy_agreement": agree, "check_ok": err <= LOGIT_TOL}

  measure(
      report,
      "decode",
      {"what": "check", "impl": impl},
      check,
      lambda r: (
          f"cached vs uncached logits err {r['err_logits']:.1e}, greedy agreement "
          f"{r['greedy_agreement']:.0%} {'ok' if r['check_ok'] else 'CHECK FAILED'}"
      ),
  )

  for b in sizes.decode_batches:

    def run(b=b):
      p = params()
      ids, px, mask = inputs(b)
      pre = lambda: sampler.prefill(cfg, p, ids, px, mask, cache_len=prompt + n)[0]  # noqa: E731
      gen = lambda: sampler.generate(cfg, p, ids, px, mask, max_new_tokens=n)  # noqa: E731
      t0 = time.perf_counter()
      jax.block_until_ready(pre())
      jax.block_until_ready(gen())
      compile_s = time.perf_counter() - t0
      t_pre = time_call(pre, repeats=sizes.decode_repeats, min_call_s=sizes.min_call_s)
      t_gen = time_call(gen, repeats=sizes.decode_repeats, min_call_s=0.0)
      t_dec = max(t_gen - t_pre, 1e-9)
      return {
          "compile_s": compile_s,
          "prefill_ms": t_pre * 1e3,
          "generate_ms": t_gen * 1e3,
          "prefill_tokens_per_s": b * prompt / t_pre,
          "decode_tokens_per_s": b * (n - 1) / t_dec,
          "decode_ms_per_step": t_dec / (n - 1) * 1e3,
          **device_memory(),
      }

    measure(
        report,
        "decode",
        {"what": "speed", "impl": impl, "B": b, "prompt": prompt, "new_tokens": n},
        run,
        lambda r: (
            f"prefill {r['prefill_tokens_per_s']:,.0f} tok/s, decode "
            f"{r['decode_tokens_per_s']:,.0f} tok/s ({r['decode_ms_per_step']:.2f} ms/step)"
        ),
    )
  shared.clear()


# ------------------------------------------------------------------ main


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True, help="folder for results.json and results.md")
  group = p.add_mutually_exclusive_group()
  group.add_argument("--quick", action="store_true", help="fewer cells, < 3 min on one H200")
  group.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, interpret-mode kernels")
  p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {SECTIONS}")
  p.add_argument("--budget_s", type=float, default=None, help="time budget (default per mode)")
  p.add_argument("--attn_seq_lens", default=None, help="comma list overriding the mode's T values")
  p.add_argument("--train_batch", type=int, default=None, help="rows per train step")
  return p.parse_args(argv)


def _without_out(argv: list[str]) -> list[str]:
  """The arguments as the wrapper takes them (the folder is its first argument)."""
  out, skip = [], False
  for x in argv:
    if skip:
      skip = False
    elif x == "--out":
      skip = True
    elif not x.startswith("--out="):
      out.append(x)
  return out


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  a = parse_args(argv)
  mode = "smoke" if a.smoke else "quick" if a.quick else "default"
  sizes = MODES[mode]
  overrides = {}
  if a.budget_s is not None:
    overrides["budget_s"] = a.budget_s
  if a.attn_seq_lens:
    overrides["attn_seq_lens"] = tuple(int(x) for x in a.attn_seq_lens.split(","))
  if a.train_batch:
    overrides["train_batch"] = a.train_batch
  sizes = dataclasses.replace(sizes, **overrides)
  sections = [s.strip() for s in a.sections.split(",") if s.strip()]
  unknown = set(sections) - set(SECTIONS)
  if unknown:
    raise SystemExit(f"unknown --sections {sorted(unknown)}; expected some of {SECTIONS}")
  if a.smoke:
    # Smoke runs check that the code runs, not how fast: XLA:CPU's unoptimised code
    # compiles ~2x faster (read when the backend starts, i.e. before the first jax call).
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
  elif jax.default_backend() == "cpu":
    print("warning: no accelerator (default backend cpu); use --smoke for the CPU check", flush=True)
  interpret = jax.default_backend() == "cpu"

  budget = Budget(sizes.budget_s)
  report = Report(a.out, environment(mode, _without_out(argv)), budget)
  env = report.env
  env["matmul_n"] = 256 if a.smoke else 8192
  env["matmul_bf16_tflops"] = matmul_tflops(env["matmul_n"])
  print(
      f"accelerator checks ({mode}): {env['device_kind']} x{env['device_count']}, jax {env['jax']}, "
      f"driver {env.get('driver') or '-'}, {env['matmul_n']}^3 bf16 matmul "
      f"{env['matmul_bf16_tflops'] or 0:.1f} TFLOP/s, budget {sizes.budget_s:.0f} s -> {a.out}",
      flush=True,
  )
  report.write()
  runners = {
      "attention": functools.partial(attention_section, report, sizes, interpret),
      "train": functools.partial(train_section, report, sizes),
      "decode": functools.partial(decode_section, report, sizes),
  }
  for section in SECTIONS:
    if section not in sections:
      continue
    budget.open_section(SHARES[section] / sum(SHARES[s] for s in sections))
    try:
      runners[section]()
    except Exception as e:  # set-up of a whole section failed (e.g. the model does not init)
      report.add(section, {"what": "section", "error": error_text(e)}, f"ERROR {error_text(e)}")
    gc.collect()
  report.complete = True
  report.write()
  print(f"done in {budget.elapsed():.0f} s: {os.path.join(a.out, 'results.md')}\n", flush=True)
  with open(os.path.join(a.out, "results.md")) as f:  # the log's tail alone then tells it all
    print(f.read(), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
