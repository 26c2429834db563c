"""The face crops of every video frame, computed once per package and memory-mapped.

The gateway's store (`gateway.store.prepare_avatar`) needs, per video frame ``v`` of an avatar
(docs/REFERENCE.md s.2 steps 2-3), the INTER_CUBIC-resized crop ``crops[v]`` (uint8
``[328, 328, 3]``) and its C-contiguous centre ``inners[v]`` (uint8 ``[320, 320, 3]``, the model
input). They are computed from ``frames.npy`` and ``rects.npy``, about 0.6 MB per video frame
(63 MB for the 100-frame demo, 157 MB for a 250-frame avatar), so every gateway process holding
its own copy costs that much again per worker.

`CropCache` writes them once into ``<root>/<key>/{crops,inners}.npy`` and memory-maps them
read-only, so the gateway workers (`gateway.workers`) share one copy in the page cache. The key
is the sha256 of what the crops depend on: the package's ``frames.npy`` and ``rects.npy``
checksums (from its verified manifest), `CROP_CACHE_FORMAT` and the OpenCV version (the
resize). A cache entry is published atomically (a complete folder renamed into place, under the
cache's folder lock, so two workers loading one package compute it once) and checked when read:
``meta.json`` records each file's size and sha256, and an entry that does not match is computed
again. Where the cache folder cannot be written, the crops are computed into this process's RAM
(logged once per package). That entry logic is `gateway.cache_entries.CacheEntries`, shared
with the background JPEGs' cache (`gateway.background_cache`).
"""
from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray

from gateway.cache_entries import Arrays, CacheEntries, Info
from gateway.errors import PackageRejected
from lipsync.contract import CROP_SIZE, INNER_SIZE
from lipsync.frames import crop_328, inner_320
from lipsync.package import AvatarPackage, check_cancel

CROP_CACHE_FORMAT = 2
"""Version of the cache entry's layout and of the crop math; a change makes new keys (2: the
``meta.json`` of `gateway.cache_entries`)."""


@dataclass(frozen=True)
class FaceCrops:
    """The crops of every video frame of one package.

    Attributes:
        crops: uint8 ``[N, 328, 328, 3]`` BGR, read-only (a memmap when cached).
        inners: uint8 ``[N, 320, 320, 3]`` BGR, C-contiguous, read-only.
        mapped: whether both are memory-mapped from a cache entry (shared between processes).
    """

    crops: NDArray[np.uint8]
    inners: NDArray[np.uint8]
    mapped: bool


def compute_crops(package: AvatarPackage, cancel: threading.Event | None = None) -> FaceCrops:
    """Crop and resize every video frame of ``package`` in RAM (docs/REFERENCE.md s.2 steps 2-3).

    Args:
        package: a package from `lipsync.package.load_package`.
        cancel: when set (by another thread), stop before the next frame.

    Returns:
        `FaceCrops` with ``mapped=False``.

    Raises:
        PackageRejected: no frames, rectangles not ``[N, 4]``, or a rectangle the crop math
            refuses.
        lipsync.package.LoadCancelled: ``cancel`` was set.
    """
    frames = package.frames
    rects = np.asarray(package.rects, dtype=np.int32)
    n = int(frames.shape[0])
    if n == 0 or rects.shape != (n, 4):
        raise PackageRejected(
            f"package {package.name!r} has {n} frames and rects of shape {list(rects.shape)}; "
            f"need at least one frame and rects [N, 4]"
        )
    crops = np.empty((n, CROP_SIZE, CROP_SIZE, 3), dtype=np.uint8)
    inners = np.empty((n, INNER_SIZE, INNER_SIZE, 3), dtype=np.uint8)
    for v in range(n):
        check_cancel(cancel, f"at frame {v} of {n}")
        try:
            crops[v] = crop_328(frames[v], rects[v])
        except ValueError as exc:
            raise PackageRejected(f"package {package.name!r}, frame {v}: {exc}") from exc
        inners[v] = inner_320(crops[v])
    crops.setflags(write=False)
    inners.setflags(write=False)
    return FaceCrops(crops, inners, mapped=False)


def cache_key(package: AvatarPackage) -> str:
    """Hex sha256 naming ``package``'s cache entry (module doc: what it covers)."""
    files = package.manifest.files
    text = f"{CROP_CACHE_FORMAT}|{cv2.__version__}|{files.frames.sha256}|{files.rects.sha256}"
    return hashlib.sha256(text.encode()).hexdigest()


class CropCache:
    """Face crops on disk, memory-mapped (module doc; the entry logic is
    `gateway.cache_entries.CacheEntries`'s).

    Args:
        root: the cache folder (created when first written), e.g. ``.cache/crops``.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._entries = CacheEntries(self.root, "crop", CROP_CACHE_FORMAT)

    def entry(self, package: AvatarPackage) -> Path:
        """The folder of ``package``'s cache entry (it may not exist)."""
        return self._entries.entry(cache_key(package))

    def crops(self, package: AvatarPackage, cancel: threading.Event | None = None) -> FaceCrops:
        """``package``'s crops, mapped from its cache entry, which is written first if missing
        or not intact.

        Args:
            package: a package from `lipsync.package.load_package`.
            cancel: when set (by another thread), stop at the next frame or hashed chunk.

        Raises:
            PackageRejected: the crops cannot be computed (`compute_crops`).
            lipsync.package.LoadCancelled: ``cancel`` was set.
        """

        def open_entry(arrays: Arrays, info: Info) -> FaceCrops:
            return _open(arrays, package.frame_count)

        return self._entries.get(
            cache_key(package),
            compute=lambda: compute_crops(package, cancel),
            save=_save,
            open=open_entry,
            held=f"the crops of {package.name!r} are",
            cancel=cancel,
        )


def _save(computed: FaceCrops) -> tuple[Arrays, Info]:
    """``crops`` and ``inners``; no info."""
    return {"crops": computed.crops, "inners": computed.inners}, {}


def _open(arrays: Arrays, n: int) -> FaceCrops:
    """The crops of an entry's memory-mapped arrays.

    Raises:
        ValueError: shapes or dtypes other than ``n`` crops and inners (or not C-contiguous).
        KeyError: an array missing.
    """
    crops, inners = arrays["crops"], arrays["inners"]
    if (
        crops.shape != (n, CROP_SIZE, CROP_SIZE, 3) or inners.shape != (n, INNER_SIZE, INNER_SIZE, 3)
        or crops.dtype != np.uint8 or inners.dtype != np.uint8 or not inners.flags.c_contiguous
    ):
        raise ValueError(f"wrong shapes for {n} video frames")
    return FaceCrops(crops, inners, mapped=True)
