"""`FramePipeline`: the one entry point from a `FrameRequest` to a composited JPEG.

The protocol adapters decode their wire format into a `gateway.frame_request.FrameRequest` and
call `FramePipeline.render`, which runs these stages (live sessions call
`FramePipeline.render_window` with the avatar, the video frame and their own audio window)
(docs/REFERENCE.md s.2), with what each recorded time covers:

1. **validate**: a global in-flight slot is free (`Overloaded`), the avatar exists
   (`UnknownAvatar`, looked up once), ``frame_id`` is in range (`FrameOutOfRange`, negatives
   included; `Avatar.check_frame_id`).
2. **prepare** (``prepare_ms``): the video frame ``pingpong_index(frame_id, N)``, its
   precomputed inner crop uint8 ``[1, 320, 320, 3]`` (a view, no copy) and the window float32
   ``[1, 16, 512]``: feature rows frame_id-8 .. frame_id+7 of the package (zeros outside), or
   the request's live audio (`AudioFeatureExtractor.window`, which checks it and runs the audio
   encoder for raw chunks).
3. **inference** (``inference_ms``): one async Triton call; calls from all streams run
   concurrently so Triton's dynamic batcher batches them.
4. **composite** (``composite_ms``): paste back (s.2 step 8) + JPEG encode
   (`gateway.compositor.Compositor`: spliced or full; of the whole frame, or of the crop
   rectangle's pixels alone for ``FrameRequest.output == "face"``), one call run in the
   `gateway.composite_pool.CompositePool` so the event loop never blocks; it is the wall time of that step,
   thread-pool wait included; the ``paste`` and ``jpeg`` histograms split it (measured in the
   thread).

``total_ms`` is the wall time of the whole call. Each stage goes to the Prometheus histograms
of `gateway.metrics`, and the outcome (ok or the error code) is counted there exactly once per
request: by `render`, or by `FramePipeline.record_refused` for a request an adapter refused
before it became a `FrameRequest` (undecodable message, batch too large, a connection's
in-flight limit).

Admission: `AdmissionControl` caps frames in flight in the whole gateway and refuses at once
(`Overloaded`) beyond it; `ConnectionLimiter` caps one connection's frames in flight (the
WebSocket handler and gRPC ``StreamInference`` each make one per connection).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from gateway.audio_features import AudioFeatureExtractor
from gateway.composite_pool import CompositePool
from gateway.compositor import Compositor
from gateway.errors import GatewayError, Overloaded
from gateway.frame_request import FrameOutput, FrameRequest, WireProtocol
from gateway.jpeg import JpegEncoder
from gateway.metrics import GatewayMetrics
from gateway.store import Avatar, AvatarStore
from gateway.triton_client import InferenceClient
from lipsync.contract import FEATURE_DIM, WINDOW_BEFORE, WINDOW_ROWS
from lipsync.frames import audio_window
from lipsync.package import plain_view

log = logging.getLogger(__name__)

_CANCELLED = "cancelled"
"""Not an outcome: the frame's client went away; nothing is counted."""


def package_window(features: NDArray[np.float32], frame_id: int) -> NDArray[np.float32]:
    """The window of ``frame_id`` from the package's feature rows (docs/REFERENCE.md s.2 step 6):
    float32 ``[16, 512]``, a view of rows ``frame_id - 8 .. frame_id + 7`` when all exist (no copy
    per frame), else `lipsync.frames.audio_window` (zeros outside).

    The view is a plain ndarray even when ``features`` is the package's memmap
    (`lipsync.package.plain_view`): the window is sliced again on its way to Triton."""
    lo = frame_id - WINDOW_BEFORE
    if lo >= 0 and lo + WINDOW_ROWS <= len(features):
        return plain_view(features)[lo : lo + WINDOW_ROWS]
    return audio_window(features, frame_id)


@dataclass(frozen=True)
class RenderedFrame:
    """One rendered frame.

    Attributes:
        avatar: avatar name.
        frame_id: the requested output frame.
        jpeg: JPEG of the full composited frame, or of its crop rectangle alone for a request
            with ``output="face"`` (``rect``'s size).
        rect: crop rectangle ``(x1, y1, x2, y2)`` px of the video frame shown.
        width, height: frame size (px).
        video_frame: the video frame shown (ping-pong index of ``frame_id``).
        output: what the JPEG shows, as requested.
        prepare_ms, inference_ms, composite_ms, total_ms: stage times (ms), see module doc.
    """

    avatar: str
    frame_id: int
    jpeg: bytes
    rect: tuple[float, float, float, float]
    width: int
    height: int
    video_frame: int
    output: FrameOutput
    prepare_ms: float
    inference_ms: float
    composite_ms: float
    total_ms: float


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
    def slot(self) -> Iterator[None]:
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
    """Renders frames: validate -> prepare -> Triton -> paste back + JPEG (thread pool).

    Args:
        store: the loaded avatars.
        inference: where the UNet runs (the gateway's `gateway.endpoint_pool.EndpointPool`, or a
            `gateway.batching.CoalescingInference` over it).
        audio: turns a request's live audio into its window.
        compositor: paste back + JPEG (quality fixed in it).
        executor: the threads for paste back + JPEG (`gateway.composite_pool`).
        admission: the global in-flight cap.
        metrics: Prometheus series.
    """

    def __init__(
        self,
        store: AvatarStore,
        inference: InferenceClient,
        audio: AudioFeatureExtractor,
        compositor: Compositor,
        executor: CompositePool,
        admission: AdmissionControl,
        metrics: GatewayMetrics,
    ) -> None:
        self.store = store
        self.inference = inference
        self.audio = audio
        self.compositor = compositor
        self.executor = executor
        self.admission = admission
        self.metrics = metrics

    def validate(self, avatar: str, frame_id: int, *, live_audio: bool = False) -> Avatar:
        """The avatar called ``avatar``, once ``frame_id`` is checked against it.

        Raises:
            UnknownAvatar: no such avatar is loaded.
            FrameOutOfRange: see `Avatar.check_frame_id`.
        """
        found = self.store.get(avatar)
        found.check_frame_id(frame_id, live_audio=live_audio)
        return found

    def record_refused(self, protocol: WireProtocol, error: GatewayError) -> None:
        """Count a request an adapter refused before it became a `FrameRequest` (module doc)."""
        self.metrics.record_outcome(protocol, error.code)

    @property
    def encoder(self) -> JpegEncoder:
        """The encoder whose JPEG of a whole composited frame equals a full-frame answer, byte
        for byte (`gateway.compositor.Compositor.encoder`)."""
        return self.compositor.encoder

    async def encode(self, image: NDArray[np.uint8]) -> bytes:
        """JPEG-encode a uint8 ``[H, W, 3]`` BGR image in the thread pool (as `encoder`)."""
        return await self.executor.run(self.encoder.encode, image)

    async def encode_video_frame(self, avatar: Avatar, v: int) -> bytes:
        """Video frame ``v`` of ``avatar`` unchanged, as `encode` would give it: its background
        JPEG built at load when the compositor splices (no encoding), else encoded now.

        Raises:
            IndexError: no such video frame.
        """
        found = self.compositor.video_frame_jpeg(avatar, v)
        return found if found is not None else await self.encode(avatar.frames[v])

    async def render(self, request: FrameRequest, *, protocol: WireProtocol) -> RenderedFrame:
        """Render one frame as a JPEG (``request.output``) and count its outcome (module doc).

        A frame cancelled because its client went away is neither ok nor an error: not counted.

        Args:
            request: what to render.
            protocol: the metrics label of the adapter calling.

        Returns:
            A `RenderedFrame`.

        Raises:
            Overloaded, UnknownAvatar, FrameOutOfRange, BadRequest (live audio of a wrong
            length), TritonUnavailable: all `gateway.errors.GatewayError`.
        """

        async def prepare(avatar: Avatar) -> tuple[int, NDArray[np.float32]]:
            avatar.check_frame_id(request.frame_id, live_audio=request.audio is not None)
            v = avatar.video_index(request.frame_id)
            if request.audio is None:
                return v, package_window(avatar.features, request.frame_id)
            return v, await self.audio.window(request.audio)

        return await self._render(
            request.avatar, request.frame_id, self.store.get, prepare, protocol, request.output
        )

    async def render_window(
        self, avatar: Avatar, video_index: int, window: NDArray[np.float32], *, protocol: WireProtocol
    ) -> RenderedFrame:
        """Render video frame ``video_index`` of ``avatar`` with a caller's audio window.

        The live sessions' entry point (`gateway.live_render`): the session computed the window
        itself (feature rows ``k-8 .. k+7`` of its own audio) and chose the video frame (its
        ping-pong walk); admission, Triton, composite, timings and the outcome count are those
        of `render`. Cancelling the call (the slot's deadline passed) cancels the Triton call
        and counts nothing.

        Args:
            avatar: a loaded avatar (`AvatarStore.get`).
            video_index: ``0 <= video_index < N``.
            window: float32 ``[16, 512]``.
            protocol: the metrics label (``live``).

        Returns:
            A `RenderedFrame` whose ``frame_id`` is ``video_index``.

        Raises:
            Overloaded, TritonUnavailable: `gateway.errors.GatewayError`.
            ValueError: ``video_index`` or the window's shape is wrong (a caller's bug).
        """
        if not 0 <= video_index < avatar.video_frames:
            raise ValueError(f"video_index {video_index} outside 0..{avatar.video_frames - 1}")
        if window.shape != (WINDOW_ROWS, FEATURE_DIM):
            raise ValueError(f"window must be [{WINDOW_ROWS}, {FEATURE_DIM}], got {list(window.shape)}")

        async def prepare(avatar: Avatar) -> tuple[int, NDArray[np.float32]]:
            return video_index, np.asarray(window, dtype=np.float32)

        return await self._render(
            avatar.name, video_index, lambda name: avatar, prepare, protocol, "composite"
        )

    async def _render(
        self,
        name: str,
        frame_id: int,
        lookup: Callable[[str], Avatar],
        prepare: Callable[[Avatar], Awaitable[tuple[int, NDArray[np.float32]]]],
        protocol: WireProtocol,
        output: FrameOutput,
    ) -> RenderedFrame:
        """Admission, ``lookup(name)``, ``prepare(avatar)`` (video frame, window), Triton,
        composite (``output``), metrics (a failure after the lookup also counts in the
        avatar's stats)."""
        t_start = time.perf_counter()
        avatar: Avatar | None = None
        outcome: str | None = GatewayError.code  # the error code ("internal" for a bug); None once rendered
        try:
            with self.admission.slot():
                avatar = lookup(name)
                # prepare
                t0 = time.perf_counter()
                v, window = await prepare(avatar)
                crop = avatar.inners[v : v + 1]  # [1, 320, 320, 3] contiguous view
                t1 = time.perf_counter()
                # inference
                pred = await self.inference.infer_unet(avatar.model, crop, window[None])
                t2 = time.perf_counter()
                # composite: paste back + JPEG in the thread pool, one hop
                done = await self.executor.run(self.compositor.composite, avatar, v, pred[0], output)
                t3 = time.perf_counter()
            frame = RenderedFrame(
                avatar=avatar.name,
                frame_id=frame_id,
                jpeg=done.jpeg,
                rect=avatar.rect(v),
                width=avatar.width,
                height=avatar.height,
                video_frame=v,
                output=output,
                prepare_ms=(t1 - t0) * 1e3,
                inference_ms=(t2 - t1) * 1e3,
                composite_ms=(t3 - t2) * 1e3,
                total_ms=(t3 - t_start) * 1e3,
            )
            outcome = None
        except GatewayError as exc:
            outcome = exc.code
            raise
        except asyncio.CancelledError:
            outcome = _CANCELLED
            raise
        except Exception:
            log.exception("rendering frame %s of %r failed", frame_id, name)
            raise
        finally:
            if outcome != _CANCELLED:
                self.metrics.record_outcome(protocol, outcome)
                if outcome is not None and avatar is not None:
                    self.metrics.avatar(avatar.name).record_error()
        self.metrics.avatar(avatar.name).record(frame.inference_ms)
        for stage, ms in (
            ("prepare", frame.prepare_ms), ("inference", frame.inference_ms), ("paste", done.paste_ms),
            ("jpeg", done.jpeg_ms), ("composite", frame.composite_ms), ("total", frame.total_ms),
        ):
            self.metrics.observe_stage(stage, ms)
        return frame
