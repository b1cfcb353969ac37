r"""LLaVA-1.5 stage 2 (visual instruction tuning): projector + LLM train on the 665K mix.

  python -m llava_jax.train --config=configs/llava15_stage2.py:size=7b,data=/data/llava_v1_5_mix665k,stage1=/runs/llava15-7b-stage1,clip=/ckpt/clip-vit-large-patch14-336,llm=/ckpt/vicuna-7b-v1.5 --workdir=/runs/llava15-7b-stage2

Hyper-parameters as ``scripts/v1_5/finetune.sh``: lr 2e-5, global batch 128, 1 epoch
(665,298 samples = 5,198 steps), warmup 3 %, cosine, no weight decay, max length 2048,
``vicuna_v1`` conversations, images padded to square with the CLIP mean colour
(``image_aspect_ratio=pad``). Starts from the stage-1 run's projector plus the converted
CLIP and Vicuna weights.
"""

from llava_jax.train.recipes import llava_recipe
from llava_jax.train.run_config import parse_arg

SAMPLES = 665_298


def get_config(arg: str = ""):
  a = parse_arg(arg, size="7b", data="/data/llava_v1_5_mix665k", stage1="", clip="", llm="")
  batch = 128
  return llava_recipe(
      vision="clip-L/14-336",
      llm=f"vicuna-{a['size']}",
      data=dict(train=f"{a['data']}/llava_v1_5_mix665k.json", image_root=f"{a['data']}/images", tokenizer=a["llm"]),
      template="vicuna_v1",
      lr=2e-5,
      batch_size=batch,
      steps=-(-SAMPLES // batch),
      max_len=2048,
      init=dict(
          vision_hf=a["clip"] or None,
          llm_hf=a["llm"] or None,
          from_run=a["stage1"] or None,
          from_run_params=r"projector/.*",
      ),
      lr_rules=[(r"projector/.*", 1.0), (r"llm/.*", 1.0)],
      image_mode="pad",
  )


def sweep():
  for lr in (1e-5, 2e-5):
    for batch in (128, 256):
      yield {"optim.lr": lr, "train.batch_size": batch}
