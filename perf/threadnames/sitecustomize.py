"""Give every Python thread its `threading` name as native (kernel) thread name.

Python 3.11 does not name the OS threads it starts, so in /proc every thread of a Python
process shows the process name. Put this folder first on ``PYTHONPATH`` (what
`perf.procstat.thread_name_env` does) and every `threading.Thread` sets its native name with
``prctl(PR_SET_NAME)`` as it starts: ``composite_0`` for the gateway's paste-back + JPEG pool,
``asyncio_0`` for asyncio's default executor, and for an unnamed ``Thread-N (target)`` the
target's name (``_poll_wrapper``: grpc.aio's poller). The kernel keeps 15 bytes of the name.
Nothing else changes: the hook is one system call per thread start. Used by
`perf.capacity` so its CPU split by thread can tell the gateway's threads apart; a
``sitecustomize`` that this one shadows is still run.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib.machinery
import importlib.util
import re
import sys
import threading
from pathlib import Path

_PR_SET_NAME = 15  # linux/prctl.h
_UNNAMED = re.compile(r"^Thread-\d+ \((.+)\)$")


def _native_name(name: str) -> bytes:
    m = _UNNAMED.match(name)
    return (m.group(1) if m else name).encode("utf-8", "replace")[:15]


def _install() -> None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return
    original = threading.Thread._bootstrap_inner  # type: ignore[attr-defined]  # private, not in typeshed

    def bootstrap_inner(self: threading.Thread) -> None:
        prctl(_PR_SET_NAME, ctypes.c_char_p(_native_name(self.name)), 0, 0, 0)
        original(self)

    threading.Thread._bootstrap_inner = bootstrap_inner  # type: ignore[attr-defined]  # as above


def _chain() -> None:
    """Run the ``sitecustomize`` this module shadows, if any."""
    here = str(Path(__file__).resolve().parent)
    rest = [p for p in sys.path if p and Path(p).resolve().as_posix() != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


_install()
_chain()
