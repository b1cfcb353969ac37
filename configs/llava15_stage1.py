r"""LLaVA-1.5 stage 1 (feature alignment): only the projector trains, on LCS-558K captions.

  python -m llava_jax.train --config=configs/llava15_stage1.py:size=7b,data=/data/LLaVA-Pretrain,clip=/ckpt/clip-vit-large-patch14-336,llm=/ckpt/vicuna-7b-v1.5 --workdir=/runs/llava15-7b-stage1

Hyper-parameters as haotian-liu/LLaVA ``scripts/v1_5/pretrain.sh``: lr 1e-3, global batch
256, 1 epoch (558,128 samples = 2,181 steps), warmup 3 %, cosine, no weight decay,
max length 2048, ``plain`` template, CLIP ViT-L/14-336 (layer -2, patch tokens),
mlp2x_gelu. ``clip`` and ``llm`` are HF directories (``CLIPVisionModel`` and
``LlamaForCausalLM``) loaded through ``llava_jax.checkpoint.convert.hf``.
"""

from llava_jax.train.recipes import llava_recipe
from llava_jax.train.run_config import parse_arg

SAMPLES = 558_128


def get_config(arg: str = ""):
  a = parse_arg(arg, size="7b", data="/data/LLaVA-Pretrain", clip="", llm="")
  batch = 256
  return llava_recipe(
      vision="clip-L/14-336",
      llm=f"vicuna-{a['size']}",
      data=dict(train=f"{a['data']}/blip_laion_cc_sbu_558k.json", image_root=f"{a['data']}/images", tokenizer=a["llm"]),
      template="plain",
      lr=1e-3,
      batch_size=batch,
      steps=-(-SAMPLES // batch),
      max_len=2048,
      init=dict(vision_hf=a["clip"] or None, llm_hf=a["llm"] or None, from_run=None, from_run_params=r"projector/.*"),
      lr_rules=[(r"projector/.*", 1.0)],
      image_mode="square",
  )


def sweep():
  for lr in (5e-4, 1e-3, 2e-3):
    yield {"optim.lr": lr}
