#!/usr/bin/env bash
# Sets up a fresh Debian 12 / Python 3.11 machine for this project (idempotent):
#   - Debian packages: real speech for the demo avatar (pocketsphinx-testdata), headless
#     Chromium for the browser test, docker-compose to validate the compose file, libb64 for
#     perf_analyzer, libpython3.11 for the Triton Python-backend stub, libturbojpeg0 for the
#     JPEG encoder comparison in perf/;
#   - a virtual environment at .venv/ with the project and all its extras installed.
# Usage: scripts/setup.sh            (everything)
#        LIPSYNC_SKIP_APT=1 scripts/setup.sh   (skip the Debian packages)
set -euo pipefail
cd "$(dirname "$0")/.."

# Not kubernetes-client: Debian 12's kubectl is 1.20, whose Kustomize (v2) cannot render
# deploy/k8s (v5 syntax); tests/test_k8s.py renders with a kubectl >= 1.27 where one is
# installed and says so when none is.
APT_PACKAGES=(pocketsphinx-testdata chromium chromium-driver docker-compose libb64-0d libpython3.11 libturbojpeg0)

if [[ "${LIPSYNC_SKIP_APT:-0}" != "1" ]]; then
  missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  if ((${#missing[@]})); then
    echo "setup: installing Debian packages: ${missing[*]}"
    SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
fi

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [[ ! -x .venv/bin/python ]]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
echo "setup: installing the project and its extras into .venv (torch CPU build, tritonserver wheel, ...)"
.venv/bin/python -m pip install -q --progress-bar off -e ".[export,triton,dev]"
echo "setup: done. Activate with: source .venv/bin/activate"
