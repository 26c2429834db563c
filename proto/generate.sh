#!/usr/bin/env bash
# Regenerates the committed Python stubs of proto/lipsync.proto into OUT_DIR (default proto/).
# Needs grpcio-tools (dev extra); the gateway itself only needs the committed stubs.
# The generated `import lipsync_pb2` is rewritten to a package-relative import so the stubs
# work as `proto.lipsync_pb2_grpc`.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT_DIR="${1:-$ROOT/proto}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
mkdir -p "$OUT_DIR"
"$PYTHON" -m grpc_tools.protoc \
  -I "$ROOT/proto" \
  --python_out="$OUT_DIR" \
  --pyi_out="$OUT_DIR" \
  --grpc_python_out="$OUT_DIR" \
  "$ROOT/proto/lipsync.proto"
sed -i 's/^import lipsync_pb2 as lipsync__pb2$/from . import lipsync_pb2 as lipsync__pb2/' \
  "$OUT_DIR/lipsync_pb2_grpc.py"
