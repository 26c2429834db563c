#!/usr/bin/env bash
# Regenerates the committed Python stubs of proto/lipsync.proto, live.proto and admin.proto into
# OUT_DIR (default proto/). Needs grpcio-tools (dev extra); the gateway itself only needs the
# committed stubs. The generated `import X_pb2` lines (gRPC stubs, and admin.proto's import of
# lipsync.proto) are rewritten to package-relative imports so the stubs work as
# `proto.lipsync_pb2_grpc`, `proto.live_pb2_grpc`, `proto.admin_pb2`.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT_DIR="${1:-$ROOT/proto}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
mkdir -p "$OUT_DIR"
for name in lipsync live admin; do
  "$PYTHON" -m grpc_tools.protoc \
    -I "$ROOT/proto" \
    --python_out="$OUT_DIR" \
    --pyi_out="$OUT_DIR" \
    --grpc_python_out="$OUT_DIR" \
    "$ROOT/proto/$name.proto"
done
# `import lipsync_pb2 as lipsync__pb2` (and `as _lipsync_pb2` in .pyi) -> package-relative
for name in lipsync live admin; do
  sed -i -E "s/^import (lipsync|live|admin)_pb2 as (_?\1_+pb2)\$/from . import \1_pb2 as \2/" \
    "$OUT_DIR/${name}_pb2.py" "$OUT_DIR/${name}_pb2.pyi" "$OUT_DIR/${name}_pb2_grpc.py"
done
