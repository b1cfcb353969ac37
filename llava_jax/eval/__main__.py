# `python -m llava_jax.eval`: the evaluate CLI (cli.py; also `python -m llava_jax.evaluate`).
from absl import app

from llava_jax.eval import cli

__doc__ = cli.__doc__  # what --help prints

app.run(cli.main)
