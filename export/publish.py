"""Atomic publication on the local file system: one writer per folder, atomic swaps.

The model-repository writer (`export/model_repo.py`) and the package builder
(`export/package_builder.py`) publish through these helpers, so that a reader (Triton, the
gateway) only ever sees a complete old or a complete new file or folder, and two writers (two
builds, or two containers sharing a volume) never interleave. Temporary names come from
`tempfile` in the destination's folder: unique per call, never derived from a process id
(which is 1 in every container).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"
"""The lock file a writer holds in the folder it writes (a model repository, a packages root)."""

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold the exclusive `fcntl.flock` of ``<folder>/.lock`` for the duration of the block.

    The folder and the lock file are created if missing. Blocks (and logs that it waits) while
    another writer holds the lock. The kernel drops the lock when its holder exits, so a crashed
    writer never leaves it held. ``flock`` locks belong to an open file description: two threads
    of one process exclude each other as two processes do.
    """
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another writer of %s (lock %s)", folder, folder / LOCK_NAME)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename, so a
    reader sees the old or the new content, never a part. Mode 0644."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns:
        False where the C library or the file system lacks the call (nothing was changed).

    Raises:
        OSError: any other failure of the call.
    """
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def replace_folder(new: Path, dest: Path) -> None:
    """Put the finished folder ``new`` at ``dest`` (same file system), deleting what was there.

    An existing ``dest`` is swapped with ``new`` in one step (``RENAME_EXCHANGE``), so a reader
    finds the old or the new folder at ``dest`` at every instant. Where the file system cannot
    swap, the old folder is first renamed to a unique temporary name next to it; ``dest`` is then
    missing for the instant between the two renames.

    Raises:
        OSError: a rename failed (``dest`` is left as it was).
    """
    if not dest.exists():
        os.rename(new, dest)
        return
    if _exchange(new, dest):
        shutil.rmtree(new, ignore_errors=True)  # the old folder, now at `new`
        return
    aside = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.old."))
    os.replace(dest, aside)  # onto an empty folder: allowed
    try:
        os.replace(new, dest)
    except BaseException:
        os.replace(aside, dest)
        raise
    shutil.rmtree(aside, ignore_errors=True)
