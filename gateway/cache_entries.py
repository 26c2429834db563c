"""`CacheEntries`: values computed once per key into a folder on disk and memory-mapped from there.

What the gateway's caches share (`gateway.crop_cache` for the face crops,
`gateway.background_cache` for the background JPEGs): a value is written once into
``<root>/<key>/`` as a few numpy arrays (``<name>.npy``) plus ``meta.json``, and every process
(the gateway workers, `gateway.workers`; a restarted worker) maps those arrays read-only instead
of computing the value again, so they share one copy in the page cache.

- **Publishing**: the value is computed and written under the root's folder lock
  (`export.publish.folder_lock`), into a temporary folder that is renamed into place when
  complete (`export.publish.replace_folder`); two processes asking for one key at once compute
  it once, and a reader never sees a part of an entry.
- **Checking on read**: ``meta.json`` records each file's size and sha256 and an ``info`` object
  of the caller's (e.g. the value's digest); every file is hashed again when the entry is read,
  and an entry that does not match (or that the caller's ``open`` refuses) is logged as a
  warning and computed again.
- **Not writable**: where the root cannot be created, locked or written, the value is computed
  into this process's RAM, with a warning naming the cache, the reason and the value.

The caller says how its value becomes named arrays (``save``) and memory-mapped arrays become its
value (``open``); the key (a hex digest of everything the value depends on) is the caller's too.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray

from export.publish import folder_lock, replace_folder
from lipsync.package import sha256_file

log = logging.getLogger(__name__)

META = "meta.json"
"""The file of an entry recording its format, its files' sizes and sha256, and the caller's info."""

_V = TypeVar("_V")

Info = Mapping[str, Any]
"""JSON-able facts a ``save`` records in ``meta.json`` and ``open`` gets back."""
Arrays = Mapping[str, NDArray[Any]]
"""An entry's arrays by name (file ``<name>.npy``)."""


class CacheEntries:
    """The entries under one cache folder (module doc).

    Args:
        root: the cache folder (created when first written).
        what: what the entries hold, for messages (``crop``, ``background``).
        format: the entry layout's version, recorded in ``meta.json`` (the caller's key covers it).
    """

    def __init__(self, root: Path, what: str, format: int) -> None:
        self.root = Path(root)
        self.what = what
        self.format = format

    def entry(self, key: str) -> Path:
        """The folder of ``key``'s entry (it may not exist)."""
        return self.root / key

    def get(
        self,
        key: str,
        *,
        compute: Callable[[], _V],
        save: Callable[[_V], tuple[Arrays, Info]],
        open: Callable[[Arrays, Info], _V],
        held: str,
        cancel: threading.Event | None = None,
    ) -> _V:
        """``key``'s value, opened from its entry, which is written first if missing or not intact.

        Args:
            key: the entry's name, a hex digest of everything the value depends on.
            compute: computes the value in RAM (called at most once).
            save: the value's arrays to write, by name, and the info to record.
            open: the value from an entry's arrays (checked against ``meta.json``, then
                memory-mapped read-only) and its info; raises ``ValueError`` or ``KeyError``
                when they do not fit (wrong names, shapes): the entry is then computed again.
            held: what the value is, for messages (``the crops of 'demo'``).
            cancel: when set (by another thread), stop at the next hashed chunk.

        Returns:
            The value from ``open``, or from ``compute`` where the root is not writable.

        Raises:
            Whatever ``compute`` raises; `lipsync.package.LoadCancelled` when ``cancel`` was set.
        """
        entry = self.entry(key)
        found = self._read(entry, open, cancel)
        if found is not None:
            return found
        computed: _V | None = None
        try:
            with folder_lock(self.root):  # another process may be writing this entry now
                found = self._read(entry, open, cancel)
                if found is not None:
                    return found
                computed = compute()
                self._write(entry, computed, save)
        except OSError as exc:
            log.warning(
                "%s cache %s not writable (%s): %s held in this process's RAM",
                self.what, self.root, exc, held,
            )
            # computed already when only the write failed
            return computed if computed is not None else compute()
        mapped = self._read(entry, open, cancel)
        return mapped if mapped is not None else computed

    def _read(
        self, entry: Path, open: Callable[[Arrays, Info], _V], cancel: threading.Event | None
    ) -> _V | None:
        """The entry opened, or None when it is missing or does not match its ``meta.json``."""
        try:
            meta = json.loads((entry / META).read_text())
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (OSError, ValueError) as exc:
            log.warning("%s cache entry %s is not intact (%s): computing it again", self.what, entry, exc)
            return None
        try:
            arrays: dict[str, NDArray[Any]] = {}
            for name, recorded in meta["files"].items():
                path = entry / name
                intact = path.stat().st_size == recorded["size_bytes"]
                if not intact or sha256_file(path, cancel=cancel) != recorded["sha256"]:
                    raise ValueError(f"{path.name} does not match {META}")
                arrays[path.stem] = np.load(path, mmap_mode="r", allow_pickle=False)
            return open(arrays, meta.get("info", {}))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("%s cache entry %s is not intact (%s): computing it again", self.what, entry, exc)
            return None

    def _write(self, entry: Path, value: _V, save: Callable[[_V], tuple[Arrays, Info]]) -> None:
        """Publish ``value`` as ``entry`` (a complete folder renamed into place)."""
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{entry.name}."))
        try:
            arrays, info = save(value)
            files: dict[str, dict[str, int | str]] = {}
            for name, array in arrays.items():
                path = tmp / f"{name}.npy"
                np.save(path, array, allow_pickle=False)
                files[path.name] = {"size_bytes": path.stat().st_size, "sha256": sha256_file(path)}
            (tmp / META).write_text(json.dumps({"format": self.format, "files": files, "info": dict(info)}))
            tmp.chmod(0o755)
            replace_folder(tmp, entry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        size = sum(int(f["size_bytes"]) for f in files.values())
        log.info("%s cache: wrote %s (%.0f MB)", self.what, entry, size / 1e6)
