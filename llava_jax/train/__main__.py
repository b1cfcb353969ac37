from llava_jax.train.cli import run

run()
