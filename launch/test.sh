#!/usr/bin/env bash
# Installs what the tests need into ./.venv, checks the formatting (pyink) and lints (ruff), then runs the whole suite on 8 fake CPU devices,
# in two worker processes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh --test
.venv/bin/pyink --check --quiet . || { echo "pyink: files above are not formatted; run .venv/bin/pyink . (settings in pyproject.toml)" >&2; exit 1; }
.venv/bin/ruff check --quiet . || { echo "ruff check failed (see above): fix the code, or the rule in pyproject.toml" >&2; exit 1; }
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8"
# Two test processes (pytest-xdist; TEST_WORKERS=0 for one): most tests are single-threaded
# compiles, so on 2 cores the suite takes about half the time. Whole files go to one worker
# (--dist loadfile), so a file's module fixtures are built once. Later flags win (-n 0).
exec .venv/bin/python -m pytest -n "${TEST_WORKERS:-2}" --dist loadfile "$@"
