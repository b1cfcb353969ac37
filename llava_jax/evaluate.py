# `python -m llava_jax.evaluate`: the command name for llava_jax/eval/cli.py (also
# `python -m llava_jax.eval`), kept as the README and users' scripts spell it.
from absl import app

from llava_jax.eval import cli

__doc__ = cli.__doc__  # what --help prints

if __name__ == "__main__":
  app.run(cli.main)
