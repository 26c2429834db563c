"""A child process in a process group of its own, stopped with its whole group.

For tools and tests that start a server (the gateway, the baseline) as a child: the child and
anything it starts share one process group, so stopping the group leaves nothing behind, and a
Ctrl-C in the parent's terminal does not reach it first.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path


@contextlib.contextmanager
def process_group(
    cmd: Sequence[str], *, env: dict[str, str], log_path: Path, cwd: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run `cmd` in a new session (its own process group), stdout and stderr into `log_path`.

    On exit the group gets SIGTERM, then SIGKILL when the child has not exited within 20 s; the
    group is signalled even when the child itself already exited (its children may not have).
    """
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            list(cmd), cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield proc
    finally:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)
