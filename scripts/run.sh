#!/usr/bin/env bash
# Sets up the machine (scripts/setup.sh), then starts the main job: builds the demo avatar
# if it is missing, starts the local CPU tritonserver and the gateway, and prints the web page
# URL and the gRPC address. Ctrl-C stops both. Extra arguments go to `lipsync up`.
set -euo pipefail
cd "$(dirname "$0")/.."
LIPSYNC_SKIP_APT="${LIPSYNC_SKIP_APT:-0}" scripts/setup.sh
exec .venv/bin/lipsync up "$@"
