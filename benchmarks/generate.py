r"""Batched greedy generation speed: llava_jax (KV cache, jitted while_loop) vs HF ``generate``.

  python benchmarks/generate.py --results=benchmarks/RESULTS.md

One random LLaVA (CLIP-tiny tower, 4-layer width-256 Llama, vocab 32000) is built in
transformers, saved and loaded through ``load_hf_llava``, so both sides run the same
weights. Prefill (prompt + image into the cache) and decode are timed separately:
prefill = one forward over the prompt; decode = (full generate - prefill), per generated
token after the first. Compilation is excluded (one warm-up call); the median of
``--repeats`` runs, interleaved between the two sides, is reported. Both sides run in float32 on the same CPU cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results import replace_section  # noqa: E402
from timing import host_description, timed_interleaved  # noqa: E402


def build_model(path: str, *, layers: int, width: int, vocab: int, image_token: int):
  import torch
  import transformers as tf

  torch.manual_seed(0)
  vision = tf.CLIPVisionConfig(
      hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=14
  )
  text = tf.LlamaConfig(
      vocab_size=vocab,
      hidden_size=width,
      intermediate_size=4 * width,
      num_hidden_layers=layers,
      num_attention_heads=width // 64,
      num_key_value_heads=width // 64,
      max_position_embeddings=1024,
      pad_token_id=0,
      bos_token_id=1,
      eos_token_id=2,
  )
  cfg = tf.LlavaConfig(
      vision_config=vision,
      text_config=text,
      image_token_index=image_token,
      vision_feature_select_strategy="default",
      vision_feature_layer=-2,
  )
  model = tf.LlavaForConditionalGeneration(cfg).eval()
  model.save_pretrained(path)
  return model


def make_inputs(batch: int, prompt: int, n_img: int, image_token: int, vocab: int, seed=0):
  """Left-padded prompts of lengths prompt - 0..7, each with one image."""
  rng = np.random.default_rng(seed)
  ids = np.zeros((batch, prompt), np.int32)
  mask = np.zeros((batch, prompt), np.int32)
  for r in range(batch):
    n = prompt - (r % 8)
    row = [1] + [image_token] * n_img + list(rng.integers(3, vocab - 1, n - 1 - n_img))
    ids[r, prompt - n :], mask[r, prompt - n :] = row, 1
  px = rng.normal(size=(batch, 56, 56, 3)).astype(np.float32)
  return ids, mask, px


def ours_fns(path, ids, mask, px, new_tokens):
  import jax

  from llava_jax.checkpoint.convert.hf import load_hf_llava
  from llava_jax.infer import sampler

  cfg, params = load_hf_llava(path, llm_overrides={"remat": "none"})
  params = jax.device_put(params)
  p = ids.shape[1]

  def run_prefill():
    jax.block_until_ready(sampler.prefill(cfg, params, ids, px, mask, cache_len=p + new_tokens))

  def run_generate():
    return np.asarray(sampler.generate(cfg, params, ids, px, mask, max_new_tokens=new_tokens))

  return run_prefill, run_generate


def hf_fns(model, ids, mask, px, new_tokens):
  import torch

  t_ids, t_mask = torch.from_numpy(ids).long(), torch.from_numpy(mask).long()
  t_px = torch.from_numpy(np.ascontiguousarray(px.transpose(0, 3, 1, 2)))

  def run_prefill():
    with torch.no_grad():
      model(input_ids=t_ids, attention_mask=t_mask, pixel_values=t_px, use_cache=True, logits_to_keep=1)

  def run_generate():
    with torch.no_grad():
      out = model.generate(
          input_ids=t_ids,
          attention_mask=t_mask,
          pixel_values=t_px,
          max_new_tokens=new_tokens,
          min_new_tokens=new_tokens,
          do_sample=False,
          pad_token_id=0,
      )
    return out[:, ids.shape[1] :].numpy()

  return run_prefill, run_generate


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--prompt", type=int, default=128)
  ap.add_argument("--new_tokens", type=int, default=64)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--width", type=int, default=256)
  ap.add_argument("--vocab", type=int, default=32000)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--results", default=None, help="RESULTS.md to add the section to")
  args = ap.parse_args(argv)

  import jax
  import torch
  import transformers

  jax.config.update("jax_default_matmul_precision", "highest")
  image_token = args.vocab - 1
  with tempfile.TemporaryDirectory() as path:
    model = build_model(path, layers=args.layers, width=args.width, vocab=args.vocab, image_token=image_token)
    ids, mask, px = make_inputs(args.batch, args.prompt, 16, image_token, args.vocab)
    load_before = os.getloadavg()[0]
    ours_pre_fn, ours_gen_fn = ours_fns(path, ids, mask, px, args.new_tokens)
    hf_pre_fn, hf_gen_fn = hf_fns(model, ids, mask, px, args.new_tokens)
    t = timed_interleaved(
        {"hf_pre": hf_pre_fn, "ours_pre": ours_pre_fn, "hf_gen": hf_gen_fn, "ours_gen": ours_gen_fn}, args.repeats
    )
    ours_tok, hf_tok = ours_gen_fn(), hf_gen_fn()
  ours_pre, ours_gen, hf_pre, hf_gen = t["ours_pre"], t["ours_gen"], t["hf_pre"], t["hf_gen"]

  b, p, n = args.batch, args.prompt, args.new_tokens
  rows = []
  for name, pre, gen in (("llava_jax", ours_pre, ours_gen), ("HF generate", hf_pre, hf_gen)):
    dec = max(gen - pre, 1e-9)
    rows.append((name, pre, b * p / pre, dec, b * (n - 1) / dec, b * n / gen))
  agree = float(np.mean(ours_tok == hf_tok))
  lines = [
      "Command: `python benchmarks/generate.py --results=benchmarks/RESULTS.md`",
      "",
      f"Random LLaVA: CLIP-tiny tower (56 px, 16 image tokens), Llama {args.layers} layers x "
      f"width {args.width} (MHA, {args.width // 64} heads), vocab {args.vocab}; float32; batch "
      f"{b}, prompt {p} (left-padded, lengths {p - 7}..{p}, one image each), {n} new tokens, "
      f"greedy, no early stop. Median of {args.repeats} interleaved runs after a warm-up. jax {jax.__version__} "
      f"({jax.default_backend()}, {jax.device_count()} devices), torch {torch.__version__} "
      f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
      f"host {host_description()} (1-min load average {load_before:.1f} at the start: other "
      "processes share these cores, so absolute numbers are noisy; the ratio is the point).",
      "",
      "| | prefill s | prefill tok/s | decode s | decode tok/s | end-to-end new tok/s |",
      "|---|---:|---:|---:|---:|---:|",
  ]
  for name, pre, pre_tps, dec, dec_tps, e2e in rows:
    lines.append(f"| {name} | {pre:.3f} | {pre_tps:,.0f} | {dec:.3f} | {dec_tps:,.0f} | {e2e:,.0f} |")
  (_, opre, opre_tps, _, odec_tps, oe2e), (_, hpre, hpre_tps, _, hdec_tps, he2e) = rows
  lines += [
      "",
      f"Ratios llava_jax / HF: prefill {opre_tps / hpre_tps:.2f}x, decode "
      f"{odec_tps / hdec_tps:.2f}x, end-to-end {oe2e / he2e:.2f}x. Greedy tokens equal to "
      f"HF's: {100 * agree:.1f}%.",
  ]
  text = "\n".join(lines)
  print(text)
  if args.results:
    replace_section(args.results, "Generation (benchmarks/generate.py)", text)


if __name__ == "__main__":
  sys.exit(main())
