"""The `lipsync` console entry point.

The commands are registered by the modules that own them, listed once in `COMMAND_MODULES`:

- `lipsync export ...`   ONNX export and the Triton model repository (`export/cli.py`)
- `lipsync package ...`  avatar packages: build, demo, verify (`export/package_cli.py`)
- `lipsync triton`       the local CPU tritonserver (`lipsync/triton_local.py`)
- `lipsync gateway`      the gateway: gRPC + HTTP/WebSocket (`gateway/cli.py`)
- `lipsync up`           the main job: demo avatar if missing, CPU Triton and the gateway
                         (`gateway/cli.py`)

Each of those modules has one `register(subparsers: Subparsers) -> None`, which adds its parsers
and sets `func` on each of them to a command function `(args: argparse.Namespace) -> int`
(the process exit status). Registering must not import torch, onnx, onnxruntime or
tritonclient: a command function imports what it needs.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from lipsync.log import setup_logging

if TYPE_CHECKING:
    from typing import TypeAlias

    Subparsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]
    """What `register` receives: the top-level `add_subparsers()` action."""

COMMAND_MODULES = ("export.cli", "export.package_cli", "lipsync.triton_local", "gateway.cli")
"""The modules whose `register(subparsers)` adds the `lipsync` commands, in help order."""


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every command registered."""
    parser = argparse.ArgumentParser(
        prog="lipsync",
        description="Real-time lip-sync serving: SyncTalk_2D UNet on Triton behind a gateway.",
    )
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit status of the command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    status: int = args.func(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
