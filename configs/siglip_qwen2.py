r"""SigLIP So400m/14-384 + Qwen2-7B LLaVA (LLaVA-OneVision-style towers), two stages.

  python -m llava_jax.train --config=configs/siglip_qwen2.py:stage=1,data=/data/LLaVA-Pretrain,siglip=/ckpt/siglip-so400m-patch14-384,llm=/ckpt/Qwen2-7B-Instruct --workdir=/runs/siglip-qwen2-s1
  python -m llava_jax.train --config=configs/siglip_qwen2.py:stage=2,data=/data/llava_v1_5_mix665k,stage1=/runs/siglip-qwen2-s1,siglip=/ckpt/siglip-so400m-patch14-384,llm=/ckpt/Qwen2-7B-Instruct --workdir=/runs/siglip-qwen2-s2

SigLIP has no class token: all 729 patch tokens of the last layer (``select_layer=-1``)
go to the projector; conversations use Qwen2's ``chatml``; the image placeholder is a
token the Qwen2 tokenizer must contain (set ``model.image_token``).
"""

from llava_jax.train.recipes import llava_recipe
from llava_jax.train.run_config import parse_arg


def get_config(arg: str = "stage=1"):
  a = parse_arg(arg, stage="1", data="", stage1="", siglip="", llm="")
  stage = int(a["stage"])
  if stage == 1:
    data = dict(train=f"{a['data']}/blip_laion_cc_sbu_558k.json", image_root=f"{a['data']}/images", tokenizer=a["llm"])
  else:
    data = dict(train=f"{a['data']}/llava_v1_5_mix665k.json", image_root=f"{a['data']}/images", tokenizer=a["llm"])
  c = llava_recipe(
      vision="siglip-So400m/14-384",
      llm="qwen2-7b",
      data=data,
      template="plain" if stage == 1 else "chatml",
      lr=1e-3 if stage == 1 else 1e-5,
      batch_size=256 if stage == 1 else 128,
      steps=2181 if stage == 1 else 5198,
      max_len=2048,
      init=dict(
          vision_hf=a["siglip"] or None,
          llm_hf=a["llm"] or None,
          from_run=(a["stage1"] or None) if stage == 2 else None,
          from_run_params=r"projector/.*",
      ),
      lr_rules=[(r"projector/.*", 1.0)] + ([(r"llm/.*", 1.0)] if stage == 2 else []),
      image_mode="resize",
  )
  if stage == 1:
    # Two microbatches of 128 (same loss and update as one batch of 256). In one batch
    # of 256 on a v5e-32 the float32 logits over Qwen2's 152K vocabulary alone are
    # 8 rows x 2048 x 152064 x 4 B = 9.3 GiB per chip and the compiler refuses the step
    # (19.6 GiB); with grad_accum=2 it needs 11.3 of 15.75 GiB (benchmarks/RESULTS.md).
    c.train.grad_accum = 2
  c.model.vision_overrides.update(select_layer=-1, select_feature="cls_patch")
  c.model.image_token = "<|image_pad|>"
  return c


def sweep():
  for lr in (1e-5, 2e-5):
    yield {"optim.lr": lr}
