"""Foundation demo: build a tiny random LLaVA, convert it to a HF directory and back, check
the logits agree, and greedily generate a few tokens.

  python -m llava_jax.checkpoint.convert.demo [--workdir=DIR]

If ``transformers`` + ``torch`` are installed (the ``test`` extra), the HF directory is
also run through ``transformers.LlavaForConditionalGeneration`` and compared.
"""

from __future__ import annotations

import os
import tempfile

import jax
import numpy as np
from absl import app, flags

from llava_jax.checkpoint.convert.hf import load_hf_llava, save_hf_llava
from llava_jax.infer.sampler import generate
from llava_jax.models import Llava, init_params, llava_config

_WORKDIR = flags.DEFINE_string("workdir", None, "where to write the HF directory (default: temp)")


def main(argv):
  del argv
  cfg = llava_config("clip-tiny", "tiny")
  params = jax.tree.map(np.asarray, init_params(cfg, jax.random.key(0)))
  n_params = sum(a.size for a in jax.tree.leaves(params))
  print(
      f"tiny LLaVA: CLIP {cfg.vision.depth}x{cfg.vision.width} -> {cfg.projector.kind} -> "
      f"Llama {cfg.llm.num_layers}x{cfg.llm.hidden_size}, {n_params:,} params, "
      f"{cfg.num_image_tokens} image tokens per image"
  )
  path = _WORKDIR.value or os.path.join(tempfile.mkdtemp(), "tiny_llava_hf")
  save_hf_llava(cfg, params, path)
  print(f"saved HF LlavaForConditionalGeneration directory: {path} ({sorted(os.listdir(path))})")
  cfg2, params2 = load_hf_llava(path)
  assert cfg2 == cfg, "config changed across the round trip"

  rng = np.random.default_rng(0)
  ids = np.array([[1, 5] + [cfg.image_token_id] * cfg.num_image_tokens + [7, 8, 9]], np.int32)
  px = rng.normal(size=(1, cfg.vision.image_size, cfg.vision.image_size, 3)).astype(np.float32)
  fwd = jax.jit(lambda p, i, x: Llava(cfg).apply({"params": p}, i, x))
  a, b = np.asarray(fwd(params, ids, px)), np.asarray(fwd(params2, ids, px))
  print(f"logits after JAX -> HF -> JAX round trip: max |diff| = {np.abs(a - b).max():.2e}")
  try:
    import torch
    import transformers
  except ImportError:
    print("transformers/torch not installed: skipping the PyTorch comparison (launch/test.sh installs them)")
  else:
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(path).eval()
    with torch.no_grad():
      ref = hf(
          input_ids=torch.from_numpy(ids).long(), pixel_values=torch.from_numpy(px.transpose(0, 3, 1, 2).copy())
      ).logits.numpy()
    print(f"logits vs transformers PyTorch: max |diff| = {np.abs(a - ref).max():.2e}")
  tokens = generate(cfg, params2, ids, px, max_new_tokens=8)
  print(f"greedy continuation (random weights, so arbitrary ids): {np.asarray(tokens)[0].tolist()}")


if __name__ == "__main__":
  app.run(main)
