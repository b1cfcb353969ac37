"""``python -m llava_jax.train --config=configs/<x>.py[:arg] --workdir=DIR [--config.key=value]``."""
from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file (get_config(arg))",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, eval)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax
  if os.environ.get("LLAVA_JAX_DISTRIBUTED"):
    jax.distributed.initialize()  # multi-host: one process per host, same command everywhere
  from llava_jax.train.loop import train
  from llava_jax.train.evaluation import eval_fn_from_config
  config = _CONFIG.value
  logging.info("config:\n%s", config)
  last = train(config, _WORKDIR.value, eval_fn=eval_fn_from_config(config))
  logging.info("done: %s", last)


def run():
  app.run(main)
