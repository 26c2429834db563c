"""gRPC service ``optimized_lipsyncsrv.OptimizedLipSyncService`` on ``grpc.aio``.

Wire-compatible with the original system's clients (proto/lipsync.proto). Conventions:

- Per-request failures come back in-band: ``success = false`` and ``error`` =
  ``"<code>: <message>"`` with the codes of `gateway.errors` (unknown_avatar,
  frame_out_of_range, bad_request, overloaded, triton_unavailable, package_rejected).
  Only ``GetStats`` (whose response has no error field) answers an unknown avatar with the
  gRPC status NOT_FOUND.
- ``model_name`` carries the avatar name; ``frame_id`` everywhere is an output frame
  ``0 .. M-1`` (feature rows); the video frame is walked ping-pong (`Avatar.video_index`).
  ``frame_count`` in answers is M (the frame_id range). Wire names stay in this module; each
  frame request is decoded into a `gateway.frame_request.FrameRequest` for the pipeline.
- ``StreamInference`` answers in request order; up to ``max_in_flight_per_connection`` frames
  of one stream are rendered concurrently (pipelined); beyond that the stream's next request
  is not read until the oldest answer is sent (back-pressure, bounded memory).
- ``GenerateBatchInference`` renders its frames concurrently under the same per-call limit.
- Per client (`gateway.limits`): all frames of one caller address (``context.peer()`` without
  the port) count against ``max_in_flight_per_peer``: ``GenerateInference`` is refused
  ``overloaded`` at once past it, streams and batches wait for a slot. ``GetVideoFrame``'s JPEG
  and ``GenerateBatchWithAudio``'s audio features take one of the ``max_aux_in_flight`` slots
  of work beside rendering (``overloaded`` at once when none is free) and run on its own pool.
- ``GenerateBatchWithAudio``: see `gateway.audio_features` for the chunk -> mel window ->
  feature row mapping (computed once per request) and the chunk contract: ``min(s, 8) +
  frame_count + 7`` chunks for ``s = start_frame_id`` (8 of past, or at the start of a clip the
  ``s`` that exist, the missing past being zeros), extra chunks at the end ignored; frame ``k``
  shows video frame ``s + k`` (ping-pong) with the window of chunks ``s+k-8 .. s+k+7``.

- A batch whose answers may not fit ``grpc_max_send_bytes`` is refused before rendering
  (`gateway.response_budget`); int32 fields of answers are clamped (`gateway.grpc_wire.int32`).
- An unexpected exception while rendering a frame is answered in-band for that frame
  (``internal``); a stream goes on.
- ``LoadPackage`` is an admin call (`gateway.auth`), served by `gateway.admin_service`.

Also served: ``optimized_lipsyncsrv.OptimizedLipSyncAdmin`` (`gateway.admin_service`),
``lipsync.live.v1.LiveLipSync`` (live sessions, `gateway.live_grpc`), ``grpc.health.v1.Health``
(overall, ``optimized_lipsyncsrv.OptimizedLipSyncService`` and ``lipsync.live.v1.LiveLipSync``:
SERVING when `GatewayContext.ready`, else NOT_SERVING, pushed on every change) and server
reflection. Every call passes `gateway.auth.AuthInterceptor` first; a request message that
does not decode gets ``INVALID_ARGUMENT`` naming the method, from any of them
(`gateway.grpc_decode_guard`).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeAlias

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from gateway.admin_service import SERVICE_NAME as ADMIN_SERVICE_NAME
from gateway.admin_service import AdminService, load_package_response
from gateway.audio_features import LiveAudio
from gateway.auth import AuthInterceptor, TokenPolicy
from gateway.context import GatewayContext
from gateway.errors import BadRequest, FrameOutOfRange, GatewayError, unexpected
from gateway.frame_request import FrameRequest, WireProtocol
from gateway.grpc_decode_guard import DecodeGuard
from gateway.grpc_wire import INT32_MAX, VIDEO_TYPES, int32
from gateway.limits import grpc_server_options, peer_address
from gateway.live_grpc import SERVICE_NAME as LIVE_SERVICE_NAME
from gateway.live_grpc import LiveLipSyncService
from gateway.pipeline import ConnectionLimiter, FramePipeline, RenderedFrame
from gateway.response_budget import ResponseBudget
from lipsync.frames import mask_inner
from proto import admin_pb2_grpc as admin_pbg
from proto import lipsync_pb2 as pb
from proto import lipsync_pb2_grpc as pbg
from proto import live_pb2_grpc as live_pbg

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["OptimizedLipSyncService"].full_name
OPTIMIZATIONS = (
    "triton_dynamic_batching",
    "uint8_io_pre_post_in_graph",
    "concurrent_async_triton_calls",
    "precomputed_crops_in_ram",
    "memory_mapped_audio_features",
    "composite_jpeg_thread_pool",
)
PROTOCOL: WireProtocol = "grpc"
Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
"""A servicer method's call context (the methods only abort through it)."""


def frame_response(frame: RenderedFrame) -> pb.OptimizedInferenceResponse:
    """`RenderedFrame` -> a successful ``OptimizedInferenceResponse``."""
    return pb.OptimizedInferenceResponse(
        success=True,
        prediction_data=frame.jpeg,
        bounds=list(frame.rect),
        processing_time_ms=int32(frame.total_ms),
        model_name=frame.avatar,
        frame_id=frame.frame_id,
        prediction_shape=f"{frame.height}x{frame.width}x3",
        prepare_time_ms=frame.prepare_ms,
        inference_time_ms=frame.inference_ms,
        composite_time_ms=frame.composite_ms,
        optimizations=list(OPTIMIZATIONS),
    )


def error_response(avatar: str, frame_id: int, exc: GatewayError, t0: float) -> pb.OptimizedInferenceResponse:
    """A failed ``OptimizedInferenceResponse`` carrying ``"<code>: <message>"``.

    ``t0`` is the request's start (``time.perf_counter()``, s); the time since goes to
    ``processing_time_ms``.
    """
    return pb.OptimizedInferenceResponse(
        success=False,
        error=str(exc),
        model_name=avatar,
        frame_id=frame_id,
        processing_time_ms=int32((time.perf_counter() - t0) * 1e3),
    )


class LipSyncService(pbg.OptimizedLipSyncServiceServicer):
    """The ``OptimizedLipSyncService`` implementation over a `GatewayContext`."""

    def __init__(self, ctx: GatewayContext) -> None:
        self.ctx = ctx
        self.pipeline: FramePipeline = ctx.pipeline
        self.budget = ResponseBudget(self.pipeline.encode, ctx.settings.grpc_max_send_bytes)

    # ------------------------------------------------------------------ frames
    async def _render(self, request: FrameRequest) -> pb.OptimizedInferenceResponse:
        t0 = time.perf_counter()
        try:
            frame = await self.pipeline.render(request, protocol=PROTOCOL)
        except GatewayError as exc:
            return error_response(request.avatar, request.frame_id, exc, t0)
        except Exception as exc:  # noqa: BLE001 - a bug (the pipeline logged it): answer, serve on
            return error_response(request.avatar, request.frame_id, unexpected(exc), t0)
        return frame_response(frame)

    async def _render_limited(
        self, limiter: ConnectionLimiter, request: FrameRequest
    ) -> pb.OptimizedInferenceResponse:
        async with limiter.slot(wait=True):
            return await self._render(request)

    async def GenerateInference(
        self, request: pb.OptimizedInferenceRequest, context: Context
    ) -> pb.OptimizedInferenceResponse:
        """One frame (in-band errors); refused ``overloaded`` at once when the caller's address
        has ``max_in_flight_per_peer`` frames in flight."""
        t0 = time.perf_counter()
        peer = peer_address(context.peer())
        try:
            await self.ctx.peers.acquire(peer, wait=False)
        except GatewayError as exc:
            self.pipeline.record_refused(PROTOCOL, exc)
            return error_response(request.model_name, request.frame_id, exc, t0)
        try:
            return await self._render(FrameRequest(request.model_name, request.frame_id))
        finally:
            self.ctx.peers.release(peer)

    def _batch_response(
        self, responses: list[pb.OptimizedInferenceResponse], t0: float
    ) -> pb.BatchInferenceResponse:
        total_ms = (time.perf_counter() - t0) * 1e3
        batch = pb.BatchInferenceResponse(
            responses=responses,
            total_processing_time_ms=int32(total_ms),
            avg_frame_time_ms=total_ms / len(responses) if responses else 0.0,
        )
        limit = self.ctx.settings.grpc_max_send_bytes
        if batch.ByteSize() <= limit:
            return batch
        # past the budget's bound after all: in-band errors rather than a failed send
        exc = BadRequest(
            f"the {len(responses)} rendered frames take {batch.ByteSize()} bytes, over the gRPC send "
            f"limit of {limit} bytes (LIPSYNC_GRPC_MAX_SEND_BYTES): ask for fewer frames per call"
        )
        errors = [error_response(r.model_name, r.frame_id, exc, t0) for r in responses]
        return self._batch_response(errors, t0)

    async def _check_batch(self, avatar: str, n: int) -> None:
        """The batch size limit, then whether ``n`` answers of ``avatar`` fit one message
        (an unknown avatar is left to each frame's own error)."""
        limit = self.ctx.settings.max_batch_frames
        if n < 1 or n > limit:
            raise BadRequest(f"a batch must ask for 1..{limit} frames, got {n}")
        if avatar in self.ctx.store:
            await self.budget.check(self.ctx.store.get(avatar), n)

    async def _render_batch(
        self, avatar: str, frame_ids: list[int], audio: Sequence[LiveAudio] | None = None, *, peer: str
    ) -> list[pb.OptimizedInferenceResponse]:
        """Frames rendered concurrently under one per-call limit and the caller's per-peer limit
        (``peer``, waited for); answers in request order."""
        limiter = self.ctx.new_connection_limiter(peer)
        return list(
            await asyncio.gather(
                *(
                    self._render_limited(limiter, FrameRequest(avatar, fid, audio[k] if audio else None))
                    for k, fid in enumerate(frame_ids)
                )
            )
        )

    async def GenerateBatchInference(
        self, request: pb.BatchInferenceRequest, context: Context
    ) -> pb.BatchInferenceResponse:
        """Several frames rendered concurrently (per-call limit); answers in request order."""
        t0 = time.perf_counter()
        ids = list(request.frame_ids)
        try:
            await self._check_batch(request.model_name, len(ids))
        except GatewayError as exc:
            self.pipeline.record_refused(PROTOCOL, exc)
            return self._batch_response(
                [error_response(request.model_name, ids[0] if ids else 0, exc, t0)], t0
            )
        peer = peer_address(context.peer())
        return self._batch_response(await self._render_batch(request.model_name, ids, peer=peer), t0)

    async def GenerateBatchWithAudio(
        self, request: pb.BatchInferenceWithAudioRequest, context: Context
    ) -> pb.BatchInferenceResponse:
        """Frames driven by the request's audio chunks (see module doc)."""
        t0 = time.perf_counter()
        avatar, start, frames = request.model_name, request.start_frame_id, request.frame_count
        try:
            await self._check_batch(avatar, frames)
            # before the audio encoder runs: the avatar, and a start it can show
            self.pipeline.validate(avatar, start, live_audio=True)
            if start + frames - 1 > INT32_MAX:
                raise FrameOutOfRange(
                    f"start_frame_id {start} + frame_count {frames} runs past the largest "
                    f"frame_id {INT32_MAX} (int32)"
                )
            with self.ctx.aux.slot("GenerateBatchWithAudio's audio features"):
                windows = await self.pipeline.audio.batch_windows(request.audio_chunks, frames, start)
        except GatewayError as exc:
            # one error answer per asked frame, as far as its frame_id fits the int32 field
            n = min(max(frames, 1), self.ctx.settings.max_batch_frames, INT32_MAX - start + 1)
            self.pipeline.record_refused(PROTOCOL, exc)
            return self._batch_response([error_response(avatar, start + k, exc, t0) for k in range(n)], t0)
        ids = [start + k for k in range(frames)]
        peer = peer_address(context.peer())
        return self._batch_response(await self._render_batch(avatar, ids, windows, peer=peer), t0)

    async def StreamInference(
        self, request_iterator: AsyncIterator[pb.OptimizedInferenceRequest], context: Context
    ) -> AsyncIterator[pb.OptimizedInferenceResponse]:
        """Bidirectional stream: answers in request order, frames pipelined (module doc)."""
        limiter = self.ctx.new_connection_limiter(peer_address(context.peer()))
        pending: asyncio.Queue[asyncio.Task[pb.OptimizedInferenceResponse] | None] = asyncio.Queue()

        async def reader() -> None:
            try:
                async for req in request_iterator:
                    await limiter.acquire(wait=True)  # released when the answer is sent
                    task = asyncio.create_task(self._render(FrameRequest(req.model_name, req.frame_id)))
                    pending.put_nowait(task)
            finally:
                pending.put_nowait(None)

        reader_task = asyncio.create_task(reader())
        try:
            while True:
                task = await pending.get()
                if task is None:
                    break
                try:
                    response = await task
                finally:
                    limiter.release()
                yield response
            await reader_task  # surfaces a read error, if any
        finally:
            reader_task.cancel()
            while not pending.empty():
                task = pending.get_nowait()
                if task is not None:
                    task.cancel()

    # ------------------------------------------------------------------ packages & info
    async def LoadPackage(self, request: pb.LoadPackageRequest, context: Context) -> pb.LoadPackageResponse:
        """Load or reload a package from inside the packages root (an admin call; in-band
        errors; replacing an avatar from another folder is refused: `gateway.admin_service`)."""
        return await load_package_response(
            self.ctx, request.package_dir, request.package_name, replace=False
        )

    async def GetStats(self, request: pb.StatsRequest, context: Context) -> pb.StatsResponse:
        """Per-avatar rendered-frame count and inference ms (all avatars when the name is empty),
        counted by every worker of the gateway (`gateway.metrics.GatewayMetrics.avatar_totals`)."""
        if request.model_name:
            try:
                avatars = [self.ctx.store.get(request.model_name)]
            except GatewayError as exc:
                await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        else:
            avatars = self.ctx.store.avatars()
        snapshot = self.ctx.metrics.snapshot()  # the whole gateway: every worker's counts
        stats = [self.ctx.metrics.avatar_totals(a.name, snapshot) for a in avatars]
        total = sum(t.frames for t in stats)
        ms_sum = sum(t.inference_ms_sum for t in stats)
        mins = [t.inference_ms_min for t in stats if t.frames]
        maxs = [t.inference_ms_max for t in stats if t.frames]
        return pb.StatsResponse(
            model_name=request.model_name or ",".join(a.name for a in avatars),
            total_requests=int32(total),
            avg_inference_time_ms=ms_sum / total if total else 0.0,
            min_inference_time_ms=min(mins) if mins else 0.0,
            max_inference_time_ms=max(maxs) if maxs else 0.0,
            frame_count=int32(sum(a.feature_rows for a in avatars)),
            device=self.ctx.settings.device,
            optimizations_active=list(OPTIMIZATIONS),
        )

    async def ListModels(self, request: pb.ListModelsRequest, context: Context) -> pb.ListModelsResponse:
        """Names of the loaded avatars."""
        names = self.ctx.store.names()
        return pb.ListModelsResponse(loaded_models=names, count=len(names))

    async def HealthCheck(self, request: pb.HealthRequest, context: Context) -> pb.HealthResponse:
        """Healthy when Triton is ready with every avatar model loaded."""
        ready = self.ctx.ready()
        if ready:
            status = "SERVING"
        elif not self.ctx.store.names():
            status = "NOT_SERVING: no avatar loaded"
        else:
            status = f"NOT_SERVING: {self.ctx.lifecycle.snapshot().reason() or 'Triton not ready'}"
        return pb.HealthResponse(
            healthy=ready,
            status=status,
            loaded_models=int32(len(self.ctx.store)),
            uptime_seconds=int(self.ctx.uptime_s()),
        )

    async def GetVideoFrame(
        self, request: pb.GetVideoFrameRequest, context: Context
    ) -> pb.GetVideoFrameResponse:
        """The source video frame of ``frame_id`` (ping-pong) as JPEG, no inference."""
        try:
            avatar = self.pipeline.validate(request.model_name, request.frame_id)
            v = avatar.video_index(request.frame_id)
            kind = request.video_type or "full_body"
            if kind == "full_body":
                image = avatar.frames[v]
            elif kind == "face_regions":
                image = avatar.crops[v]
            elif kind == "masked_regions":
                image = mask_inner(avatar.inners[v])
            else:
                raise BadRequest(f"unknown video_type {kind!r}; choose one of {', '.join(VIDEO_TYPES)}")
            with self.ctx.aux.slot("GetVideoFrame"):
                data = await self.ctx.aux.run(self.pipeline.encoder.encode, image)
        except GatewayError as exc:
            return pb.GetVideoFrameResponse(
                success=False, error=str(exc), frame_id=request.frame_id, video_type=request.video_type
            )
        return pb.GetVideoFrameResponse(
            success=True, frame_data=data, frame_id=request.frame_id, video_type=kind
        )

    async def GetModelMetadata(
        self, request: pb.GetModelMetadataRequest, context: Context
    ) -> pb.GetModelMetadataResponse:
        """Frame-id range, video types, audio path (relative to the packages root, never the
        server's absolute path) and every video frame's rectangle (``bounds`` = x1, y1, x2, y2
        per video frame, in video-frame order)."""
        try:
            avatar = self.ctx.store.get(request.model_name)
        except GatewayError as exc:
            return pb.GetModelMetadataResponse(success=False, model_name=request.model_name, error=str(exc))
        return pb.GetModelMetadataResponse(
            success=True,
            model_name=avatar.name,
            frame_count=int32(avatar.feature_rows),
            available_videos=list(VIDEO_TYPES),
            audio_path=self.ctx.store.display(avatar.audio_path),
            bounds=avatar.rects.astype(np.float32).reshape(-1).tolist(),
        )


class HealthReporter:
    """Keeps ``grpc.health.v1`` in step with `GatewayContext.ready`.

    `GatewayContext.watch_ready` pushes every change; one task applies them in order (the aio
    servicer's ``set`` is a coroutine), so there is no polling.
    """

    def __init__(self, ctx: GatewayContext, servicer: health_aio.HealthServicer) -> None:
        self.ctx = ctx
        self.servicer = servicer
        self._wanted = False
        self._published: bool | None = None
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._unwatch: Callable[[], None] | None = None

    def _on_ready(self, ready: bool) -> None:
        self._wanted = ready
        self._changed.set()

    async def _publish(self) -> None:
        ready = self._wanted
        if ready == self._published:
            return
        status = (
            health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", SERVICE_NAME, LIVE_SERVICE_NAME):
            await self.servicer.set(service, status)
        self._published = ready

    async def _loop(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            try:
                await self._publish()
            except Exception:  # keep reporting
                log.exception("updating grpc health failed")

    async def start(self) -> None:
        """Publish the current readiness, then every change."""
        self._unwatch = self.ctx.watch_ready(self._on_ready)
        await self._publish()
        self._task = asyncio.create_task(self._loop(), name="grpc-health")

    async def stop(self) -> None:
        """Stop following readiness."""
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None


def build_grpc_server(
    ctx: GatewayContext, *, reuse_port: bool = False
) -> tuple[grpc.aio.Server, HealthReporter]:
    """A ``grpc.aio`` server with the lipsync and admin services, health and reflection, every
    call checked by `gateway.auth.AuthInterceptor` (not started).

    ``reuse_port``: bind with ``SO_REUSEPORT``, so several worker processes share the port
    (`gateway.workers`); off for one process, so a port taken by another program is an error.

    Message size limits come from ``grpc_max_receive_bytes`` / ``grpc_max_send_bytes``; calls
    open in the whole server are capped by ``grpc_max_concurrent_rpcs`` (one more is answered
    RESOURCE_EXHAUSTED); connection limits (streams per connection, keepalive, idle, age) are
    `gateway.limits.grpc_server_options`. A request message that does not decode is answered
    ``INVALID_ARGUMENT`` by every method of every service added to it
    (`gateway.grpc_decode_guard.DecodeGuard`). With several workers each limit holds per
    worker process.
    The caller adds the port and starts it (see `gateway.server`).
    """
    s = ctx.settings
    server = grpc.aio.server(
        # every method: unauthenticated -> refused first, then undecodable -> INVALID_ARGUMENT
        interceptors=[AuthInterceptor(TokenPolicy.from_settings(s)), DecodeGuard(ctx.malformed)],
        options=[
            ("grpc.max_receive_message_length", s.grpc_max_receive_bytes),
            ("grpc.max_send_message_length", s.grpc_max_send_bytes),
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            *grpc_server_options(s),
        ],
        maximum_concurrent_rpcs=s.grpc_max_concurrent_rpcs,
    )
    pbg.add_OptimizedLipSyncServiceServicer_to_server(LipSyncService(ctx), server)
    admin_pbg.add_OptimizedLipSyncAdminServicer_to_server(AdminService(ctx), server)
    live_pbg.add_LiveLipSyncServicer_to_server(LiveLipSyncService(ctx.live), server)
    health_servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            ADMIN_SERVICE_NAME,
            LIVE_SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    return server, HealthReporter(ctx, health_servicer)
