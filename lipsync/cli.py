"""The `lipsync` console entry point.

Subcommands are registered by the module that owns them, so this file only wires them up:

- `lipsync export ...`   offline side: ONNX export, Triton model repository, avatar packages
                         (`export/cli.py`)
- `lipsync package ...`  avatar packages: build, demo, verify (`export/cli.py`)
- `lipsync triton`       the local CPU tritonserver (`lipsync/triton_local.py`)
- `lipsync gateway`      the gateway: gRPC + HTTP/WebSocket (`gateway/cli.py`)
- `lipsync up`           the main job: demo avatar if missing, CPU Triton and the gateway
                         (`gateway/cli.py`)

Each registrar is imported lazily-cheap: registering a parser must not import torch,
onnxruntime or tritonclient; the command function imports what it needs.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from lipsync.log import setup_logging

_REGISTRARS = ("export.cli", "lipsync.triton_local", "gateway.cli")


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="lipsync",
        description="Real-time lip-sync serving: SyncTalk_2D UNet on Triton behind a gateway.",
    )
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in _REGISTRARS:
        importlib.import_module(module_name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
