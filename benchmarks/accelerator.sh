#!/usr/bin/env bash
# Accelerator checks (benchmarks/accelerator.py) as-is on a bare GPU machine, from the repo root:
#   bash benchmarks/accelerator.sh OUT_DIR [--quick | --smoke] [more flags of accelerator.py]
# Writes OUT_DIR/results.json, results.md and log.txt. Needs only python with jax, flax, optax,
# numpy (llava_jax is found through PYTHONPATH=., not installed). PYTHON picks the interpreter.
set -euo pipefail
out="${1:?usage: bash benchmarks/accelerator.sh OUT_DIR [--quick | --smoke] [flags]}"
shift
mkdir -p "$out"
out="$(cd "$out" && pwd)"  # absolute, before moving to the repository root
cd "$(dirname "$0")/.."
py="${PYTHON:-$(command -v python3 || command -v python)}"
# More of the chip than jax's default 75% for the biggest cells (XLA attention at 16k tokens).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" "$py" -u benchmarks/accelerator.py --out="$out" "$@" 2>&1 | tee "$out/log.txt"
