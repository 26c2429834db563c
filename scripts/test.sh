#!/usr/bin/env bash
# What CI runs: sets up the machine (scripts/setup.sh), then lint (ruff), types (mypy) and the
# whole test suite against the real CPU tritonserver, the demo avatar (built on first use) and
# headless Chromium. Extra arguments go to pytest, e.g. scripts/test.sh -k triton -x
# The fast loop while developing is scripts/check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
echo "test: ruff check"
.venv/bin/python -m ruff check .
echo "test: mypy"
.venv/bin/python -m mypy
echo "test: pytest (whole suite)"
exec .venv/bin/python -m pytest "$@"
