# `python -m llava_jax.infer`: the generate CLI (cli.py; also `python -m llava_jax.generate`).
from absl import app

from llava_jax.infer import cli

__doc__ = cli.__doc__  # what --help prints

app.run(cli.main)
