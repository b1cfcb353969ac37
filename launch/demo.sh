#!/usr/bin/env bash
# The README's main job. Creates/updates ./.venv, then runs the demo on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
exec .venv/bin/python -m llava_jax.demo_convert "$@"
