# `python -m llava_jax.generate`: the command name for llava_jax/infer/cli.py (also
# `python -m llava_jax.infer`), kept as the README and users' scripts spell it.
from absl import app

from llava_jax.infer import cli

__doc__ = cli.__doc__  # what --help prints

if __name__ == "__main__":
  app.run(cli.main)
