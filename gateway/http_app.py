"""The gateway's aiohttp application: binary WebSocket, JSON endpoints, /metrics, web page.

Routes (one port, `GatewaySettings.http_port`):

==========================================  =================================================
``GET /``                                    the web page (``gateway/static/index.html``)
``GET /static/...``                          its script and style sheet
``GET /ws``                                  WebSocket, binary protocol of `gateway.ws_protocol`
``GET /healthz``                             liveness: 200 while the process serves
``GET /readyz``                              200 when Triton is ready and avatars are loaded,
                                             else 503; JSON with the reason
``GET /api/avatars``                         loaded avatars (size, fps, frame counts, trained)
``GET /api/avatars/{name}``                  one avatar (404 JSON if unknown)
``GET /api/avatars/{name}/audio.wav``        the avatar package's 16 kHz mono WAV
``GET /api/avatars/{name}/frames/{id}.jpg``  one rendered frame as JPEG (debugging, curl)
``GET /api/stats``                           per-avatar request counts and inference times
``GET /metrics``                             Prometheus exposition of the gateway registry
==========================================  =================================================

WebSocket semantics: every binary message is one frame request. Requests of one connection
are rendered concurrently, at most ``max_in_flight_per_connection`` at a time; one more is
answered at once with an ``overloaded`` error reply (never queued). Replies are sent as frames
complete, so they may come back out of order; each carries its ``frame_id``. A malformed
request, a text message, a request over ``ws_max_message_bytes`` or any failed frame gets an
error reply and the connection keeps serving. Only a message over the transport cap
(``4 x ws_max_message_bytes``, which aiohttp refuses to buffer) closes the connection, with
WebSocket close code 1009 (message too big). When the gateway stops, open connections are
closed with code 1001 (going away).

Live audio: a request with ``audio_len > 0`` carries the frame's own audio window, 16 chunks
of 40 ms 16 kHz mono int16 PCM (20480 bytes: 8 past, the frame's chunk, 7 lookahead); the
gateway turns it into features with Triton's ``audio_encoder`` and renders the frame with them
instead of the package's ``aud_ave.npy`` (then ``frame_id`` only picks the video frame).

HTTP errors are JSON ``{"error": code, "message": text}`` with the status of the
`gateway.errors.GatewayError` subclass.
"""
from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import numpy as np
from aiohttp import WSCloseCode, WSMsgType, web
from numpy.typing import NDArray
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge

from gateway.audio_features import CHUNK_BYTES, expected_chunks
from gateway.errors import BadRequest, GatewayError, UnknownAvatar
from gateway.ws_protocol import (
    MAX_NAME_BYTES,
    FrameRequest,
    ProtocolError,
    decode_request,
    encode_error_reply,
    encode_frame_reply,
)

if TYPE_CHECKING:
    from gateway.context import GatewayContext
    from gateway.store import Avatar

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
"""The web page's files (served under ``/static/``, ``index.html`` at ``/``)."""

TRANSPORT_CAP_FACTOR = 4
"""aiohttp's ``max_msg_size`` is this many times ``ws_max_message_bytes``: a message between
the two limits gets an error reply; beyond the cap aiohttp closes with code 1009."""

CONTEXT_KEY: web.AppKey[GatewayContext] = web.AppKey("lipsync_context")
WS_METRICS_KEY: web.AppKey[WsMetrics] = web.AppKey("lipsync_ws_metrics")
WS_OPEN_KEY: web.AppKey[set[web.WebSocketResponse]] = web.AppKey("lipsync_ws_open")

LIVE_AUDIO_BYTES = expected_chunks(1) * CHUNK_BYTES
"""Audio bytes a live-audio WebSocket request carries: 16 chunks x 1280 bytes = 20480."""


class WsMetrics:
    """WebSocket-specific series, registered in the gateway's own registry.

    - ``lipsync_gateway_ws_connections``: open WebSocket connections;
    - ``lipsync_gateway_ws_messages_total{kind}``: messages received, kind = binary | text |
      oversized (error reply) | too_big (connection closed, 1009).

    Frame outcomes, errors by code and stage latencies are counted in `GatewayMetrics` with
    ``protocol="ws"``.
    """

    _by_registry: weakref.WeakKeyDictionary[CollectorRegistry, WsMetrics] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, registry: CollectorRegistry) -> None:
        self.connections = Gauge(
            "lipsync_gateway_ws_connections", "Open WebSocket connections", registry=registry
        )
        self.messages = Counter(
            "lipsync_gateway_ws_messages",
            "WebSocket messages received, by kind",
            ["kind"],
            registry=registry,
        )

    @classmethod
    def for_registry(cls, registry: CollectorRegistry) -> WsMetrics:
        """The one `WsMetrics` of ``registry`` (created on first use)."""
        metrics = cls._by_registry.get(registry)
        if metrics is None:
            metrics = cls(registry)
            cls._by_registry[registry] = metrics
        return metrics


# ------------------------------------------------------------------------------ WebSocket


class _WsConnection:
    """One WebSocket connection: decode, admit (per-connection limit), render, reply."""

    def __init__(self, ws: web.WebSocketResponse, ctx: GatewayContext, wsm: WsMetrics) -> None:
        self.ws = ws
        self.ctx = ctx
        self.wsm = wsm
        self.limiter = ctx.new_connection_limiter()
        self.max_bytes = ctx.settings.ws_max_message_bytes
        self.tasks: set[asyncio.Task[None]] = set()

    async def serve(self) -> None:
        """Read messages until the client closes; cancel unfinished frames at the end."""
        try:
            async for msg in self.ws:
                if msg.type == WSMsgType.BINARY:
                    await self._on_binary(msg.data)
                elif msg.type == WSMsgType.TEXT:
                    self.wsm.messages.labels(kind="text").inc()
                    await self._reject(
                        BadRequest(
                            "text messages are not part of the protocol; send binary "
                            "[name_len u32][name][frame_id u32][audio_len u32][audio]"
                        ),
                        frame_id=0,
                        started=time.perf_counter(),
                    )
                elif msg.type == WSMsgType.ERROR:
                    # aiohttp already closed the connection (1009 for a too-big message).
                    self.wsm.messages.labels(kind="too_big").inc()
                    log.warning("WebSocket connection closed: %s", msg.data)
                    break
        finally:
            for task in list(self.tasks):
                task.cancel()
            if self.tasks:
                await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _on_binary(self, data: bytes) -> None:
        started = time.perf_counter()
        if len(data) > self.max_bytes:
            self.wsm.messages.labels(kind="oversized").inc()
            await self._reject(
                BadRequest(
                    f"message of {len(data)} bytes exceeds the limit of {self.max_bytes} bytes "
                    "(LIPSYNC_WS_MAX_MESSAGE_BYTES)"
                ),
                frame_id=0,
                started=started,
            )
            return
        self.wsm.messages.labels(kind="binary").inc()
        try:
            request = decode_request(
                data, max_name_bytes=MAX_NAME_BYTES, max_audio_bytes=self.max_bytes
            )
            if request.audio:  # fail fast, before the audio encoder runs
                check_live_audio(request.audio)
                self.ctx.store.get(request.avatar)
            await self.limiter.acquire(wait=False)
        except ProtocolError as exc:
            await self._reject(exc, frame_id=exc.frame_id, started=started)
            return
        except GatewayError as exc:  # bad audio length, unknown avatar, Overloaded
            await self._reject(exc, frame_id=request.frame_id, started=started)
            return
        task = asyncio.create_task(self._render(request, started))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _render(self, request: FrameRequest, started: float) -> None:
        try:
            window = None
            if request.audio:
                window = await live_audio_window(self.ctx, request.audio)
            frame = await self.ctx.pipeline.render(
                request.avatar, request.frame_id, window=window, protocol="ws"
            )
        except GatewayError as exc:
            # render() and live_audio_window() counted the failure in the metrics.
            await self._reply_error(exc, request.frame_id, started)
            return
        except Exception as exc:  # a bug: answer, log, keep the connection
            log.exception("WebSocket frame %r/%d failed", request.avatar, request.frame_id)
            await self._reply_error(
                GatewayError(f"{type(exc).__name__}: {exc}"), request.frame_id, started
            )
            return
        finally:
            self.limiter.release()
        elapsed_ms = (time.perf_counter() - started) * 1e3
        await self._send(
            encode_frame_reply(request.frame_id, elapsed_ms, frame.jpeg, frame.bounds)
        )

    async def _reject(self, exc: GatewayError, *, frame_id: int, started: float) -> None:
        """Count a request refused before the pipeline and send its error reply."""
        self.ctx.metrics.record_outcome("ws", exc.code)
        await self._reply_error(exc, frame_id, started)

    async def _reply_error(self, exc: GatewayError, frame_id: int, started: float) -> None:
        elapsed_ms = (time.perf_counter() - started) * 1e3
        await self._send(encode_error_reply(frame_id, elapsed_ms, str(exc)))

    async def _send(self, payload: bytes) -> None:
        if self.ws.closed:
            return
        try:
            await self.ws.send_bytes(payload)
        except (ConnectionError, RuntimeError) as exc:
            log.debug("WebSocket reply dropped, connection gone: %s", exc)


def check_live_audio(audio: bytes) -> None:
    """Validate the audio of a WebSocket request (live audio).

    The audio must be the frame's whole window: ``8 + 1 + 7 = 16`` chunks of 40 ms of 16 kHz
    mono int16 little-endian PCM (1280 bytes each, 20480 bytes in all): 8 chunks before the
    frame's own chunk, the chunk itself, 7 chunks of lookahead (REFERENCE.md s.2 step 6, s.4;
    the same mapping as gRPC ``GenerateBatchWithAudio`` with ``frame_count=1``).

    Raises:
        BadRequest: any other length, with the expected one in the message.
    """
    if len(audio) != LIVE_AUDIO_BYTES:
        raise BadRequest(
            f"audio_len={len(audio)}: live audio must be {expected_chunks(1)} chunks of 40 ms "
            f"16 kHz mono int16 PCM ({CHUNK_BYTES} bytes each) = {LIVE_AUDIO_BYTES} bytes "
            "(8 past + the frame's own + 7 lookahead); send audio_len=0 to use the avatar's "
            "own audio"
        )


async def live_audio_window(ctx: GatewayContext, audio: bytes) -> NDArray[np.float32]:
    """Feature window float32 ``[16, 512]`` of a request's live audio (Triton audio encoder).

    Raises:
        BadRequest: wrong length (see `check_live_audio`).
        TritonUnavailable: the ``audio_encoder`` model is not served.
    """
    chunks = [audio[i : i + CHUNK_BYTES] for i in range(0, len(audio), CHUNK_BYTES)]
    try:
        return await ctx.audio.features_from_chunks(chunks, 1)
    except GatewayError as exc:
        ctx.metrics.record_outcome("ws", exc.code)
        raise


async def websocket_handler(request: web.Request) -> web.WebSocketResponse:
    """``GET /ws``: serve one WebSocket connection (see the module docstring)."""
    ctx = request.app[CONTEXT_KEY]
    wsm = request.app[WS_METRICS_KEY]
    ws = web.WebSocketResponse(
        max_msg_size=ctx.settings.ws_max_message_bytes * TRANSPORT_CAP_FACTOR,
        heartbeat=30.0,
        compress=False,  # replies are JPEG: permessage-deflate would burn CPU for nothing
    )
    await ws.prepare(request)
    open_ws = request.app[WS_OPEN_KEY]
    open_ws.add(ws)
    wsm.connections.inc()
    try:
        await _WsConnection(ws, ctx, wsm).serve()
    finally:
        open_ws.discard(ws)
        wsm.connections.dec()
    return ws


async def _close_websockets(app: web.Application) -> None:
    """``on_shutdown``: close every open WebSocket (1001, going away).

    Without it the runner's cleanup would wait for each connection's handler until its
    shutdown timeout (60 s), so stopping the gateway with a page open would hang.
    """
    for ws in list(app[WS_OPEN_KEY]):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"gateway shutting down")


# ------------------------------------------------------------------------------ HTTP


def _avatar_json(avatar: Avatar) -> dict[str, Any]:
    """JSON description of one avatar for the page and API clients."""
    weights = avatar.package.manifest.weights
    rows = avatar.feature_rows
    return {
        "name": avatar.name,
        "model_name": avatar.model_name,
        "fps": avatar.fps,
        "width": avatar.width,
        "height": avatar.height,
        "frame_count": avatar.frame_count,
        "output_frames": rows,
        "duration_s": rows / avatar.fps if avatar.fps else 0.0,
        "trained": weights.trained,
        "weights": {
            "unet": weights.unet.source,
            "audio_encoder": weights.audio_encoder.source,
            "unet_onnx_sha256": weights.unet.onnx_sha256,
        },
        "audio_url": f"/api/avatars/{quote(avatar.name, safe='')}/audio.wav",
        "init_ms": round(avatar.init_ms, 1),
    }


def _json_error(exc: GatewayError) -> web.Response:
    return web.json_response({"error": exc.code, "message": exc.message}, status=exc.http_status)


@web.middleware
async def _errors_as_json(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Turn a `GatewayError` raised by a handler into its JSON error response."""
    try:
        return await handler(request)
    except GatewayError as exc:
        return _json_error(exc)


async def index(request: web.Request) -> web.FileResponse:
    """``GET /``: the web page."""
    return web.FileResponse(STATIC_DIR / "index.html")


async def healthz(request: web.Request) -> web.Response:
    """``GET /healthz``: liveness (the process answers)."""
    ctx = request.app[CONTEXT_KEY]
    return web.json_response({"status": "alive", "uptime_s": round(ctx.uptime_s(), 1)})


async def readyz(request: web.Request) -> web.Response:
    """``GET /readyz``: 200 when Triton is ready and avatars are loaded, else 503 + reason."""
    ctx = request.app[CONTEXT_KEY]
    status = ctx.triton.status()
    avatars = ctx.store.names()
    reasons: list[str] = []
    if not status.server_ready:
        reasons.append(
            f"Triton at {status.url} is not ready"
            + (f" ({status.last_error})" if status.last_error else "")
        )
    avatar_models = {a.model_name for a in ctx.store.avatars()}
    not_loaded = sorted(m for m, ok in status.models.items() if not ok and m in avatar_models)
    if status.server_ready and not_loaded:
        reasons.append(f"avatar models not loaded in Triton: {', '.join(not_loaded)}")
    if not avatars:
        reasons.append(f"no avatar loaded from {ctx.store.packages_root}")
    ready = ctx.ready() and not reasons
    if not ready and not reasons:
        reasons.append("gateway not ready")
    body = {
        "ready": ready,
        "reason": "; ".join(reasons) if reasons else None,
        "triton": {"url": status.url, "server_ready": status.server_ready, "models": status.models},
        "avatars": avatars,
    }
    return web.json_response(body, status=200 if ready else 503)


async def list_avatars(request: web.Request) -> web.Response:
    """``GET /api/avatars``: every loaded avatar."""
    store = request.app[CONTEXT_KEY].store
    return web.json_response({"avatars": [_avatar_json(a) for a in store.avatars()]})


async def get_avatar(request: web.Request) -> web.Response:
    """``GET /api/avatars/{name}``: one avatar; 404 JSON ``unknown_avatar`` if not loaded."""
    store = request.app[CONTEXT_KEY].store
    return web.json_response(_avatar_json(store.get(request.match_info["name"])))


async def avatar_audio(request: web.Request) -> web.FileResponse:
    """``GET /api/avatars/{name}/audio.wav``: the package's WAV (16 kHz mono)."""
    store = request.app[CONTEXT_KEY].store
    avatar = store.get(request.match_info["name"])
    path = avatar.audio_path
    if not path.is_file():
        raise UnknownAvatar(f"avatar {avatar.name!r} has no audio file at {path}")
    return web.FileResponse(path, headers={"Content-Type": "audio/wav"})


async def avatar_frame(request: web.Request) -> web.Response:
    """``GET /api/avatars/{name}/frames/{frame_id}.jpg``: one rendered frame (JPEG).

    Headers ``X-Processing-Ms`` (server time, ms) and ``X-Bounds`` (``x1,y1,x2,y2`` px).
    """
    ctx = request.app[CONTEXT_KEY]
    started = time.perf_counter()
    raw = request.match_info["frame_id"]
    try:
        frame_id = int(raw)
    except ValueError:
        raise BadRequest(f"frame_id {raw!r} is not an integer") from None
    frame = await ctx.pipeline.render(request.match_info["name"], frame_id, protocol="http")
    return web.Response(
        body=frame.jpeg,
        content_type="image/jpeg",
        headers={
            "X-Processing-Ms": f"{(time.perf_counter() - started) * 1e3:.1f}",
            "X-Bounds": ",".join(f"{b:g}" for b in frame.bounds),
        },
    )


async def stats(request: web.Request) -> web.Response:
    """``GET /api/stats``: uptime, in-flight frames, per-avatar counts and inference ms."""
    ctx = request.app[CONTEXT_KEY]
    per_avatar = {}
    for avatar in ctx.store.avatars():
        s = avatar.stats
        per_avatar[avatar.name] = {
            "total_requests": s.total_requests,
            "errors": s.errors,
            "avg_inference_ms": round(s.avg_inference_ms, 2),
            "min_inference_ms": round(s.min_inference_ms, 2),
            "max_inference_ms": round(s.inference_ms_max, 2),
            "frame_count": avatar.frame_count,
            "output_frames": avatar.feature_rows,
        }
    return web.json_response(
        {
            "uptime_s": round(ctx.uptime_s(), 1),
            "ready": ctx.ready(),
            "in_flight": ctx.pipeline.admission.in_flight,
            "max_in_flight_total": ctx.pipeline.admission.limit,
            "ws_connections": len(request.app[WS_OPEN_KEY]),
            "avatars": per_avatar,
        }
    )


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: Prometheus text exposition of the gateway's registry."""
    body = request.app[CONTEXT_KEY].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def create_app(ctx: GatewayContext) -> web.Application:
    """Build the aiohttp application for one gateway.

    Args:
        ctx: the running gateway's context (settings, store, Triton client, pipeline,
            metrics); the app only reads it.

    Returns:
        The application; `gateway.server.GatewayServer` runs it with an ``AppRunner``.
    """
    app = web.Application(middlewares=[_errors_as_json])
    app[CONTEXT_KEY] = ctx
    app[WS_METRICS_KEY] = WsMetrics.for_registry(ctx.metrics.registry)
    app[WS_OPEN_KEY] = set()
    app.on_shutdown.append(_close_websockets)
    app.router.add_get("/", index)
    app.router.add_get("/ws", websocket_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/api/avatars", list_avatars)
    app.router.add_get("/api/avatars/{name}", get_avatar)
    app.router.add_get("/api/avatars/{name}/audio.wav", avatar_audio)
    app.router.add_get("/api/avatars/{name}/frames/{frame_id}.jpg", avatar_frame)
    app.router.add_get("/api/stats", stats)
    app.router.add_get("/metrics", metrics)
    app.router.add_static("/static/", STATIC_DIR, show_index=False)
    return app
