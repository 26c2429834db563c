#!/usr/bin/env bash
# The fast loop while developing: lint (ruff), types (mypy) and the fast tier of the tests
# (pytest -m "not slow": no tritonserver, no demo build, no ONNX export, no Chromium; the gateway
# runs against the in-process fake Triton of tests/fake_triton.py). Extra arguments go to
# pytest, e.g. scripts/check.sh -k pipeline -x
# Assumes scripts/setup.sh has run; without a .venv it runs it first, without the Debian
# packages (LIPSYNC_SKIP_APT=1), which the fast tier does not need.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ! -x .venv/bin/python ]]; then
  LIPSYNC_SKIP_APT=1 scripts/setup.sh
fi
echo "check: ruff check"
.venv/bin/python -m ruff check .
echo "check: mypy"
.venv/bin/python -m mypy
echo "check: pytest -m 'not slow'"
exec .venv/bin/python -m pytest -m "not slow" "$@"
