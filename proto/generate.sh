#!/usr/bin/env bash
# Regenerates the committed Python stubs of proto/lipsync.proto and proto/live.proto into
# OUT_DIR (default proto/). Needs grpcio-tools (dev extra); the gateway itself only needs the
# committed stubs. The generated `import X_pb2` lines are rewritten to package-relative imports
# so the stubs work as `proto.lipsync_pb2_grpc` and `proto.live_pb2_grpc`.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT_DIR="${1:-$ROOT/proto}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
mkdir -p "$OUT_DIR"
for name in lipsync live; do
  "$PYTHON" -m grpc_tools.protoc \
    -I "$ROOT/proto" \
    --python_out="$OUT_DIR" \
    --pyi_out="$OUT_DIR" \
    --grpc_python_out="$OUT_DIR" \
    "$ROOT/proto/$name.proto"
  sed -i "s/^import ${name}_pb2 as ${name}__pb2\$/from . import ${name}_pb2 as ${name}__pb2/" \
    "$OUT_DIR/${name}_pb2_grpc.py"
done
