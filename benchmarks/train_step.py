"""Train-step throughput: llava_jax vs HF transformers (PyTorch) on the same ~100M-param LLaVA.

  JAX_PLATFORMS=cpu .venv/bin/python benchmarks/train_step.py [--steps=5] [--dtype=bfloat16] [--results=benchmarks/RESULTS.md]

Both sides run one model (a 6-layer CLIP-style ViT + a 12-layer Llama, width 768, built
from the same random HF checkpoint through ``load_hf_llava``) on the same batch, in this
one process:
  * llava_jax: the full jitted ``train_step`` (forward, backward, AdamW update) with the
    projector + LLM trainable and the ViT frozen, as LLaVA stage 2;
  * PyTorch: forward + backward + ``torch.optim.AdamW.step`` with the same parameters
    trainable (``requires_grad=False`` on the ViT).
The two steps are timed in alternation (best of ``--steps`` rounds), so a slow spell of
this shared machine hits both. Reports tokens/s, the ratio, and MFU = analytic model FLOPs per step
(``llava_jax.train.flops``) / step time / the measured float32 matmul peak of this
machine (``metrics.measure_matmul_peak``), for both frameworks. ``--dtype=bfloat16``:
mixed precision on both sides (llava_jax bf16 compute with f32 params; PyTorch
``torch.autocast("cpu", bfloat16)``, as the HF Trainer's ``--bf16``); MFU is still
against the float32 peak.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import host_description, timed_interleaved  # noqa: E402


def build_hf(path: str):
  import transformers as tf
  import tiny_hf

  vc = tf.CLIPVisionConfig(
      hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6, image_size=112, patch_size=14
  )
  tc = tf.LlamaConfig(
      vocab_size=8000,
      hidden_size=768,
      intermediate_size=2048,
      num_hidden_layers=12,
      num_attention_heads=12,
      num_key_value_heads=12,
      max_position_embeddings=1024,
      pad_token_id=0,
  )
  cfg = tf.LlavaConfig(
      vision_config=vc,
      text_config=tc,
      image_token_index=7999,
      vision_feature_layer=-2,
      vision_feature_select_strategy="default",
  )
  model = tiny_hf.randomize_(tf.LlavaForConditionalGeneration(cfg), scale=0.02)
  model.save_pretrained(path)
  return model.train()


def build_models(dtype: str = "float32"):
  """The benchmark LLaVA on both sides: ``(hf, cfg, params)``, the HF model (train mode)
  and the same weights loaded through ``load_hf_llava``, with ``dtype`` compute."""
  from llava_jax.checkpoint.convert.hf import load_hf_llava

  path = tempfile.mkdtemp()
  hf = build_hf(path)
  # Unrolled layers: ~12% faster than scan on XLA:CPU for this model (scan pays off in
  # compile time and on accelerators).
  cfg, params = load_hf_llava(
      path, llm_overrides={"scan": False, "remat": "none", "dtype": dtype}, vision_overrides={"dtype": dtype}
  )
  return hf, cfg, params


def make_batch(image_token: int, n_img: int, b: int, t: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, 7000, size=(b, t)).astype(np.int32)
  ids[:, 1 : 1 + n_img] = image_token
  labels = ids.copy()
  labels[:, : 1 + n_img] = -100
  px = rng.normal(size=(b, 1, 112, 112, 3)).astype(np.float32)
  return {
      "input_ids": ids,
      "labels": labels,
      "attention_mask": np.ones_like(ids),
      "pixel_values": px,
      "image_mask": np.ones((b, 1), bool),
  }


STAGE2_RULES = ((r"projector/.*", 1.0), (r"llm/.*", 1.0))  # the ViT stays frozen


def jax_stepper(cfg, params, example: dict, step_cfg=None):
  """llava_jax's stage-2 ``train_step`` (forward, backward, AdamW), jitted and compiled
  for ``example``'s shapes on one device. Returns ``step(batch) -> metrics``, which
  keeps the train state between calls (``step.compiled``: the compiled executable)."""
  import jax
  from llava_jax import sharding
  from llava_jax.train import optim, state as state_lib
  from llava_jax.train.step import StepConfig, make_train_step

  ocfg = optim.OptimConfig(learning_rate=1e-4, total_steps=100, lr_rules=STAGE2_RULES)
  opt = optim.make_optimizer(ocfg, params)
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  state, shardings = state_lib.create_state(cfg, opt, mesh, jax.random.key(0), params=params)
  step = state_lib.jit_train_step(
      make_train_step(cfg, opt, optim.trainable_mask(params, ocfg), step_cfg or StepConfig()), shardings, mesh, example
  )
  compiled = step.lower(state, example).compile()
  holder = [state]

  def run(batch):
    holder[0], metrics = compiled(holder[0], batch)
    return metrics

  run.compiled = compiled  # for profile_step.py: the optimized HLO behind the trace
  return run


def torch_stepper(hf, *, bf16: bool = False):
  """HF's stage-2 step: ``step(batch)`` runs forward + backward + ``torch.optim.AdamW``
  with the ViT frozen (``requires_grad=False``), without a KV cache (as in training);
  ``bf16``: under ``torch.autocast`` (the HF Trainer's ``--bf16``)."""
  import torch

  for name, p_ in hf.named_parameters():
    p_.requires_grad_(not name.startswith("model.vision_tower"))
  topt = torch.optim.AdamW([p_ for p_ in hf.parameters() if p_.requires_grad], lr=1e-4)

  def run(batch):
    topt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
      loss = hf(**batch, use_cache=False).loss
    loss.backward()
    topt.step()

  return run


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--results", default=None)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  a = p.parse_args()

  import jax
  import torch
  from llava_jax.train import flops as flops_lib, metrics

  hf, cfg, params = build_models(a.dtype)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  batch = make_batch(cfg.image_token_id, cfg.num_image_tokens, a.batch, a.seq)
  tokens = a.batch * a.seq

  run_jax = jax_stepper(cfg, params, batch)

  def jax_step():
    jax.block_until_ready(run_jax(batch)["loss"])

  flops = flops_lib.train_step_flops(
      cfg, tokens=tokens, seq_len=a.seq, images=a.batch, train_img=False, train_projector=True, train_llm=True
  )
  peak = metrics.measure_matmul_peak()

  run_torch = torch_stepper(hf, bf16=a.dtype == "bfloat16")
  tb = {
      "input_ids": torch.from_numpy(batch["input_ids"]).long(),
      "labels": torch.from_numpy(batch["labels"]).long(),
      "pixel_values": torch.from_numpy(batch["pixel_values"][:, 0].transpose(0, 3, 1, 2).copy()),
  }

  def torch_step():
    run_torch(tb)

  t = timed_interleaved({"jax": jax_step, "torch": torch_step}, a.steps, reduce=min)
  t_jax, t_torch = t["jax"], t["torch"]
  m = torch.ones(1024, 1024)
  torch_peak = 2 * 1024**3 / timed_interleaved({"mm": lambda: m @ m}, 5, reduce=min)["mm"]
  lines = [
      f"model: {n_params / 1e6:.1f}M params (ViT 6x384 frozen; Llama 12x768 + projector trained), "
      f"batch {a.batch} x {a.seq} tokens, {a.dtype}, {jax.device_count()} JAX device(s), "
      f"torch threads {torch.get_num_threads()}; host: {host_description()}",
      "| | step time | tokens/s | MFU vs measured matmul peak |",
      "|---|---|---|---|",
      f"| llava_jax train_step (jit, fwd+bwd+AdamW) | {t_jax * 1e3:.0f} ms | {tokens / t_jax:,.0f} | "
      f"{flops / t_jax / peak:.1%} |",
      f"| HF transformers PyTorch (fwd+bwd+AdamW) | {t_torch * 1e3:.0f} ms | {tokens / t_torch:,.0f} | "
      f"{flops / t_torch / torch_peak:.1%} of torch's own matmul peak |",
      "",
      f"speed-up llava_jax / PyTorch: **{t_torch / t_jax:.2f}x**; float32 1024^3 matmul peak: XLA "
      f"{peak / 1e9:.1f} GFLOP/s, torch {torch_peak / 1e9:.1f} GFLOP/s; model FLOPs "
      f"{flops / 1e9:.1f} GFLOP per step.",
  ]
  print("\n".join(lines))
  if a.results:
    from results import replace_section

    bf16 = a.dtype == "bfloat16"
    replace_section(
        a.results,
        "Train step, bfloat16 (benchmarks/train_step.py)" if bf16 else "Train step (benchmarks/train_step.py)",
        "Command: `JAX_PLATFORMS=cpu .venv/bin/python benchmarks/train_step.py "
        f"--steps={a.steps}{' --dtype=bfloat16' if bf16 else ''} --results={a.results}`\n\n" + "\n".join(lines),
    )


if __name__ == "__main__":
  main()
