"""Structured logging setup shared by every command.

Library code logs through `logging.getLogger(__name__)`; only the CLI calls `setup_logging`.
"""
from __future__ import annotations

import logging
import os

from rich.logging import RichHandler

_FORMAT = "%(name)s: %(message)s"


def setup_logging(level: str | int | None = None, *, prefix: str = "") -> None:
    """Configure the root logger once: rich console output, level from `LIPSYNC_LOG_LEVEL`.

    Args:
        level: a logging level name or number; defaults to `$LIPSYNC_LOG_LEVEL` or INFO.
        prefix: put before every message (a gateway worker's "worker 2: ").
    """
    level = level or os.environ.get("LIPSYNC_LOG_LEVEL", "INFO")
    logging.basicConfig(
        level=level,
        format=prefix + _FORMAT,
        datefmt="%H:%M:%S",
        handlers=[RichHandler(show_path=False, rich_tracebacks=True, markup=False)],
        force=True,
    )
