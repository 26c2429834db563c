#!/usr/bin/env bash
# Sets up the machine (scripts/setup.sh) and runs the whole test suite against the real
# CPU tritonserver, the demo avatar (built on first use) and headless Chromium.
# Extra arguments go to pytest, e.g. scripts/test.sh -k triton -x
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
