"""Helpers shared by the config files (argument parsing, the LLaVA-1.5 recipe skeleton)."""
import ml_collections


def parse_arg(arg: str, **defaults) -> dict:
  """``"size=13b,data=/d"`` -> dict, with ``defaults`` filled in and unknown keys refused."""
  out = dict(defaults)
  for part in filter(None, (arg or "").split(",")):
    key, _, value = part.partition("=")
    if key not in out:
      raise ValueError(f"unknown config argument {key!r}; expected {sorted(out)}")
    out[key] = value
  return out


def llava_recipe(*, stage: int, vision: str, llm: str, data: dict, template: str, lr: float,
                 batch_size: int, steps: int, max_len: int, init: dict,
                 lr_rules, image_mode: str = "pad") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Pallas flash attention in both towers: XLA's attention holds each layer's [T, T]
  # scores, 2.4 GiB more per chip for 13B stage 2 on a v5e-32 (15.5 of 15.75 GiB, 98%)
  # and over a v4-32's HBM. On CPU it runs in interpret mode (slow; "xla" for CPU runs).
  c.model = dict(vision=vision, llm=llm, projector="mlp2x_gelu", vocab_from_tokenizer=False,
                 image_token="<image>",
                 vision_overrides=dict(select_layer=-2, scan=True, remat="full", dtype="bfloat16",
                                       attn_impl="pallas"),
                 llm_overrides=dict(scan=True, remat="full", dtype="bfloat16",
                                    attn_impl="pallas"))
  # Packing (llava_jax/data/packing.py): several conversations per max_len row, no
  # padding compute. Off to keep the paper's recipe (batch_size counts examples); to
  # turn it on, batch_size counts rows and max_images is image slots per row, e.g.
  #   --config.data.pack=True --config.data.max_images=4 --config.train.batch_size=48
  c.data = dict(synthetic=None, template=template, max_len=max_len, max_images=1,
                policy="skip", workers=16, image_mode=image_mode, val="",
                eval_questions="", eval_annotations="", pack=False,
                pack_bins=ml_collections.config_dict.placeholder(int), **data)
  c.optim = dict(lr=lr, warmup_ratio=0.03, final_lr_ratio=0.0, weight_decay=0.0, grad_clip=1.0,
                 lr_rules=list(lr_rules))
  # target_fraction: LM head + loss only at up to this fraction of each row's positions
  # (llava_jax.train.step.StepConfig); e.g. 0.5 for stage 2, where image tokens and
  # prompts carry no loss. None: every position.
  c.train = dict(steps=steps, batch_size=batch_size, grad_accum=1, loss_norm="token",
                 target_fraction=ml_collections.config_dict.placeholder(float),
                 log_every=10, ckpt_every=500, keep=3, eval_every=0, eval_batch_size=batch_size,
                 peak_tflops=ml_collections.config_dict.placeholder(float), tensorboard=True,
                 progress=True, async_checkpoint=True,
                 # Reliability: see configs/tiny_shapes.py and llava_jax/train/loop.py.
                 on_nonfinite="stop", max_nonfinite=10, checkpoint_on_stop=True,
                 on_corrupt_checkpoint="fallback",
                 crash_after_step=ml_collections.config_dict.placeholder(int))
  # None becomes a typed placeholder, so that --config.init.from_run=DIR (etc.) can be set.
  c.init = {k: ml_collections.config_dict.placeholder(str) if v is None else v
            for k, v in init.items()}
  # FSDP over every chip. Compiled for TPU by benchmarks/aot.py (benchmarks/RESULTS.md;
  # GiB per chip of the HBM the compiler allows: v5e 15.75, v4 30.75, v5p 95.7):
  #   stage 2, batch 128: 7B v5e-32 8.1 (batch 256: 12.3), v4-32 15.2, v5p-32 15.4;
  #                       13B v5e-32 13.1 (batch 256 refused), v4-32 25.5, v5p-32 25.4.
  #   stage 1, batch 256: 7B v5e-32 9.0, v4-32 17.2, v5p-32 17.2, v5e-256 3.0;
  #                       13B v5e-32 12.3, v4-32 24.2, v5p-32 24.5, v5e-256 4.0.
  # On a v5e-256, stage 2's 128 rows are fewer than the 256 batch shards and do not lower:
  # set train.batch_size to 256-1024 (7B 3.6-12.1, 13B 4.8-12.7 GiB; 2048 is refused).
  c.mesh = dict(data=1, fsdp=-1, tensor=1)
  c.sharding_rules = []
  return c
