"""Whether the answers of a gRPC batch fit the send limit, decided before any frame is rendered.

A ``BatchInferenceResponse`` carries one JPEG per asked frame; past ``grpc_max_send_bytes``
(64 MiB) gRPC cannot send it, and the work of rendering every frame is lost. `ResponseBudget`
bounds one answer of an avatar from its own frames, measured once per loaded avatar:

    bound = 1.25 x (largest JPEG of 3 sample video frames, as the gateway encodes them)
            + 4.5 bytes x (largest crop rectangle, px)       # the face region, worst case
            + RESPONSE_OVERHEAD_BYTES                         # the other fields

The face term is the worst JPEG size measured on uniform noise (what an untrained UNet paints
there): 1.43 bytes per byte of BGR input at quality 100 with 4:4:4 chroma (simplejpeg and OpenCV
alike; 0.53 at quality 85 4:2:0 ... 4:4:4), rounded up to 1.5 x 3 bytes per pixel. The 1.25 covers
the variation between video frames. The bound is meant to be high: a refused batch can be split,
an answer that cannot be sent cannot be repaired.
"""
from __future__ import annotations

import math
import weakref
from collections.abc import Awaitable, Callable

import numpy as np
from numpy.typing import NDArray

from gateway.errors import BadRequest
from gateway.store import Avatar, MiB

NOISE_JPEG_BYTES_PER_PIXEL = 4.5
"""Worst JPEG bytes per pixel measured on uniform noise (1.43 x 3 at q100 4:4:4), rounded up."""
FRAME_VARIATION = 1.25
"""Margin on the sampled frames' JPEG size for the frames not sampled."""
RESPONSE_OVERHEAD_BYTES = 512
"""Per answer: ids, times, bounds, shape, the optimizations list and protobuf framing (~250 B)."""

Encode = Callable[[NDArray[np.uint8]], Awaitable[bytes]]


class ResponseBudget:
    """Bounds the bytes of batch answers per avatar (module doc).

    Args:
        encode: the gateway's JPEG encoder, as the pipeline runs it (uint8 ``[H, W, 3]`` BGR ->
            JPEG bytes, in its thread pool).
        limit_bytes: the largest message the gRPC server sends (``grpc_max_send_bytes``).
    """

    def __init__(self, encode: Encode, limit_bytes: int) -> None:
        self.encode = encode
        self.limit_bytes = limit_bytes
        self._bounds: dict[str, tuple[weakref.ref[Avatar], int]] = {}

    async def frame_bytes(self, avatar: Avatar) -> int:
        """Upper bound of one answer's bytes for ``avatar`` (measured on first use, then cached
        until the avatar is reloaded)."""
        cached = self._bounds.get(avatar.name)
        if cached is not None and cached[0]() is avatar:
            return cached[1]
        n = avatar.video_frames
        sizes = [len(await self.encode(avatar.frames[v])) for v in sorted({0, n // 2, n - 1})]
        rects = avatar.rects.astype(np.int64)
        face_px = int(((rects[:, 2] - rects[:, 0]) * (rects[:, 3] - rects[:, 1])).max())
        jpeg_bytes = FRAME_VARIATION * max(sizes) + NOISE_JPEG_BYTES_PER_PIXEL * face_px
        bound = math.ceil(jpeg_bytes) + RESPONSE_OVERHEAD_BYTES
        self._bounds[avatar.name] = (weakref.ref(avatar), bound)
        return bound

    async def check(self, avatar: Avatar, frames: int) -> None:
        """Refuse a batch of ``frames`` answers of ``avatar`` that may not fit the send limit.

        Raises:
            BadRequest: with the bound, the limit and the most frames that fit.
        """
        per_frame = await self.frame_bytes(avatar)
        if frames * per_frame + RESPONSE_OVERHEAD_BYTES <= self.limit_bytes:
            return
        fit = max(0, (self.limit_bytes - RESPONSE_OVERHEAD_BYTES) // per_frame)
        raise BadRequest(
            f"a batch of {frames} frames of avatar {avatar.name!r} ({avatar.width}x{avatar.height}) may "
            f"answer up to {frames * per_frame / MiB:.1f} MiB ({per_frame / 1024:.0f} KiB per frame), over "
            f"the gRPC send limit of {self.limit_bytes / MiB:.0f} MiB (LIPSYNC_GRPC_MAX_SEND_BYTES): ask "
            f"for at most {fit} frames per call, or use StreamInference"
        )
