#!/usr/bin/env bash
# Creates/updates ./.venv with llava_jax and its dependencies. Usage: launch/setup.sh [--test]
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
stamp=.venv/.llava_jax_installed$([ "${1:-}" = "--test" ] && echo _test)
if [ ! -f "$stamp" ] || [ requirements.txt -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -r requirements.txt
  if [ "${1:-}" = "--test" ]; then .venv/bin/pip install -q -e ".[test]"; else .venv/bin/pip install -q -e .; fi
  touch "$stamp"
fi
