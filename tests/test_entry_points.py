"""Each command a user types reaches its package's CLI: ``python -m llava_jax.generate`` and
``python -m llava_jax.infer`` are one program (``infer/cli.py``), as are ``evaluate`` and
``eval`` (``eval/cli.py``); ``--help`` prints the CLI's own usage."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "module, usage",
    [
        ("llava_jax.generate", "python -m llava_jax.generate --checkpoint=DIR"),
        ("llava_jax.infer", "python -m llava_jax.generate --checkpoint=DIR"),
        ("llava_jax.evaluate", "python -m llava_jax.evaluate --checkpoint=DIR"),
        ("llava_jax.eval", "python -m llava_jax.evaluate --checkpoint=DIR"),
        ("llava_jax.checkpoint.convert.demo", "python -m llava_jax.checkpoint.convert.demo"),
    ],
)
def test_command_prints_its_usage(module, usage):
  out = subprocess.run(
      [sys.executable, "-m", module, "--helpshort"],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert out.returncode == 1, out.stderr[-2000:]  # absl's exit status after printing --help
  assert usage in out.stdout, out.stdout[:2000]
