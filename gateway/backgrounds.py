"""`AvatarBackgrounds`: an avatar's video frames as JPEGs, split for splicing (issue 9).

Every output frame of an avatar is one of its video frames with only the face rectangle
changed. At load (in the store's worker thread, never on the event loop) each video frame ``v``
is encoded once at the serving quality and subsampling with a restart marker every ``R`` MCUs
and split into its restart intervals (`BackgroundJpegs`: all JPEGs in one buffer, with the
offsets `lipsync.jpeg_splice.SplicedBackground` needs), and the splice plan of its face
rectangle is made (`lipsync.jpeg_splice.SplicePlan`: the rectangle aligned to the restart grid,
`lipsync.jpeg_splice.aligned_rect`). Per frame the compositor then encodes only that rectangle
and splices it in (`gateway.compositor`).

The JPEGs and offsets depend on the video frames and the `lipsync.jpeg_splice.SpliceSettings`
only, so they are encoded once per package and memory-mapped from a cache entry
(`gateway.background_cache`), shared by the gateway workers; without a cache they are encoded
into this process's RAM (`BackgroundJpegs.encode`), about 55 KiB and 2 ms of one core per
880x720 video frame (`perf/results/bench_splice.md`). The plans depend on the face rectangles
too and are made in every process (`AvatarBackgrounds.of`): views into the JPEGs, no copies.

The same JPEGs are what a crop-output client draws the face rectangle over: the HTTP app
serves them at ``/api/avatars/{name}/backgrounds/{video_frame}.jpg``.
"""
from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from lipsync.jpeg_splice import (
    McuGrid,
    SplicedBackground,
    SplicePlan,
    SpliceSettings,
    aligned_rect,
)
from lipsync.package import check_cancel, plain_view


@dataclass(frozen=True, slots=True)
class BackgroundJpegs:
    """The background JPEG of every video frame of one avatar, one after the other in one buffer,
    with the offsets that split each into its restart intervals.

    Attributes:
        settings: the encoder settings of every JPEG.
        grid: the frames' MCU / restart grid (every frame has the same size).
        jpegs: uint8 ``[B]``, the ``N`` JPEGs back to back, read-only (a memmap when mapped).
        bounds: int64 ``[N + 1]``: JPEG ``v`` is ``jpegs[bounds[v] : bounds[v + 1]]``.
        starts: int64 ``[N, K]``, ``K = grid.intervals``: byte offset of each restart interval
            in its JPEG (`lipsync.jpeg_splice.SplicedBackground.starts`).
        headers: int64 ``[N, 2]``: each JPEG's ``scan_start`` and ``size_at`` (bytes).
        etag: an HTTP entity tag of the set (the first 32 hex digits of the sha256 of the
            settings' ``repr`` and every JPEG, quoted).
        mapped: whether the arrays are memory-mapped from a cache entry (shared between
            processes).
    """

    settings: SpliceSettings
    grid: McuGrid
    jpegs: NDArray[np.uint8]
    bounds: NDArray[np.int64]
    starts: NDArray[np.int64]
    headers: NDArray[np.int64]
    etag: str
    mapped: bool

    @classmethod
    def encode(
        cls, frames: NDArray[np.uint8], settings: SpliceSettings, cancel: threading.Event | None = None
    ) -> BackgroundJpegs:
        """Encode and split every video frame into this process's RAM (CPU, blocking).

        Args:
            frames: uint8 ``[N, H, W, 3]`` BGR video frames, ``N >= 1``.
            settings: quality, subsampling and restart interval ``R``.
            cancel: when set (by another thread), stop before the next frame.

        Raises:
            ValueError: no frames, or not uint8 ``[N, H, W, 3]``; `lipsync.jpeg_splice.JpegSpliceError`
                (a ValueError) if the encoder's stream cannot be split.
            lipsync.package.LoadCancelled: ``cancel`` was set.
        """
        n = len(frames)
        if n == 0 or frames.ndim != 4:
            raise ValueError(f"need video frames uint8 [N >= 1, H, W, 3], got {list(frames.shape)}")
        digest = hashlib.sha256(repr(settings).encode())
        jpegs: list[bytes] = []
        starts: list[NDArray[np.int64]] = []
        headers = np.empty((n, 2), dtype=np.int64)
        for v in range(n):
            check_cancel(cancel, f"at background JPEG {v} of {n}")
            background = SplicedBackground.encode(frames[v], settings)
            jpeg = bytes(background.jpeg)
            jpegs.append(jpeg)
            starts.append(background.starts)
            headers[v] = background.scan_start, background.size_at
            digest.update(jpeg)
        bounds = np.zeros(n + 1, dtype=np.int64)
        np.cumsum([len(j) for j in jpegs], out=bounds[1:])
        data = np.frombuffer(b"".join(jpegs), dtype=np.uint8)  # read-only, like a mapped entry
        for array in (bounds, headers):
            array.setflags(write=False)
        stacked = np.stack(starts)
        stacked.setflags(write=False)
        etag = f'"{digest.hexdigest()[:32]}"'
        grid = McuGrid.of(int(frames.shape[2]), int(frames.shape[1]), settings)
        return cls(settings, grid, data, bounds, stacked, headers, etag, mapped=False)

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def frame(self, v: int) -> SplicedBackground:
        """Video frame ``v``'s JPEG, split: views of the arrays, no copy.

        Raises:
            IndexError: no such video frame.
        """
        if not 0 <= v < len(self):
            raise IndexError(f"video frame {v} is not in 0..{len(self) - 1}")
        lo, hi = int(self.bounds[v]), int(self.bounds[v + 1])
        scan_start, size_at = (int(x) for x in self.headers[v])
        starts = plain_view(self.starts[v])
        return SplicedBackground(self.jpegs.data[lo:hi], starts, self.grid, scan_start, size_at)

    @property
    def nbytes(self) -> int:
        """Memory held or mapped (bytes): the JPEGs plus the offsets."""
        return int(self.jpegs.nbytes + self.bounds.nbytes + self.starts.nbytes + self.headers.nbytes)


@dataclass(frozen=True, slots=True)
class AvatarBackgrounds:
    """One avatar's split background JPEGs and splice plans, one per video frame.

    Attributes:
        settings: the encoder settings of every background (and of the rectangles spliced in).
        frames: ``N`` split background JPEGs, by video frame (views of ``source``).
        plans: ``N`` splice plans, by video frame: ``plans[v].rect`` is ``(x0, y0, x1, y1)``
            px, the face rectangle of frame ``v`` rounded out to the restart grid.
        etag: an HTTP entity tag of the set (`BackgroundJpegs.etag`), so clients can keep the
            frames across reloads of the same package.
        source: the JPEGs and offsets the frames are views of (mapped or in RAM).
        build_ms: wall time of `of` (ms): the plans, plus the encode in `build`.
    """

    settings: SpliceSettings
    frames: tuple[SplicedBackground, ...]
    plans: tuple[SplicePlan, ...]
    etag: str
    source: BackgroundJpegs
    build_ms: float

    @classmethod
    def of(
        cls, source: BackgroundJpegs, rects: NDArray[np.int32], started: float | None = None
    ) -> AvatarBackgrounds:
        """Split ``source`` per video frame and plan each frame's face rectangle (CPU, blocking).

        Args:
            source: the avatar's JPEGs (`BackgroundJpegs.encode`, or a cache entry).
            rects: int32 ``[N, 4]`` face rectangles ``(x1, y1, x2, y2)`` px, inside the frames.
            started: `time.perf_counter` when the work began (default: now), for ``build_ms``.

        Raises:
            ValueError: a rectangle outside its frame, or JPEGs and rects of different lengths.
        """
        t0 = time.perf_counter() if started is None else started
        if len(source) != len(rects):
            raise ValueError(f"{len(source)} background JPEGs but {len(rects)} rectangles")
        frames = tuple(source.frame(v) for v in range(len(source)))
        plans = tuple(
            SplicePlan.of(background, aligned_rect(rect, background.grid))
            for background, rect in zip(frames, rects, strict=True)
        )
        return cls(source.settings, frames, plans, source.etag, source, (time.perf_counter() - t0) * 1e3)

    @classmethod
    def build(
        cls, frames: NDArray[np.uint8], rects: NDArray[np.int32], settings: SpliceSettings
    ) -> AvatarBackgrounds:
        """Encode every video frame into RAM (`BackgroundJpegs.encode`) and plan its face
        rectangle (`of`).

        Args:
            frames: uint8 ``[N, H, W, 3]`` BGR video frames.
            rects: int32 ``[N, 4]`` face rectangles ``(x1, y1, x2, y2)`` px, inside the frames.
            settings: quality, subsampling and restart interval ``R``.

        Raises:
            ValueError: as `BackgroundJpegs.encode` and `of`.
        """
        t0 = time.perf_counter()
        return cls.of(BackgroundJpegs.encode(frames, settings), rects, t0)

    def jpeg(self, video_frame: int) -> bytes:
        """The JPEG of video frame ``video_frame`` (a complete baseline JFIF with restart markers),
        copied out of ``source`` (bytes for the protocols' replies).

        Raises:
            IndexError: no such video frame (negative numbers included).
        """
        if not 0 <= video_frame < len(self.frames):
            raise IndexError(f"video frame {video_frame} is not in 0..{len(self.frames) - 1}")
        return bytes(self.frames[video_frame].jpeg)

    @property
    def nbytes(self) -> int:
        """Memory held or mapped by the JPEGs and their offsets (bytes; `BackgroundJpegs.nbytes`)."""
        return self.source.nbytes
