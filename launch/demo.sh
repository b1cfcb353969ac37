#!/usr/bin/env bash
# The README's main job: creates/updates ./.venv, then trains the tiny LLaVA on the
# embedded shapes dataset (stage 1 + stage 2), reports held-out accuracy and answers a
# question about a held-out image. Extra flags go to `python -m llava_jax.demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
exec .venv/bin/python -m llava_jax.demo "$@"
