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
(logged once per package).
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray

from export.publish import folder_lock, replace_folder
from gateway.errors import PackageRejected
from lipsync.contract import CROP_SIZE, INNER_SIZE
from lipsync.frames import crop_328, inner_320
from lipsync.package import AvatarPackage, check_cancel, sha256_file

log = logging.getLogger(__name__)

CROP_CACHE_FORMAT = 1
"""Version of the cache entry's layout and of the crop math; a change makes new keys."""

_FILES = ("crops", "inners")
_META = "meta.json"


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
    """Face crops on disk, memory-mapped (module doc).

    Args:
        root: the cache folder (created when first written), e.g. ``.cache/crops``.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def entry(self, package: AvatarPackage) -> Path:
        """The folder of ``package``'s cache entry (it may not exist)."""
        return self.root / cache_key(package)

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
        entry = self.entry(package)
        found = self._read(entry, package, cancel)
        if found is not None:
            return found
        computed: FaceCrops | None = None
        try:
            with folder_lock(self.root):  # another process may be writing this entry now
                found = self._read(entry, package, cancel)
                if found is not None:
                    return found
                computed = compute_crops(package, cancel)
                self._write(entry, computed)
        except OSError as exc:
            log.warning(
                "crop cache %s not writable (%s): the crops of %r are held in this process's RAM",
                self.root, exc, package.name,
            )
            # computed already when only the write failed
            return computed if computed is not None else compute_crops(package, cancel)
        mapped = self._read(entry, package, cancel)
        return mapped if mapped is not None else computed

    def _read(
        self, entry: Path, package: AvatarPackage, cancel: threading.Event | None = None
    ) -> FaceCrops | None:
        """The entry's arrays memory-mapped, or None when it is missing or does not match its
        ``meta.json`` (size, sha256) or the package's frame count."""
        try:
            meta = json.loads((entry / _META).read_text())
            arrays = {}
            for name in _FILES:
                path = entry / f"{name}.npy"
                recorded = meta["files"][name]
                intact = path.stat().st_size == recorded["size_bytes"]
                if not intact or sha256_file(path, cancel=cancel) != recorded["sha256"]:
                    raise ValueError(f"{path.name} does not match {_META}")
                arrays[name] = np.load(path, mmap_mode="r", allow_pickle=False)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("crop cache entry %s is not intact (%s): computing it again", entry, exc)
            return None
        n = package.frame_count
        crops, inners = arrays["crops"], arrays["inners"]
        if (
            crops.shape != (n, CROP_SIZE, CROP_SIZE, 3) or inners.shape != (n, INNER_SIZE, INNER_SIZE, 3)
            or crops.dtype != np.uint8 or inners.dtype != np.uint8 or not inners.flags.c_contiguous
        ):
            log.warning("crop cache entry %s has the wrong shapes: computing it again", entry)
            return None
        return FaceCrops(crops, inners, mapped=True)

    def _write(self, entry: Path, computed: FaceCrops) -> None:
        """Publish ``computed`` as ``entry`` (a complete folder renamed into place)."""
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{entry.name}."))
        try:
            files: dict[str, dict[str, int | str]] = {}
            for name in _FILES:
                path = tmp / f"{name}.npy"
                np.save(path, getattr(computed, name), allow_pickle=False)
                files[name] = {"size_bytes": path.stat().st_size, "sha256": sha256_file(path)}
            (tmp / _META).write_text(json.dumps({"format": CROP_CACHE_FORMAT, "files": files}))
            tmp.chmod(0o755)
            replace_folder(tmp, entry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        size = computed.crops.nbytes + computed.inners.nbytes
        log.info("crop cache: wrote %s (%.0f MB)", entry, size / 1e6)
