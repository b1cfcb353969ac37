r"""LLaVA-OneVision: SigLIP So400m/14-384 + Qwen2-7B, any resolution; single-image stage, then multi-image + video.

  python -m llava_jax.train --config=configs/llava_onevision.py:stage=si,data=/data/onevision_si,mid=/runs/onevision-mid,llm=/ckpt/Qwen2-7B-Instruct --workdir=/runs/onevision-si
  python -m llava_jax.train --config=configs/llava_onevision.py:stage=ov,data=/data/onevision_ov,si=/runs/onevision-si,llm=/ckpt/Qwen2-7B-Instruct --workdir=/runs/onevision-ov

The stage after OneVision's mid stage (1.5): ``mid=`` is a run of this model whose every
parameter is taken (``init.from_run_params=".*"``). Without one, ``stage1=`` (a projector
run such as ``configs/siglip_qwen2.py:stage=1`` with the same ``select_layer``) plus the
converted ``siglip=`` and ``llm=`` weights (HF google/siglip-so400m-patch14-384,
Qwen/Qwen2-7B-Instruct) start it as LLaVA-1.5-style stage 2 would. ``llm=`` is always
the tokenizer. ``data``: the single-image mixture of
lmms-lab/LLaVA-OneVision-Data merged into one LLaVA JSON, ``llava_onevision_si.json``,
images under ``images/``; 3.2M samples (the OneVision repo's ``docs/LLaVA_OneVision.md``,
a rounded figure) = 12,500 steps of 256.

As OneVision (LLaVA-NeXT repo ``scripts/train/finetune_si.sh``, ``finetune_onevision.sh``):

- tower: SigLIP without a class token and without its head; OneVision cuts the last of
  the 27 encoder layers (HF's converted config: ``num_hidden_layers=26``,
  ``vision_feature_layer=-1``, ``vision_feature_select_strategy="full"``; LLaVA-NeXT's
  ``SigLipVisionTower`` deletes ``layers[-1:]``), so on the full So400m checkpoint it is
  ``select_layer=-2``: all 729 patch tokens of layer 26, before the post-layernorm;
- ``image_aspect_ratio="anyres_max_9"`` over the 1x1 ... 6x6 grids of 384 px tiles
  (``ONEVISION_PINPOINTS``), ``spatial_unpad``, the feature map shrunk bilinearly when
  it holds more than ~9 tiles' worth;
- ``qwen_1_5`` conversations = ``chatml_llava_next`` (LLaVA-NeXT's ``preprocess_qwen``);
- lr 1e-5 (projector, LLM, ``image_newline``), vision tower 2e-6 (``img/.*`` multiplier
  0.2), warmup 3 %, cosine, no weight decay, 1 epoch; global batch 256 (the scripts'
  recommendation for 7B: batch 1 x accumulation 2 x 128 GPUs).

Tile budget. HF's processor tiles an image on up to a 6x6 grid + base = 37 tiles. A
fixed-shape step (``data/anyres_example.py``) gives every image slot the same P tiles, so
P = 37 would push 37 tiles per image through the 400M-parameter tower although most
images need a few: mostly padding. Here P = ``max_tiles_per_image=10`` (a 3x3 grid +
base), and ``data.over_budget="downscale"`` shrinks an image whose best grid is larger
(keeping its aspect ratio, counted and logged) until it fits. What the LLM sees changes
little: ``anyres_max_9`` shrinks any grid of more than ~9 tiles' features to about 9
tiles' worth anyway, so a square 2304 px image is 7371 tokens either way (6x6 grid
shrunk, or downscaled to 1101 px on a 3x3 grid); it has fewer source pixels behind them.
Other aspect ratios land on a smaller unpadded grid and lose some tokens: 1500x2000 (HxW)
7309 -> 5731 (3x3), 768x2304 7215 -> 4653 (2x4); a 384x2304 strip (1x6, 7 tiles) is
untouched. The token budget is N = 7371 per image (``models.anyres.max_tokens``: the
grids that fit 10 tiles).

Sequence length: OneVision trains with ``model_max_length=32768``. Here 8192 (an image's
up to 7371 tokens plus ~800 of text; longer conversations are cut, or rejected when that
leaves no answer), since Qwen2's 152K-entry head makes float32 logits of 8192 x 152064 x
4 B = 4.6 GiB per row; the mesh and ``grad_accum`` below fit it.

``stage=ov``, the OneVision stage (docs/LLaVA_OneVision.md: "1.6M single-image,
multi-image and video samples"; ``scripts/train/finetune_onevision.sh``: the same rates,
``frames_upbound 32``), starts from the ``si=`` run (every parameter) and reads
``llava_onevision_ov.json`` with images and videos under ``data/images`` (LLaVA-NeXT's
separate ``video_folder``: give the records' video paths relative to that root, or
absolute):

- a sample of several images takes OneVision's multi-image mode: each image one padded
  square tile, 729 features + ``image_newline`` (``models.anyres.square_images``); a single
  image is tiled as in ``si``. ``data.max_images=3`` slots of P = 10 tiles each: a
  multi-image slot uses one of its ten, so the tower spends most of those slots on zero
  tiles (the price of one fixed shape for both kinds); a sample with more images is a
  counted ``image_count_mismatch`` (raise ``max_images`` at that cost: each slot is
  ~0.5 GiB a chip on a v5e-64, below);
- a video (``"video"`` records, marked ``<image>`` in LLaVA-Video-178K's way or
  ``<video>``) is 32 frames sampled uniformly (``data.video_frames``; OneVision's
  ``frames_upbound``), each 27x27 grid pooled bilinearly to 14x14 (196 tokens) after the
  projector, plus one ``image_newline`` per video: 6273 tokens (``model.video``, the HF
  LlavaOnevision video path, parity in ``tests/models/test_llava_video.py``). The video
  token is past Qwen2's vocabulary (its tokenizer has no ``<video>``).
"""

from llava_jax.data.anyres import ONEVISION_PINPOINTS
from llava_jax.train.recipes import llava_recipe
from llava_jax.train.run_config import parse_arg

STAGES = ("si", "ov")
SAMPLES_SI = 3_200_000  # docs/LLaVA_OneVision.md: "3.2M instruction-following image samples"
SAMPLES_OV = 1_600_000  # docs/LLaVA_OneVision.md: "1.6M single-image, multi-image and video samples"
VIDEO_FRAMES = 32  # scripts/train/finetune_onevision.sh: --frames_upbound 32


def get_config(arg: str = "stage=si"):
  a = parse_arg(arg, stage="si", data="", mid="", si="", stage1="", siglip="", llm="")
  if a["stage"] not in STAGES:
    raise ValueError(f"stage={a['stage']!r}: expected one of {STAGES}")
  ov = a["stage"] == "ov"
  if ov and (a["mid"] or a["stage1"] or a["siglip"]):
    raise ValueError("stage=ov starts from the single-image run: give si=<its workdir> (not mid / stage1 / siglip)")
  if a["si"] and not ov:
    raise ValueError("si= is stage=ov's start (the single-image run); stage=si starts from mid= or stage1=")
  data = a["data"] or f"/data/onevision_{a['stage']}"
  batch = 256
  if ov:
    init = dict(from_run=a["si"] or None, from_run_params=r".*")
  elif a["mid"]:
    init = dict(from_run=a["mid"], from_run_params=r".*")
  else:
    init = dict(
        vision_hf=a["siglip"] or None,
        llm_hf=a["llm"] or None,
        from_run=a["stage1"] or None,
        from_run_params=r"projector/.*",
    )
  c = llava_recipe(
      vision="siglip-So400m/14-384",
      llm="qwen2-7b",
      data=dict(train=f"{data}/llava_onevision_{a['stage']}.json", image_root=f"{data}/images", tokenizer=a["llm"]),
      template="chatml_llava_next",
      lr=1e-5,
      batch_size=batch,
      steps=-(-(SAMPLES_OV if ov else SAMPLES_SI) // batch),
      max_len=8192,
      init=init,
      lr_rules=[(r"img/.*", 0.2), (r"projector/.*", 1.0), (r"image_newline", 1.0), (r"llm/.*", 1.0)],
      image_mode="resize",  # SigLIP's own; tiles are already 384 x 384
  )
  c.model.vision_overrides.update(select_layer=-2, select_feature="patch")
  c.model.image_token = "<|image_pad|>"  # as configs/siglip_qwen2.py
  c.model.anyres = dict(
      image_grid_pinpoints=[list(p) for p in ONEVISION_PINPOINTS],
      vision_aspect_ratio="anyres_max_9",
      max_tiles_per_image=10,
  )
  c.data.over_budget = "downscale"
  # Fits a v5e-32 (python -m llava_jax.compile, benchmarks/RESULTS.md): 11.98 of 15.75 GiB
  # per chip. One microbatch row per FSDP shard (256 = 16 x 16 rows) and the LM head split
  # over tensor=2 (vocab-sharded logits): with fsdp=32 and 8 microbatches of 32 rows the
  # compiler refuses the step by 0.29 GiB. Smaller slices that fit: v5e-16 with
  # mesh.fsdp=4, mesh.tensor=4, train.grad_accum=64 (14.87 GiB, 94%); v5p-8 (4 chips) with
  # mesh.fsdp=-1, mesh.tensor=1, train.grad_accum=32 (56.33 of 95.74 GiB).
  c.mesh.update(fsdp=-1, tensor=2)
  c.train.grad_accum = 16
  if ov:  # multi-image (square tiles) and 32-frame videos beside single images
    c.model.video = dict(token="<video>", pooling="bilinear", pool_stride=2)
    c.data.update(max_images=3, video_frames=VIDEO_FRAMES, max_videos=1)
    # Fits a v5e-64 (benchmarks/RESULTS.md): 14.18 of 15.75 GiB per chip with fsdp=16,
    # tensor=4, one row per FSDP shard. Refused: 4 image slots (by 61 MiB), a v5e-32 (by
    # 1.74 GiB at fsdp=8, tensor=4). A v5p-16 (8 chips) takes 4 slots: mesh.tensor=1,
    # train.grad_accum=32, data.max_images=4 (39.86 of 95.74 GiB).
    c.mesh.update(fsdp=-1, tensor=4)
    c.train.grad_accum = 16
  return c


def sweep():
  for lr in (5e-6, 1e-5):
    yield {"optim.lr": lr}
