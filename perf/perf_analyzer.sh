#!/usr/bin/env bash
# perf_analyzer against Triton for one avatar's UNet, with real uint8 inputs from its package,
# sweeping concurrency. Fetches the perf_analyzer binary once (from the tritonclient==2.41.1
# wheel, into .cache/perf_analyzer/, NOT into the venv: that wheel would downgrade tritonclient).
#
# Usage (from the repository root):
#   perf/perf_analyzer.sh [--profile cpu|gpu] [--url HOST:PORT] [--model NAME]
#                         [--package DIR] [--concurrency "1 2 4 8"] [--out PREFIX] [-- PA_ARGS...]
# Defaults: Triton's gRPC port on localhost, the package's model, packages/demo. Inputs, shapes
# and the model name come from perf/pa_tools.py (the contract in lipsync/contract.py).
#
# CPU profile, on this machine (start Triton first, in another shell: `lipsync triton`):
#   perf/perf_analyzer.sh --profile cpu --url localhost:8001
# GPU host (`docker compose up`; Triton's gRPC port from .env):
#   perf/perf_analyzer.sh --profile gpu --url localhost:8001
#   (or the same flags with the perf_analyzer of the NGC SDK image
#    nvcr.io/nvidia/tritonserver:24.08-py3-sdk, `--network host`).
#
# Writes PREFIX.txt (perf_analyzer's own output), PREFIX.csv and PREFIX.md (table written by
# perf/pa_tools.py); PREFIX defaults to perf/results/perf_analyzer_<profile>.
# Needs: Debian's libb64-0d; a CUDA runtime (libcudart.so.12): on a machine without one the
# copy inside the nvidia-pytriton wheel (.venv) is used. No GPU is needed for the client.
set -euo pipefail
cd "$(dirname "$0")/.."

PROFILE=cpu
URL=""
MODEL=""
PACKAGE=packages/demo
CONCURRENCY=""
OUT=""
EXTRA=()
while (($#)); do
  case "$1" in
    --profile) PROFILE="$2"; shift 2;;
    --url) URL="$2"; shift 2;;
    --model) MODEL="$2"; shift 2;;
    --package) PACKAGE="$2"; shift 2;;
    --concurrency) CONCURRENCY="$2"; shift 2;;
    --out) OUT="$2"; shift 2;;
    --) shift; EXTRA=("$@"); break;;
    -h|--help) sed -n '2,22p' "$0"; exit 0;;
    *) echo "perf_analyzer.sh: unknown argument $1 (see --help)" >&2; exit 2;;
  esac
done
case "$PROFILE" in
  cpu)  # ~100 ms per frame on 2 shared cores: count windows of 24 requests, loose stability
        # (other work on a small machine makes consecutive windows differ by tens of %)
        CONCURRENCY="${CONCURRENCY:-1 2 4 8}"
        MEASURE=(--measurement-mode count_windows --measurement-request-count 24
                 --stability-percentage 60 --max-trials 10);;
  gpu)  CONCURRENCY="${CONCURRENCY:-1 2 4 8 16 32 64}"
        MEASURE=(--measurement-interval 5000 --stability-percentage 10);;
  *) echo "perf_analyzer.sh: --profile must be cpu or gpu" >&2; exit 2;;
esac
OUT="${OUT:-perf/results/perf_analyzer_${PROFILE}}"
PY="${PYTHON:-.venv/bin/python}"
[[ -x "$PY" ]] || PY=python3
URL="${URL:-localhost:$("$PY" -c 'from lipsync.contract import TRITON_GRPC_PORT; print(TRITON_GRPC_PORT)')}"

PA_VERSION=2.41.1
CACHE="${LIPSYNC_CACHE_DIR:-.cache}/perf_analyzer"
PA="$CACHE/bin/perf_analyzer"
if [[ ! -x "$PA" ]]; then
  echo "perf_analyzer.sh: fetching perf_analyzer $PA_VERSION (tritonclient wheel) into $CACHE"
  mkdir -p "$CACHE/bin"
  "$PY" -m pip download -q --no-deps "tritonclient==$PA_VERSION" --platform manylinux1_x86_64 \
      --only-binary=:all: --python-version 3.11 -d "$CACHE"
  "$PY" - "$CACHE" "$PA_VERSION" <<'PYEOF'
import sys, zipfile, pathlib
cache, version = pathlib.Path(sys.argv[1]), sys.argv[2]
wheel = next(cache.glob(f"tritonclient-{version}-*.whl"))
member = f"tritonclient-{version}.data/data/bin/perf_analyzer"
target = cache / "bin" / "perf_analyzer"
target.write_bytes(zipfile.ZipFile(wheel).read(member))
target.chmod(0o755)
PYEOF
fi

# libcudart.so.12: the system's if any, else the nvidia-pytriton wheel's copy
if ! ldconfig -p | grep -q 'libcudart.so.12'; then
  LIBDIR="$CACHE/lib"
  if [[ ! -e "$LIBDIR/libcudart.so.12" ]]; then
    CUDART=$("$PY" - <<'PYEOF'
import glob, os, site
for base in site.getsitepackages():
    hits = sorted(glob.glob(os.path.join(base, "nvidia_pytriton.libs", "libcudart-*.so.12*")))
    if hits:
        print(hits[0]); break
PYEOF
)
    [[ -n "$CUDART" ]] || { echo "perf_analyzer.sh: no libcudart.so.12 found (install the triton extra: pip install -e '.[triton]')" >&2; exit 1; }
    mkdir -p "$LIBDIR"; ln -sf "$CUDART" "$LIBDIR/libcudart.so.12"
  fi
  export LD_LIBRARY_PATH="$(cd "$LIBDIR" && pwd)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
ldconfig -p | grep -q 'libb64.so.0d' || { echo "perf_analyzer.sh: libb64.so.0d missing: apt-get install libb64-0d" >&2; exit 1; }

INPUT="$CACHE/input_$(basename "$PACKAGE")"
# -m MODEL --input-data DIR --shape NAME:DIMS ..., one per line
mapfile -t INPUT_ARGS < <("$PY" -m perf.pa_tools input --package "$PACKAGE" --frame 10 \
    --out "$INPUT" ${MODEL:+--model "$MODEL"})
MODEL="${INPUT_ARGS[1]}"

mkdir -p "$(dirname "$OUT")"
: > "$OUT.txt"; : > "$OUT.csv"
CMD="perf/perf_analyzer.sh --profile $PROFILE --url $URL --model $MODEL --package $PACKAGE --concurrency \"$CONCURRENCY\""
for c in $CONCURRENCY; do
  args=("${INPUT_ARGS[@]}" -u "$URL" -i grpc
        --concurrency-range "$c:$c" "${MEASURE[@]}" -f "$OUT.c$c.csv" "${EXTRA[@]}")
  echo "+ perf_analyzer ${args[*]}" | tee -a "$OUT.txt"
  "$PA" "${args[@]}" 2>&1 | tee -a "$OUT.txt"
  cat "$OUT.c$c.csv" >> "$OUT.csv"; rm -f "$OUT.c$c.csv"
done
"$PY" -m perf.pa_tools report --csv "$OUT.csv" --text "$OUT.txt" --out "$OUT.md" \
    --title "perf_analyzer $PA_VERSION: $MODEL, $PROFILE profile" --command "$CMD" \
    --note "Input: the real inner crop and audio window of frame 10 of $PACKAGE (${INPUT_ARGS[*]:2}; batch 1 per request; Triton's dynamic batcher batches concurrent requests)." \
    --note "Raw output: \`$(basename "$OUT").txt\`, CSV: \`$(basename "$OUT").csv\` (latencies in us)."
echo "perf_analyzer.sh: wrote $OUT.md"
