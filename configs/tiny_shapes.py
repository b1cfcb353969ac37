r"""Tiny LLaVA on the embedded shapes dataset: the CPU demo, same code path as a pod run.

  python -m llava_jax.train --config=configs/tiny_shapes.py:stage1,root=runs/shapes --workdir=runs/shapes/stage1
  python -m llava_jax.train --config=configs/tiny_shapes.py:stage2,root=runs/shapes --workdir=runs/shapes/stage2
  python -m llava_jax.train --config=configs/tiny_shapes.py:stage3,root=runs/shapes --workdir=runs/shapes/stage3

There is no pretrained tower or LLM to start from here (nothing can be downloaded), so
both stages train every parameter (``lr_rules``): stage 1 (captions, ``plain``
template) teaches the ViT, projector and LLM to describe images; stage 2 starts from
stage 1 and learns the VQA conversations (``vicuna_v1``). With real weights the stage-1
rule would be ``projector/.*`` only (see ``llava15_stage1.py``). Stage 3 starts from stage
2 and learns the multi-image and "video" tasks (``data/synthetic_multi.py``: questions
about two images, the direction of a shape moving over three frames) with every
``<image>`` where the text puts it (``vicuna_v1@inline``), single-image conversations
mixed back in.

``video=1`` (stage 3, or the few-step ``test``, which then trains on a small stage 3) gives the model a video token
(``model.video``): each clip goes to a video slot (``pixel_values_videos``) instead of
being its frames as images. ``anyres=1`` (any stage) makes the model any-resolution (LLaVA-NeXT's tiling over
``ANYRES_PINPOINTS``, ``llava_jax/data/anyres_example.py``): each 42 px scene becomes a
base tile plus a 1x2 grid of 42 px tiles, 30 image tokens instead of 9. The multi-process
and CLI tests (tests/train/test_media_train.py) train it that way, with video=1.
"""

from llava_jax.train.run_config import parse_arg, skeleton

STAGES = ("stage1", "stage2", "stage3", "test")
ANYRES_PINPOINTS = ((42, 84), (84, 42), (84, 84))  # tile side 42: 1x2, 2x1, 2x2 grids


def get_config(arg: str = "stage1"):
  a = parse_arg(arg, positional="stage", stage="stage1", root="runs/shapes", anyres="0", video="0")
  stage, root = a["stage"], a["root"]
  if stage not in STAGES:
    raise ValueError(f"stage {stage!r}: expected one of {STAGES}")
  data_dir = f"{root}/data"
  c = skeleton()
  c.model.update(vision="clip-tiny", llm="tiny", vocab_from_tokenizer=True)
  # 42 px images in 14 px patches: one patch per cell of the scenes' 3x3 grid, so each
  # shape is one image token (with 28 px / 7 px patches shapes straddle patches and
  # stage 2 learns the colour/shape binding far more slowly).
  c.model.vision_overrides = dict(
      width=96, depth=3, mlp_dim=192, num_heads=4, select_layer=-1, image_size=42, patch_size=14
  )
  c.model.llm_overrides = dict(
      hidden_size=128, intermediate_size=256, num_layers=3, num_heads=4, num_kv_heads=2, max_position_embeddings=512
  )
  # 8000 training scenes (24,000 VQA conversations; stage 2 sees each about 1.6 times): with
  # 4000 the same 1200 steps reached 88.5% held-out greedy exact match on seed 1 (97.5% on
  # seed 0); with 8000, 99.3 / 96.0 / 89.7% on seeds 0 / 1 / 2 (stage 2 at lr 1e-3 then, on an
  # AVX2 host; README, set-up section, for the shipped recipe's figures).
  for key in ("anyres", "video"):
    if a[key] not in ("0", "1"):
      raise ValueError(f"{key}={a[key]!r}: expected 0 or 1")
  if a["anyres"] == "1":
    c.model.anyres = dict(image_grid_pinpoints=[list(p) for p in ANYRES_PINPOINTS])
  c.data.synthetic = dict(dir=data_dir, seed=0, n_train=8000, n_val=200, image_size=42)
  if stage == "stage3":  # written when stage 3 first asks for it (the stage-1/2 files stay as they are)
    c.data.synthetic.multi = dict(n_train=4000, n_val=100, replay=4000)
  c.data.update(
      tokenizer=f"{data_dir}/tokenizer.model",
      image_root=f"{data_dir}/images",
      # Stage 2 trains on the VQA conversations alone. Stage 1's captions name shapes by
      # kind (see `synthetic.caption`), which already teaches the lookup of a shape among
      # the image tokens; mixing the captions back into stage 2 only halved the VQA
      # signal (seed 1, same stage 1: 77% vs 84% held-out at step 600).
      train=f"{data_dir}/{'stage1' if stage == 'stage1' else 'stage2'}.jsonl",
      val=f"{data_dir}/{'stage1' if stage == 'stage1' else 'stage2'}_val.jsonl",
      eval_questions=f"{data_dir}/eval_questions.jsonl",
      eval_annotations=f"{data_dir}/eval_annotations.jsonl",
      template="plain" if stage == "stage1" else "vicuna_v1",
      # Packing (llava_jax/data/packing.py): with pack=True, max_images is slots per row.
      max_len=64 if stage == "stage1" else 128,
  )
  if stage == "stage3":
    c.data.update(
        train=f"{data_dir}/stage3.jsonl",
        val=f"{data_dir}/stage3_val.jsonl",
        eval_questions=f"{data_dir}/eval_multi_questions.jsonl",
        eval_annotations=f"{data_dir}/eval_multi_annotations.jsonl",
        template="vicuna_v1@inline",
        max_images=3,  # two images, or a video's three frames
        max_len=160,
        video_frames=3,  # the clips' frames (data/synthetic_multi.py: FFV1 .mkv files)
    )
  # There are no pretrained weights to keep: every parameter trains in both stages. Stages 2
  # and 3 start from the stage before and learn at 5e-4 (at 1e-3 before: README, set-up
  # section, has both rates on three seeds from the same stage-1 runs).
  c.optim.update(lr=3e-3 if stage == "stage1" else 5e-4, warmup_ratio=0.05, final_lr_ratio=0.05, lr_rules=[[".*", 1.0]])
  # Reliability (llava_jax/train/loop.py, defaults in llava_jax/train/run_config.py): a
  # non-finite loss/gradient stops the run (train.on_nonfinite="skip": drop such updates,
  # at most max_nonfinite); SIGTERM/Ctrl-C write a checkpoint of the current step; a
  # damaged checkpoint is moved aside and the one before restored.
  c.train.update(
      steps={"stage1": 600, "stage3": 800}.get(stage, 1200),
      batch_size=32,
      log_every=25,
      ckpt_every=300 if stage == "stage2" else 200,
      eval_every=300 if stage == "stage2" else 200,
      eval_batch_size=50,
  )
  if stage in ("stage2", "stage3"):
    c.init.update(from_run=f"{root}/{'stage1' if stage == 'stage2' else 'stage2'}", from_run_params=".*")
  else:
    c.init.from_run_params = ".*"
  if stage == "test":  # a few steps for the resume / CLI tests
    c.data.template = "vicuna_v1"
    c.data.train = f"{data_dir}/stage2.jsonl"
    c.data.val = ""
    c.data.synthetic.update(n_train=64, n_val=8)
    c.model.vision_overrides.update(width=32, mlp_dim=64, depth=2)
    c.model.llm_overrides.update(hidden_size=32, intermediate_size=64, num_layers=2)
    c.train.update(
        steps=6,
        batch_size=8,
        log_every=1,
        ckpt_every=2,
        eval_every=0,
        tensorboard=False,
        progress=False,
        peak_tflops=1.0,
    )
    c.optim.lr = 1e-3
    if a["video"] == "1":  # a few multi-image and video conversations (stage 3's tasks)
      c.data.synthetic.multi = dict(n_train=24, n_val=8, replay=8)
      c.data.update(template="vicuna_v1@inline", train=f"{data_dir}/stage3.jsonl", max_images=2, max_len=160)
  if a["video"] == "1":  # a video token: each clip in a video slot, its frames' features unpooled
    c.model.video = dict(pooling="average", pool_stride=1)
    c.data.update(video_frames=3, max_videos=1)
  return c


def sweep():
  """Learning-rate x width sweep of stage 2 (``launch/sweep.py`` runs one job per dict)."""
  for lr in (2.5e-4, 5e-4, 1e-3):
    for hidden in (96, 128):
      yield {"optim.lr": lr, "model.llm_overrides.hidden_size": hidden}
