"""The LLaVA-1.5 training recipe that the shipped pod configs build on (``configs/*.py``).

    from llava_jax.train.recipes import llava_recipe
    from llava_jax.train.run_config import parse_arg

Every config file starts from ``run_config.skeleton()`` (each key with its one
default); this recipe sets what LLaVA-1.5 training on a TPU pod changes: bf16 towers
with scan + full remat and Pallas attention, FSDP over every chip, 16 grain workers.
"""

from __future__ import annotations

import ml_collections

from llava_jax.train.run_config import skeleton


def llava_recipe(
    *,
    vision: str,
    llm: str,
    data: dict,
    template: str,
    lr: float,
    batch_size: int,
    steps: int,
    max_len: int,
    init: dict,
    lr_rules,
    image_mode: str = "pad",
) -> ml_collections.ConfigDict:
  c = skeleton()
  # Pallas flash attention in both towers: XLA's attention holds each layer's [T, T]
  # scores, 2.4 GiB more per chip for 13B stage 2 on a v5e-32 (15.5 of 15.75 GiB, 98%)
  # and over a v4-32's HBM. On CPU it runs in interpret mode (slow; "xla" for CPU runs).
  c.model.update(vision=vision, llm=llm)
  c.model.vision_overrides = dict(select_layer=-2, scan=True, remat="full", dtype="bfloat16", attn_impl="pallas")
  c.model.llm_overrides = dict(scan=True, remat="full", dtype="bfloat16", attn_impl="pallas")
  # Packing (llava_jax/data/packing.py): several conversations per max_len row, no
  # padding compute. Off to keep the paper's recipe (batch_size counts examples); to
  # turn it on, batch_size counts rows and max_images is image slots per row, e.g.
  #   --config.data.pack=True --config.data.max_images=4 --config.train.batch_size=48
  c.data.update(template=template, max_len=max_len, workers=16, image_mode=image_mode, **data)
  c.optim.update(lr=lr, lr_rules=[list(r) for r in lr_rules])
  # target_fraction: LM head + loss only at up to this fraction of each row's positions
  # (llava_jax.train.step.StepConfig); e.g. 0.5 for stage 2, where image tokens and
  # prompts carry no loss. None (the default): every position.
  c.train.update(steps=steps, batch_size=batch_size, ckpt_every=500, keep=3, eval_batch_size=batch_size)
  c.init.update({k: v for k, v in init.items() if v is not None})
  # FSDP over every chip. Compiled for TPU by benchmarks/aot.py (benchmarks/RESULTS.md;
  # GiB per chip of the HBM the compiler allows: v5e 15.75, v4 30.75, v5p 95.7):
  #   stage 2, batch 128: 7B v5e-32 8.1 (batch 256: 12.3), v4-32 15.2, v5p-32 15.4;
  #                       13B v5e-32 13.1 (batch 256 refused), v4-32 25.5, v5p-32 25.4.
  #   stage 1, batch 256: 7B v5e-32 9.0, v4-32 17.2, v5p-32 17.2, v5e-256 3.0;
  #                       13B v5e-32 12.3, v4-32 24.2, v5p-32 24.5, v5e-256 4.0.
  # On a v5e-256, stage 2's 128 rows are fewer than the 256 batch shards and do not lower:
  # set train.batch_size to 256-1024 (7B 3.6-12.1, 13B 4.8-12.7 GiB; 2048 is refused).
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  return c
