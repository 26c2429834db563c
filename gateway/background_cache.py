"""The background JPEGs of every video frame, encoded once per package and settings, memory-mapped.

The spliced JPEG path (`gateway.backgrounds`, issue 9) needs every video frame of an avatar
encoded at the serving quality and subsampling with restart markers, and the byte offsets of its
restart intervals: about 55 KiB and 2 ms of one core per 880x720 video frame
(`perf/results/bench_splice.md`), so a 5000-frame avatar costs ~270 MB and ~10 s per gateway
process that encodes its own copy.

`BackgroundCache` writes them once into ``<root>/<key>/`` and memory-maps them read-only, so
the gateway workers (`gateway.workers`) share one copy in the page cache, and a restarted or
second worker maps the entry instead of encoding. The entry logic (``meta.json`` with each
file's size and sha256, atomic publication under the folder lock, checks on read, the fallback
to RAM where the folder is not writable) is `gateway.cache_entries.CacheEntries`, shared with the
face crops' cache (`gateway.crop_cache`); the root is the ``backgrounds`` folder inside the crop
cache's folder (`GatewaySettings.crop_cache_dir`).

An entry's files (`BackgroundJpegs`'s arrays): ``jpegs.npy`` uint8 ``[B]`` (the JPEGs back to
back), ``bounds.npy`` int64 ``[N + 1]``, ``starts.npy`` int64 ``[N, K]``, ``headers.npy``
int64 ``[N, 2]``; ``meta.json``'s info holds the etag. The key is the sha256 of everything the
bytes depend on: the package's ``frames.npy`` checksum (from its verified manifest), the
`lipsync.jpeg_splice.SpliceSettings` (quality, subsampling, restart interval ``R``), the OpenCV
version (the encoder: OpenCV's wheel carries its libjpeg-turbo) and `BACKGROUND_CACHE_FORMAT`.
The face rectangles do not enter: the splice plans that depend on them are made in every
process (`gateway.backgrounds.AvatarBackgrounds.of`).
"""
from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import cv2
import numpy as np

from gateway.backgrounds import BackgroundJpegs
from gateway.cache_entries import Arrays, CacheEntries, Info
from lipsync.jpeg_splice import McuGrid, SpliceSettings
from lipsync.package import AvatarPackage

BACKGROUND_CACHE_FORMAT = 1
"""Version of the entry's layout and of the split; a change makes new keys."""

SUBFOLDER = "backgrounds"
"""The cache's folder inside the crop cache's (`GatewaySettings.crop_cache_dir`)."""

_ARRAYS = ("jpegs", "bounds", "starts", "headers")


def cache_key(package: AvatarPackage, settings: SpliceSettings) -> str:
    """Hex sha256 naming the entry of ``package``'s backgrounds at ``settings`` (module doc)."""
    text = (
        f"backgrounds|{BACKGROUND_CACHE_FORMAT}|{cv2.__version__}|{package.manifest.files.frames.sha256}|"
        f"q{settings.quality}|{settings.subsampling}|R{settings.restart_mcus}"
    )
    return hashlib.sha256(text.encode()).hexdigest()


class BackgroundCache:
    """Background JPEGs on disk, memory-mapped (module doc).

    Args:
        root: the cache folder (created when first written), e.g. ``.cache/crops/backgrounds``.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._entries = CacheEntries(self.root, "background", BACKGROUND_CACHE_FORMAT)

    def entry(self, package: AvatarPackage, settings: SpliceSettings) -> Path:
        """The folder of the entry of ``package`` at ``settings`` (it may not exist)."""
        return self._entries.entry(cache_key(package, settings))

    def jpegs(
        self, package: AvatarPackage, settings: SpliceSettings, cancel: threading.Event | None = None
    ) -> BackgroundJpegs:
        """``package``'s background JPEGs at ``settings``, mapped from their cache entry, which is
        written first if missing or not intact.

        Args:
            package: a package from `lipsync.package.load_package`.
            settings: the serving encoder's settings for the package's frame width.
            cancel: when set (by another thread), stop at the next frame or hashed chunk.

        Raises:
            ValueError: as `BackgroundJpegs.encode`.
            lipsync.package.LoadCancelled: ``cancel`` was set.
        """
        frames = package.frames
        grid = McuGrid.of(int(frames.shape[2]), int(frames.shape[1]), settings)

        def open_entry(arrays: Arrays, info: Info) -> BackgroundJpegs:
            return _open(arrays, info, settings, grid, int(frames.shape[0]))

        return self._entries.get(
            cache_key(package, settings),
            compute=lambda: BackgroundJpegs.encode(frames, settings, cancel),
            save=_save,
            open=open_entry,
            held=f"the background JPEGs of {package.name!r} are",
            cancel=cancel,
        )


def _save(jpegs: BackgroundJpegs) -> tuple[Arrays, Info]:
    """The arrays of ``jpegs``; the info is the etag."""
    return {name: getattr(jpegs, name) for name in _ARRAYS}, {"etag": jpegs.etag}


def _open(arrays: Arrays, info: Info, settings: SpliceSettings, grid: McuGrid, n: int) -> BackgroundJpegs:
    """The backgrounds of an entry's memory-mapped arrays.

    Raises:
        ValueError: arrays that do not fit ``n`` frames on ``grid``; KeyError: an array or the
            etag missing.
    """
    data, bounds, starts, headers = (arrays[name] for name in _ARRAYS)
    if (
        data.dtype != np.uint8 or data.ndim != 1
        or bounds.dtype != np.int64 or bounds.shape != (n + 1,)
        or starts.dtype != np.int64 or starts.shape != (n, grid.intervals)
        or headers.dtype != np.int64 or headers.shape != (n, 2)
        or bounds[0] != 0 or bounds[-1] != len(data) or np.any(np.diff(bounds) <= 0)
    ):
        raise ValueError(f"arrays do not fit {n} video frames of {grid.width}x{grid.height} px")
    return BackgroundJpegs(settings, grid, data, bounds, starts, headers, str(info["etag"]), mapped=True)
