r"""LLaVA-NeXT (v1.6) instruction tuning: any resolution, the whole model trains.

  python -m llava_jax.train --config=configs/llava_next.py:llm=vicuna-7b,data=/data/LLaVA-NeXT-Data,stage1=/runs/llava15-7b-stage1,clip=/ckpt/clip-vit-large-patch14-336,llm_ckpt=/ckpt/vicuna-7b-v1.5 --workdir=/runs/llava-next-vicuna-7b

``llm=vicuna-7b`` (default; Vicuna-7B-v1.5, ``vicuna_v1`` conversations) or
``llm=mistral-7b`` (Mistral-7B-Instruct-v0.2, as llava-v1.6-mistral-7b: ``mistral_instruct``
conversations, RoPE theta 1e6 and no sliding window, which the variant's v0.1 values
differ from). Images: CLIP ViT-L/14-336, LLaVA-NeXT's ``anyres`` over
``LLAVA_NEXT_PINPOINTS`` (1x2, 2x1, 2x2, 3x1, 1x3 grids of 336 px tiles) with
``spatial_unpad``: an image is a base tile plus up to 4 grid tiles, P = 5 tile slots and
at most N = 576 + 48 * 49 = 2928 image tokens (2x2 grid, newline after each of its 48
feature rows), so no image is over budget (``data.over_budget`` stays "reject").
Placement ``@llava_next``: a turn's single ``<image>`` moves to its start, as
LLaVA-NeXT's ``preprocess_multimodal``.

Hyper-parameters: the LLaVA-1.6 training scripts were never released; these are the
Open-LLaVA-NeXT reproduction's (``scripts/v1_6/train/7b/finetune.sh`` of
xiaoachen98/Open-LLaVA-NeXT: lr 2e-5, vision tower unfrozen at 2e-6, 4 nodes x 8 GPUs x
4 = global batch 128, 1 epoch, max length 4096, warmup 3 %, cosine, no weight decay),
which match LLaVA-NeXT's own ``scripts/train/finetune_clip.sh`` ("the first image
version LLaVA-NeXT (2024-01)") in tower, ``mm_vision_tower_lr=2e-6``, select layer -2,
pinpoints and ``spatial_unpad``. The vision rate is the ``img/.*`` multiplier 0.1;
``image_newline`` (the token after each feature row, new in NeXT) trains at the LLM's
rate, as LLaVA's ``mm_language_model`` part includes it. Data: lmms-lab/LLaVA-NeXT-Data
in its raw LLaVA format (``llava_next_raw_format/llava_next_raw_format_processed.json``
and the images unpacked beside it), 779,289 samples (the dataset card's
``num_examples``; the January blog counts 760K for v1.6 itself, the card adds the May
"stronger LLMs" data) = 6,089 steps.

Starts from a LLaVA-1.5-style stage-1 run's projector (``configs/llava15_stage1.py``,
trained with the same LLM) plus the converted CLIP and LLM weights.

Fits (``python -m llava_jax.compile``, benchmarks/RESULTS.md), as shipped (FSDP over every
chip, one batch of 128): v5e-32 13.36 of 15.75 GiB per chip (85%). Smaller slices need
``--config.train.grad_accum=4``: v5e-16 14.27 GiB (91%; a v5e-8 is refused even at one
row per chip), v5p-8 (4 chips) 53.84 of 95.74 GiB.
"""

from llava_jax.data.anyres import LLAVA_NEXT_PINPOINTS
from llava_jax.train.recipes import llava_recipe
from llava_jax.train.run_config import parse_arg

SAMPLES = 779_289  # lmms-lab/LLaVA-NeXT-Data, train split
TEMPLATES = {"vicuna-7b": "vicuna_v1@llava_next", "mistral-7b": "mistral_instruct@llava_next"}
# Mistral-7B-Instruct-v0.2 (LLaVA-1.6-Mistral's LLM); the mistral-7b variant is v0.1's.
LLM_OVERRIDES = {"mistral-7b": dict(rope_theta=1e6, sliding_window=None)}


def get_config(arg: str = ""):
  a = parse_arg(arg, llm="vicuna-7b", data="/data/LLaVA-NeXT-Data", stage1="", clip="", llm_ckpt="")
  if a["llm"] not in TEMPLATES:
    raise ValueError(f"llm={a['llm']!r}: expected one of {sorted(TEMPLATES)}")
  batch = 128
  raw = f"{a['data']}/llava_next_raw_format"
  c = llava_recipe(
      vision="clip-L/14-336",
      llm=a["llm"],
      data=dict(train=f"{raw}/llava_next_raw_format_processed.json", image_root=raw, tokenizer=a["llm_ckpt"]),
      template=TEMPLATES[a["llm"]],
      lr=2e-5,
      batch_size=batch,
      steps=-(-SAMPLES // batch),
      max_len=4096,
      init=dict(
          vision_hf=a["clip"] or None,
          llm_hf=a["llm_ckpt"] or None,
          from_run=a["stage1"] or None,
          from_run_params=r"projector/.*",
      ),
      lr_rules=[(r"img/.*", 0.1), (r"projector/.*", 1.0), (r"image_newline", 1.0), (r"llm/.*", 1.0)],
      image_mode="square",  # tiles are already 336 x 336: no resize or crop happens
  )
  c.model.llm_overrides.update(LLM_OVERRIDES.get(a["llm"], {}))
  c.model.anyres = dict(image_grid_pinpoints=[list(p) for p in LLAVA_NEXT_PINPOINTS])
  return c


def sweep():
  for lr in (1e-5, 2e-5, 3e-5):  # the vision tower follows at 0.1 of it
    yield {"optim.lr": lr}
