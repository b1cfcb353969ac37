#!/usr/bin/env bash
# Installs what the tests need into ./.venv, lints (ruff), then runs the whole suite on 8 fake CPU devices.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh --test
.venv/bin/ruff check --quiet . || { echo "ruff check failed (see above): fix the code, or the rule in pyproject.toml" >&2; exit 1; }
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8"
exec .venv/bin/python -m pytest "$@"
