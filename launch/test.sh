#!/usr/bin/env bash
# Installs what the tests need into ./.venv, then runs the whole suite on 8 fake CPU devices.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh --test
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8"
exec .venv/bin/python -m pytest "$@"
