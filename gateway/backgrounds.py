"""`AvatarBackgrounds`: an avatar's video frames as JPEGs, split for splicing (issue 9).

Every output frame of an avatar is one of its video frames with only the face rectangle
changed. At load (in the store's worker thread, never on the event loop) each video frame ``v``
is encoded once at the serving quality and subsampling with a restart marker every ``R`` MCUs
and split into its restart intervals (`lipsync.jpeg_splice.SplicedBackground`), and the splice
plan of its face rectangle is made (`lipsync.jpeg_splice.SplicePlan`: the rectangle aligned to
the restart grid, `lipsync.jpeg_splice.aligned_rect`). Per frame the compositor then encodes
only that rectangle and splices it in (`gateway.compositor`).

The same JPEGs are what a crop-output client draws the face rectangle over: the HTTP app
serves them at ``/api/avatars/{name}/backgrounds/{video_frame}.jpg``.

Kept in memory, not in the package: about 15 MiB and 0.5 s of one core per 250 video frames at
880x720 (`perf/results/bench_splice.md`, "Building the backgrounds"); the cache key is the
`lipsync.jpeg_splice.SpliceSettings` (quality, subsampling, ``R``) in ``settings``.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from lipsync.jpeg_splice import (
    SplicedBackground,
    SplicePlan,
    SpliceSettings,
    aligned_rect,
)


@dataclass(frozen=True, slots=True)
class AvatarBackgrounds:
    """One avatar's split background JPEGs and splice plans, one per video frame.

    Attributes:
        settings: the encoder settings of every background (and of the rectangles spliced in).
        frames: ``N`` split background JPEGs, by video frame.
        plans: ``N`` splice plans, by video frame: ``plans[v].rect`` is ``(x0, y0, x1, y1)``
            px, the face rectangle of frame ``v`` rounded out to the restart grid.
        etag: an HTTP entity tag of the set (a digest of the settings and of every JPEG), so
            clients can keep the frames across reloads of the same package.
        build_ms: wall time of `build` (ms).
    """

    settings: SpliceSettings
    frames: tuple[SplicedBackground, ...]
    plans: tuple[SplicePlan, ...]
    etag: str
    build_ms: float

    @classmethod
    def build(
        cls, frames: NDArray[np.uint8], rects: NDArray[np.int32], settings: SpliceSettings
    ) -> AvatarBackgrounds:
        """Encode and split every video frame and plan its face rectangle (CPU, blocking).

        Args:
            frames: uint8 ``[N, H, W, 3]`` BGR video frames.
            rects: int32 ``[N, 4]`` face rectangles ``(x1, y1, x2, y2)`` px, inside the frames.
            settings: quality, subsampling and restart interval ``R``.

        Raises:
            ValueError: a rectangle outside its frame, or frames/rects of different lengths;
                `lipsync.jpeg_splice.JpegSpliceError` (a ValueError) if the encoder's stream
                cannot be split.
        """
        t0 = time.perf_counter()
        if len(frames) != len(rects):
            raise ValueError(f"{len(frames)} frames but {len(rects)} rectangles")
        digest = hashlib.sha256(repr(settings).encode())
        backgrounds: list[SplicedBackground] = []
        plans: list[SplicePlan] = []
        for frame, rect in zip(frames, rects, strict=True):
            background = SplicedBackground.encode(frame, settings)
            backgrounds.append(background)
            plans.append(SplicePlan.of(background, aligned_rect(rect, background.grid)))
            digest.update(background.jpeg)
        return cls(
            settings, tuple(backgrounds), tuple(plans), f'"{digest.hexdigest()[:32]}"',
            (time.perf_counter() - t0) * 1e3,
        )

    def jpeg(self, video_frame: int) -> bytes:
        """The JPEG of video frame ``video_frame`` (a complete baseline JFIF with restart markers).

        Raises:
            IndexError: no such video frame (negative numbers included).
        """
        if not 0 <= video_frame < len(self.frames):
            raise IndexError(f"video frame {video_frame} is not in 0..{len(self.frames) - 1}")
        return self.frames[video_frame].jpeg

    @property
    def nbytes(self) -> int:
        """Memory held by the JPEGs and their interval offsets (bytes)."""
        return sum(b.nbytes for b in self.frames)
