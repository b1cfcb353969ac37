"""``python -m llava_jax.train --config=configs/<x>.py[:arg] --workdir=DIR [--config.key=value]``.

Several processes (a pod): the same command on every host, plus
``--coordinator_address/--num_processes/--process_id`` (or their environment variables,
or ``LLAVA_JAX_DISTRIBUTED=1`` on TPU VMs / SLURM / Open MPI); see
``llava_jax/distributed.py`` and ``launch/local_pod.sh``.
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from llava_jax import console
from llava_jax import distributed  # defines --coordinator_address/--num_processes/--process_id

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file (get_config(arg))", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, eval)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  distributed.initialize()  # multi-process: flags, env, or auto-detection (see distributed.py)
  from llava_jax.train.loop import check_paths, train

  check_paths(_CONFIG.value, _WORKDIR.value)  # an unusable path scheme: refused before any work
  log_file = console.setup_logging(_WORKDIR.value)
  config = _CONFIG.value
  if distributed.is_primary():
    logging.info("config:\n%s", config)
  last = train(config, _WORKDIR.value)
  logging.info("done: %s (full log: %s)", last, log_file)


def run():
  app.run(main)
