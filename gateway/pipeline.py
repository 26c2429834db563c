"""`FramePipeline`: one frame from (avatar, frame_id) to a composited JPEG.

Stages of `FramePipeline.render` (REFERENCE.md s.2), with what each recorded time covers:

1. **validate**: the avatar exists (`UnknownAvatar`), ``frame_id`` is in range
   (`FrameOutOfRange`, negatives included), a global in-flight slot is free (`Overloaded`).
2. **prepare** (``prepare_ms``): the video frame ``pingpong_index(frame_id, N)``, its
   precomputed inner crop uint8 ``[1, 320, 320, 3]`` (a view, no copy) and the 16-row audio
   window float32 ``[1, 16, 512]`` (rows frame_id-8 .. frame_id+7, zeros outside).
3. **inference** (``inference_ms``): one async Triton call; calls from all streams run
   concurrently so Triton's dynamic batcher batches them.
4. **composite** (``composite_ms``): paste back (s.2 step 8) + JPEG encode, run in a
   `ThreadPoolExecutor` so the event loop never blocks; it is the wall time of that step,
   thread-pool wait included. ``paste_ms`` and ``jpeg_ms`` split it (measured in the thread).

``total_ms`` is the wall time of the whole call. Each stage also goes to the Prometheus
histograms of `gateway.metrics`.

Admission: `AdmissionControl` caps frames in flight in the whole gateway and refuses at once
(`Overloaded`) beyond it; `ConnectionLimiter` caps one connection's frames in flight (the
WebSocket handler and gRPC ``StreamInference`` each make one per connection).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from gateway.errors import BadRequest, FrameOutOfRange, GatewayError, Overloaded
from gateway.jpeg import JpegEncoder
from gateway.metrics import GatewayMetrics
from gateway.store import Avatar, AvatarStore
from gateway.triton import TritonClient
from lipsync.contract import FEATURE_DIM, WINDOW_ROWS
from lipsync.frames import audio_window, paste_back

log = logging.getLogger(__name__)


@dataclass
class RenderedFrame:
    """One rendered frame.

    Attributes:
        avatar: avatar name.
        frame_id: the requested frame id (audio feature row index).
        jpeg: JPEG of the full composited frame (BGR source, 4:2:0).
        bounds: crop rectangle ``(x1, y1, x2, y2)`` px of the video frame used.
        width, height: frame size (px).
        prepare_ms, inference_ms, composite_ms, total_ms: stage times (ms), see module doc.
        video_frame: the video frame index used (ping-pong).
        paste_ms, jpeg_ms: the two parts of ``composite_ms`` measured in the worker (ms).
    """

    avatar: str
    frame_id: int
    jpeg: bytes
    bounds: tuple[float, float, float, float]
    width: int
    height: int
    prepare_ms: float
    inference_ms: float
    composite_ms: float
    total_ms: float
    video_frame: int = 0
    paste_ms: float = 0.0
    jpeg_ms: float = 0.0


class AdmissionControl:
    """Global cap on frames in flight; refuses at once instead of queueing without bound.

    Args:
        limit: most frames in flight in the whole gateway (``max_in_flight_total``).
        metrics: where the ``in_flight`` gauge lives (optional).
    """

    def __init__(self, limit: int, metrics: GatewayMetrics | None = None) -> None:
        self.limit = limit
        self.in_flight = 0
        self._metrics = metrics

    @contextlib.contextmanager
    def slot(self):  # type: ignore[no-untyped-def]
        """Hold one global slot for the block.

        Raises:
            Overloaded: ``limit`` frames are already in flight.
        """
        if self.in_flight >= self.limit:
            raise Overloaded(
                f"the gateway already has {self.in_flight} frames in flight "
                f"(limit {self.limit}); retry later"
            )
        self.in_flight += 1
        if self._metrics is not None:
            self._metrics.in_flight.set(self.in_flight)
        try:
            yield
        finally:
            self.in_flight -= 1
            if self._metrics is not None:
                self._metrics.in_flight.set(self.in_flight)


class ConnectionLimiter:
    """Per-connection cap on frames in flight.

    Use ``async with limiter.slot(wait=False)`` to refuse a frame at once with `Overloaded`
    when the connection already has ``limit`` in flight (WebSocket), or ``wait=True`` to wait
    for a free slot (gRPC streams: back-pressure by not reading the next request).

    Raises:
        ValueError: ``limit < 1``.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"per-connection limit must be >= 1, got {limit}")
        self.limit = limit
        self._sem = asyncio.Semaphore(limit)
        self.in_flight = 0

    async def acquire(self, *, wait: bool = True) -> None:
        """Take a slot; with ``wait=False`` raise `Overloaded` if none is free."""
        if not wait and self._sem.locked():
            raise Overloaded(
                f"this connection already has {self.in_flight} frames in flight "
                f"(limit {self.limit}); wait for answers before sending more"
            )
        await self._sem.acquire()
        self.in_flight += 1

    def release(self) -> None:
        """Give a slot back."""
        self.in_flight -= 1
        self._sem.release()

    @contextlib.asynccontextmanager
    async def slot(self, *, wait: bool = True) -> AsyncIterator[None]:
        """Hold one slot for the block (see class doc for ``wait``)."""
        await self.acquire(wait=wait)
        try:
            yield
        finally:
            self.release()


class FramePipeline:
    """Renders frames: prepare -> Triton -> paste back + JPEG (thread pool).

    Args:
        store: the loaded avatars.
        triton: the Triton client.
        encoder: the JPEG encoder (quality fixed in it).
        executor: thread pool for paste back + JPEG.
        admission: the global in-flight cap.
        metrics: Prometheus series.
    """

    def __init__(
        self,
        store: AvatarStore,
        triton: TritonClient,
        encoder: JpegEncoder,
        executor: ThreadPoolExecutor,
        admission: AdmissionControl,
        metrics: GatewayMetrics,
    ) -> None:
        self.store = store
        self.triton = triton
        self.encoder = encoder
        self.executor = executor
        self.admission = admission
        self.metrics = metrics

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def validate_frame_id(avatar: Avatar, frame_id: int, rows: int | None = None) -> None:
        """Check ``0 <= frame_id < rows`` (default rows: the avatar's feature rows M).

        ``rows`` = 0 means "no upper bound" (live audio supplies its own window).

        Raises:
            FrameOutOfRange: with the valid range in the message.
        """
        limit = avatar.feature_rows if rows is None else rows
        if frame_id < 0 or (limit and frame_id >= limit):
            rng = f"0..{limit - 1}" if limit else ">= 0"
            raise FrameOutOfRange(
                f"frame_id {frame_id} is out of range for avatar {avatar.name!r} "
                f"(valid: {rng}; {avatar.feature_rows} audio feature rows, "
                f"{avatar.frame_count} video frames walked ping-pong)"
            )

    def _composite(
        self, avatar: Avatar, v: int, pred: NDArray[np.uint8]
    ) -> tuple[bytes, float, float]:
        t0 = time.perf_counter()
        frame = paste_back(avatar.frames[v], avatar.rects[v], avatar.crops[v], pred)
        t1 = time.perf_counter()
        jpeg = self.encoder.encode(frame)
        t2 = time.perf_counter()
        return jpeg, (t1 - t0) * 1e3, (t2 - t1) * 1e3

    async def encode(self, image: NDArray[np.uint8]) -> bytes:
        """JPEG-encode a uint8 ``[H, W, 3]`` BGR image in the thread pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self.encoder.encode, image)

    # ------------------------------------------------------------------ render
    async def render(
        self,
        avatar: str,
        frame_id: int,
        *,
        features: NDArray[np.float32] | None = None,
        window: NDArray[np.float32] | None = None,
        protocol: str = "internal",
    ) -> RenderedFrame:
        """Render frame ``frame_id`` of ``avatar`` as a composited JPEG.

        Args:
            avatar: avatar name (or its Triton model name).
            frame_id: audio feature row index, ``0 <= frame_id < M``; the video frame is
                ``pingpong_index(frame_id, N)``.
            features: float32 ``[M', 512]`` features replacing the package's ``aud_ave.npy``
                (live audio); ``frame_id`` must then be ``< M'``.
            window: float32 ``[16, 512]``, the audio window itself (live audio already
                windowed, e.g. ``GenerateBatchWithAudio``); ``frame_id`` then only picks the
                video frame and needs ``>= 0``.
            protocol: label for metrics: ``grpc``, ``ws``, ``http``.

        Returns:
            A `RenderedFrame`.

        Raises:
            UnknownAvatar, FrameOutOfRange, BadRequest, Overloaded, TritonUnavailable
            (all `gateway.errors.GatewayError`).
        """
        t_start = time.perf_counter()
        av: Avatar | None = None
        try:
            with self.admission.slot():
                av = self.store.get(avatar)
                frame_id = int(frame_id)
                if window is not None:
                    if window.shape != (WINDOW_ROWS, FEATURE_DIM):
                        raise BadRequest(f"audio window must be [16, 512], got {list(window.shape)}")
                    self.validate_frame_id(av, frame_id, rows=0)
                elif features is not None:
                    if features.ndim != 2 or features.shape[1] != FEATURE_DIM:
                        raise BadRequest(f"audio features must be [M, 512], got {list(features.shape)}")
                    self.validate_frame_id(av, frame_id, rows=int(features.shape[0]))
                else:
                    self.validate_frame_id(av, frame_id)

                # prepare
                t0 = time.perf_counter()
                v = av.video_index(frame_id)
                crop = av.inners[v : v + 1]  # [1, 320, 320, 3] contiguous view
                if window is not None:
                    audio = np.asarray(window, dtype=np.float32)[None]
                else:
                    src = av.features if features is None else features
                    audio = audio_window(src, frame_id)[None]
                t1 = time.perf_counter()

                # inference
                pred = await self.triton.infer_unet(av.model_name, crop, audio)
                t2 = time.perf_counter()

                # composite: paste back + JPEG in the thread pool
                loop = asyncio.get_running_loop()
                jpeg, paste_ms, jpeg_ms = await loop.run_in_executor(
                    self.executor, self._composite, av, v, pred[0]
                )
                t3 = time.perf_counter()
        except GatewayError as exc:
            self.metrics.record_outcome(protocol, exc.code)
            if av is not None:
                av.stats.record_error()
            raise
        except Exception:
            self.metrics.record_outcome(protocol, "internal")
            log.exception("rendering frame %s of %r failed", frame_id, avatar)
            raise
        # A frame cancelled by a client disconnect is neither ok nor an error: not counted.
        self.metrics.record_outcome(protocol, None)

        prepare_ms = (t1 - t0) * 1e3
        inference_ms = (t2 - t1) * 1e3
        composite_ms = (t3 - t2) * 1e3
        total_ms = (t3 - t_start) * 1e3
        av.stats.record(inference_ms)
        m = self.metrics
        m.observe_stage("prepare", prepare_ms)
        m.observe_stage("inference", inference_ms)
        m.observe_stage("paste", paste_ms)
        m.observe_stage("jpeg", jpeg_ms)
        m.observe_stage("composite", composite_ms)
        m.observe_stage("total", total_ms)
        return RenderedFrame(
            avatar=av.name,
            frame_id=frame_id,
            jpeg=jpeg,
            bounds=av.bounds(v),
            width=av.width,
            height=av.height,
            prepare_ms=prepare_ms,
            inference_ms=inference_ms,
            composite_ms=composite_ms,
            total_ms=total_ms,
            video_frame=v,
            paste_ms=paste_ms,
            jpeg_ms=jpeg_ms,
        )
