#!/usr/bin/env bash
# Creates/updates ./.venv with llava_jax and its dependencies. Usage: launch/setup.sh [--test]
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
if [ "${1:-}" = "--test" ]; then extra="[test]"; fi
[ -x .venv/bin/python ] || python3 -m venv .venv
stamp=".venv/.llava_jax_installed${extra:+_test}"
if [ ! -f "$stamp" ] || [ requirements.txt -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setting up .venv (llava_jax${extra}) ..."
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -r requirements.txt
  .venv/bin/pip install -q -e ".${extra}"
  touch "$stamp"
fi
