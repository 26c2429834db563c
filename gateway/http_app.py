"""The gateway's aiohttp application: binary WebSocket, JSON endpoints, /metrics, web page.

Routes (one port, `GatewaySettings.http_port`):

==========================================  =================================================
``GET /``                                    the web page (``gateway/static/index.html``); a
                                             WebSocket upgrade there is the original clients'
                                             endpoint (face patches, see below)
``GET /static/{name}``                       its scripts and style sheet (the files of the folder)
``GET /ws``                                  WebSocket, binary protocol of `gateway.ws_protocol`
                                             (full composited frames); ``/ws?output=crop``:
                                             crop output (face patch + video frame index, opt-in)
``GET /live``                                WebSocket, a live session (`gateway.live_ws_protocol`)
``GET /healthz``                             liveness: 200 while the process serves
``GET /readyz``                              200 when Triton is ready and avatars are loaded,
                                             else 503; JSON with the reason and each Triton
                                             endpoint's state
``GET /api/avatars``                         loaded avatars (size, fps, frame counts, trained)
``GET /api/avatars/{name}``                  one avatar (404 JSON if unknown)
``GET /api/avatars/{name}/audio.wav``        the avatar package's 16 kHz mono WAV
``GET /api/avatars/{name}/frames/{id}.jpg``  one rendered frame as JPEG (debugging, curl)
``GET /api/avatars/{name}/backgrounds/{v}.jpg`` video frame ``v`` as JPEG, what crop-output
                                             clients draw the face on (cacheable: ETag)
``GET /api/stats``                           per-avatar request counts and inference times,
                                             per-Triton-endpoint calls, errors, latency (all
                                             workers), the answering worker's pid
``GET /metrics``                             Prometheus exposition of the gateway registry
==========================================  =================================================

WebSocket semantics (``/`` and ``/ws``, `WsEndpoint`): every binary message is one frame request.
Requests of one connection are rendered concurrently, at most ``max_in_flight_per_connection``
at a time; one more is answered at once with an ``overloaded`` error reply (never queued).
Replies are sent as frames complete, so they may come back out of order; each carries its
``frame_id``. A malformed request, a text message, a request over ``ws_max_message_bytes`` or
any failed frame gets an error reply and the connection keeps serving. Only a message over the
transport cap (``4 x ws_max_message_bytes``, which aiohttp refuses to buffer) closes the
connection, with WebSocket close code 1009 (message too big). When the gateway stops, open
connections are closed with code 1001 (going away). The two endpoints differ in the image and
in audio (`gateway.ws_protocol` module doc): ``/`` answers with the face patch for client-side
compositing and ignores audio that is not a live-audio window, ``/ws`` answers with the full
composited frame and refuses such audio.

Per-client limits (`gateway.ws_limits`, `gateway.limits`): an upgrade from a browser page of
another origin is refused with HTTP 403 (``ws_allowed_origins``), one past
``max_ws_connections`` with 503; a frame's slot is held until its reply is written, and a
client that does not take its replies (``ws_send_buffer_bytes`` queued, or none taken for
``ws_send_timeout_s``) is closed with 1013 (try again later) and a reason; every frame of one
client address counts against ``max_in_flight_per_peer`` (``overloaded`` past it), on the
WebSocket and the frame route alike.

Live audio: a request with ``audio_len > 0`` (on ``/``: of exactly such a length) carries the
16 chunks behind the frame's own window, 40 ms of 16 kHz mono int16 PCM each (20480 bytes: 8
past, the frame's chunk, 7 lookahead), or for a ``frame_id`` below 8 the ``frame_id + 8``
chunks since the start of the clip (the missing past is zeros;
`gateway.audio_features.check_window_chunks`); the gateway turns them into features with
Triton's ``audio_encoder`` and renders the frame with them instead of the package's
``aud_ave.npy`` (then ``frame_id`` only picks the video frame).

Each adapter here decodes its wire format into a `gateway.frame_request.FrameRequest` and hands
it to `gateway.pipeline.FramePipeline.render`, which validates, renders and counts the outcome.

HTTP errors are JSON ``{"error": code, "message": text}`` with the status of the
`gateway.errors.GatewayError` subclass.

Malformed input (a WebSocket message that does not follow the protocol, a text message, one
over the size limit, a WebSocket protocol error or refused handshake, an HTTP ``bad_request``,
a request aiohttp's parser refused: `ServerLog`) is the client's error: it gets its answer and
is reported to `gateway.malformed` (counted, one log line per peer per interval, no traceback).

Access (`gateway.auth`): with ``LIPSYNC_AUTH_TOKEN`` set, every route needs
``Authorization: Bearer <token>`` (a WebSocket may send ``?token=`` instead), else 401, except
``/healthz``, ``/readyz`` (reduced to ``ready`` and a reason code for a caller without the token),
``/metrics`` and the page's own files. `create_health_app` serves those three alone, for the
optional plain-HTTP health port. No answer names a server path.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_log import AccessLogger
from aiohttp.web_request import BaseRequest
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.audio_features import WindowChunks, is_window_length
from gateway.auth import POLICY_KEY, TokenPolicy, auth_middleware, caller_authenticated, without_token
from gateway.endpoint_pool import EndpointStatus
from gateway.errors import BadRequest, FrameOutOfRange, GatewayError, Overloaded, UnknownAvatar, unexpected
from gateway.frame_request import FrameOutput, FrameRequest
from gateway.limits import peer_address
from gateway.live_ws import PATH as LIVE_PATH
from gateway.live_ws import serve_live_websocket
from gateway.model_lifecycle import ModelPhase
from gateway.ws_limits import WsGate
from gateway.ws_protocol import (
    MAX_NAME_BYTES,
    ProtocolError,
    WsRequest,
    decode_request,
    encode_crop_reply,
    encode_error_reply,
    encode_frame_reply,
)

if TYPE_CHECKING:
    from gateway.context import GatewayContext
    from gateway.malformed import MalformedInput
    from gateway.store import Avatar

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
"""The web page's files (served under ``/static/``, ``index.html`` at ``/``)."""
STATIC_FILES: frozenset[str] = frozenset(p.name for p in STATIC_DIR.iterdir() if p.is_file())
"""The names ``/static/{name}`` serves: the folder's files when the module loads, nothing else
(a name is looked up, never joined to a path: aiohttp's static route answered a 255-byte name
with a server error, ENAMETOOLONG)."""

TRANSPORT_CAP_FACTOR = 4
"""aiohttp's ``max_msg_size`` is this many times ``ws_max_message_bytes``: a message between
the two limits gets an error reply; beyond the cap aiohttp closes with code 1009."""

CONTEXT_KEY: web.AppKey[GatewayContext] = web.AppKey("lipsync_context")
MALFORMED_KEY: web.RequestKey[bool] = web.RequestKey("lipsync_malformed")
"""Set on a request reported as malformed input: `AccessLog` leaves it out."""
WS_GATE_KEY: web.AppKey[WsGate] = web.AppKey("lipsync_ws_gate")
WS_OPEN_KEY: web.AppKey[set[web.WebSocketResponse]] = web.AppKey("lipsync_ws_open")


# ------------------------------------------------------------------------------ WebSocket


@dataclass(frozen=True)
class WsEndpoint:
    """One path speaking the binary protocol (`gateway.ws_protocol` module doc: the two).

    Attributes:
        path: the route.
        output: what the replies' JPEG shows (`gateway.frame_request.FrameOutput`).
        ignore_other_audio: audio that is not a live-audio window is ignored (the original
            clients send a 40 ms chunk at the browser's rate with each frame) instead of
            refused as ``bad_request``.
        with_video_frame: success replies end with the video frame shown (crop output,
            `gateway.ws_protocol.encode_crop_reply`).
    """

    path: str
    output: FrameOutput
    ignore_other_audio: bool
    with_video_frame: bool = False


ORIGINAL_CLIENTS = WsEndpoint("/", "face", ignore_other_audio=True)
"""``ws://HOST:8085``, where the original system's browser clients connect."""
FULL_FRAMES = WsEndpoint("/ws", "composite", ignore_other_audio=False)
"""``/ws``: full composited frames (the web page, the load generator)."""
CROP_OUTPUT = WsEndpoint("/ws", "face", ignore_other_audio=False, with_video_frame=True)
"""``/ws?output=crop``: face patches and the video frame each belongs to (crop output, opt-in;
the web page when the avatar has background JPEGs)."""


class _WsConnection:
    """One WebSocket connection on one `WsEndpoint`: decode, admit (per-connection limit),
    render, reply."""

    def __init__(
        self, ws: web.WebSocketResponse, ctx: GatewayContext, endpoint: WsEndpoint, request: web.Request
    ) -> None:
        self.ws = ws
        self.endpoint = endpoint
        self.peer = request.remote
        self.malformed = ctx.malformed
        self.pipeline = ctx.pipeline
        self.messages = ctx.metrics.ws_messages
        self._binary_messages = self.messages.labels(kind="binary")  # per message: no labels() lookup
        self.limiter = ctx.new_connection_limiter(peer_address(request.remote or ""))
        self.sender = request.app[WS_GATE_KEY].sender(ws, request)
        self.max_bytes = ctx.settings.ws_max_message_bytes
        self.tasks: set[asyncio.Task[None]] = set()

    async def serve(self) -> None:
        """Read messages until the client closes; cancel unfinished frames at the end."""
        try:
            async for msg in self.ws:
                if msg.type == WSMsgType.BINARY:
                    await self._on_binary(msg.data)
                elif msg.type == WSMsgType.TEXT:
                    self.messages.labels(kind="text").inc()
                    await self._refuse_malformed(
                        BadRequest(
                            "text messages are not part of the protocol; send binary "
                            "[name_len u32][name][frame_id u32][audio_len u32][audio]"
                        ),
                        frame_id=0,
                        started=time.perf_counter(),
                    )
                elif msg.type == WSMsgType.ERROR:
                    # aiohttp already closed the connection: 1009 for a message over the
                    # transport cap, 1002 for a frame that breaks the WebSocket protocol
                    self.messages.labels(kind="too_big").inc()
                    self.malformed.report(
                        "ws", self.endpoint.path, self.peer, f"connection closed: {msg.data}"
                    )
                    break
        finally:
            for task in list(self.tasks):
                task.cancel()
            if self.tasks:
                await asyncio.gather(*self.tasks, return_exceptions=True)
            await self.sender.wait_closed()

    async def _on_binary(self, data: bytes) -> None:
        started = time.perf_counter()
        if len(data) > self.max_bytes:
            self.messages.labels(kind="oversized").inc()
            await self._refuse_malformed(
                BadRequest(
                    f"message of {len(data)} bytes exceeds the limit of {self.max_bytes} bytes "
                    "(LIPSYNC_WS_MAX_MESSAGE_BYTES)"
                ),
                frame_id=0,
                started=started,
            )
            return
        self._binary_messages.inc()
        try:
            wire = decode_request(data, max_name_bytes=MAX_NAME_BYTES, max_audio_bytes=self.max_bytes)
        except ProtocolError as exc:
            await self._refuse_malformed(exc, frame_id=exc.frame_id, started=started)
            return
        request = FrameRequest(wire.avatar, wire.frame_id, self._live_audio(wire), self.endpoint.output)
        try:
            await self.limiter.acquire(wait=False)
        except Overloaded as exc:
            await self._refuse(exc, frame_id=request.frame_id, started=started)
            return
        task = asyncio.create_task(self._render(request, started))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _live_audio(self, wire: WsRequest) -> WindowChunks | None:
        """The request's live audio, None for the package's; on ``/`` audio that is not a
        live-audio window is ignored (module doc)."""
        if not wire.audio:
            return None
        if self.endpoint.ignore_other_audio and not is_window_length(len(wire.audio), wire.frame_id):
            return None
        return WindowChunks(wire.audio, wire.frame_id)

    async def _render(self, request: FrameRequest, started: float) -> None:
        """Render and answer one frame; its slot is held until the reply is written, so a
        client that does not read has at most the limit's frames queued (`gateway.ws_limits`)."""
        try:
            await self._render_and_reply(request, started)
        finally:
            self.limiter.release()

    async def _render_and_reply(self, request: FrameRequest, started: float) -> None:
        try:
            frame = await self.pipeline.render(request, protocol="ws")
        except GatewayError as exc:
            await self._reply_error(exc, request.frame_id, started)
            return
        except Exception as exc:  # noqa: BLE001 - a bug (the pipeline logged it): answer, keep the connection
            await self._reply_error(unexpected(exc), request.frame_id, started)
            return
        elapsed_ms = (time.perf_counter() - started) * 1e3
        if self.endpoint.with_video_frame:
            reply = encode_crop_reply(request.frame_id, elapsed_ms, frame.jpeg, frame.rect, frame.video_frame)
        else:
            reply = encode_frame_reply(request.frame_id, elapsed_ms, frame.jpeg, frame.rect)
        await self._send(reply)

    async def _refuse_malformed(self, exc: BadRequest, *, frame_id: int, started: float) -> None:
        """`_refuse` a message that does not follow the protocol, reported as malformed input
        (`gateway.malformed`: counted, one log line per peer per interval)."""
        self.malformed.report("ws", self.endpoint.path, self.peer, exc.message)
        await self._refuse(exc, frame_id=frame_id, started=started)

    async def _refuse(self, exc: GatewayError, *, frame_id: int, started: float) -> None:
        """Count a message refused before the pipeline and send its error reply."""
        self.pipeline.record_refused("ws", exc)
        await self._reply_error(exc, frame_id, started)

    async def _reply_error(self, exc: GatewayError, frame_id: int, started: float) -> None:
        elapsed_ms = (time.perf_counter() - started) * 1e3
        await self._send(encode_error_reply(frame_id, elapsed_ms, str(exc)))

    async def _send(self, payload: bytes) -> None:
        await self.sender.send(payload)


async def websocket_handler(request: web.Request) -> web.WebSocketResponse:
    """``GET /ws``: serve one WebSocket connection, full frames, or crop output with
    ``?output=crop`` (see the module docstring).

    Raises:
        BadRequest: ``output`` other than ``full`` or ``crop`` (400 before the upgrade).
    """
    output = request.query.get("output", "full")
    if output not in ("full", "crop"):
        raise BadRequest(f"output={output!r}: choose full (default) or crop")
    return await _serve_websocket(request, CROP_OUTPUT if output == "crop" else FULL_FRAMES)


async def _serve_websocket(request: web.Request, endpoint: WsEndpoint) -> web.WebSocketResponse:
    """Serve one WebSocket connection on ``endpoint`` until it closes."""
    async with _open_websocket(request, endpoint.path) as ws:
        await _WsConnection(ws, request.app[CONTEXT_KEY], endpoint, request).serve()
    return ws


async def live_websocket_handler(request: web.Request) -> web.WebSocketResponse:
    """``GET /live``: one live session (`gateway.live_ws`)."""
    ctx = request.app[CONTEXT_KEY]
    async with _open_websocket(request, LIVE_PATH) as ws:
        await serve_live_websocket(
            ws, request, ctx.live, ctx.settings.ws_max_message_bytes, ctx.malformed,
            request.app[WS_GATE_KEY],
        )
    return ws


@contextlib.asynccontextmanager
async def _open_websocket(request: web.Request, path: str) -> AsyncIterator[web.WebSocketResponse]:
    """The upgraded WebSocket of ``request`` for the block: admitted by the app's `WsGate`
    (Origin and connection cap, before the upgrade) for as long as it is open, and one of the
    app's open WebSockets (closed with 1001 when the gateway stops).

    Messages up to ``ws_max_message_bytes * TRANSPORT_CAP_FACTOR`` reach the handler (which
    answers the oversized ones with an error), heartbeat 30 s, no compression.

    Raises:
        web.HTTPException: a handshake aiohttp refused (400): reported as malformed input
            of the client on ``path``.
    """
    ctx = request.app[CONTEXT_KEY]
    with request.app[WS_GATE_KEY].admit(request):
        ws = web.WebSocketResponse(
            max_msg_size=ctx.settings.ws_max_message_bytes * TRANSPORT_CAP_FACTOR,
            heartbeat=30.0,
            compress=False,  # replies are JPEG: permessage-deflate would burn CPU for nothing
        )
        try:
            await ws.prepare(request)
        except web.HTTPException as exc:  # a handshake aiohttp refused (400): the client's error
            ctx.malformed.report("ws", path, request.remote, f"handshake refused: {exc.text}")
            request[MALFORMED_KEY] = True
            raise
        open_ws = request.app[WS_OPEN_KEY]
        open_ws.add(ws)
        try:
            yield ws
        finally:
            open_ws.discard(ws)


async def _close_websockets(app: web.Application) -> None:
    """``on_shutdown``: close every open WebSocket (1001, going away).

    Without it the runner's cleanup would wait for each connection's handler until its
    shutdown timeout (60 s), so stopping the gateway with a page open would hang.
    """
    open_ws = app[WS_OPEN_KEY]
    for ws in list(open_ws):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"gateway shutting down")


# ------------------------------------------------------------------------------ HTTP


def _avatar_json(avatar: Avatar) -> dict[str, Any]:
    """JSON description of one avatar for the page and API clients."""
    weights = avatar.package.manifest.weights
    rows = avatar.feature_rows
    return {
        "name": avatar.name,
        "model_name": avatar.model,
        "fps": avatar.fps,
        "width": avatar.width,
        "height": avatar.height,
        "frame_count": avatar.video_frames,
        "output_frames": rows,
        "duration_s": rows / avatar.fps if avatar.fps else 0.0,
        "trained": weights.trained,
        "weights": {  # where the weights came from: file names, never the build host's paths
            "unet": PurePath(weights.unet.source).name,
            "audio_encoder": PurePath(weights.audio_encoder.source).name,
            "unet_onnx_sha256": weights.unet.onnx_sha256,
        },
        "audio_url": f"/api/avatars/{quote(avatar.name, safe='')}/audio.wav",
        "backgrounds_url": _backgrounds_url(avatar),
        "init_ms": round(avatar.init_ms, 1),
    }


def _backgrounds_url(avatar: Avatar) -> str | None:
    """URL template of the avatar's background JPEGs (``{video_frame}`` to fill in), versioned by
    their ETag so a client may cache them for good; None when the gateway has none."""
    if avatar.backgrounds is None:
        return None
    version = avatar.backgrounds.etag.strip('"')
    return f"/api/avatars/{quote(avatar.name, safe='')}/backgrounds/{{video_frame}}.jpg?v={version}"


def _json_error(exc: GatewayError) -> web.Response:
    # a 401 names the scheme it wants (RFC 7235 s.3.1)
    headers = {"WWW-Authenticate": 'Bearer realm="lipsync"'} if exc.http_status == 401 else None
    body = {"error": exc.code, "message": exc.message}
    return web.json_response(body, status=exc.http_status, headers=headers)


@web.middleware
async def _errors_as_json(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Turn a `GatewayError` raised by a handler into its JSON error response; a
    ``bad_request`` (a request that does not parse) is also reported as malformed input."""
    try:
        return await handler(request)
    except GatewayError as exc:
        if isinstance(exc, BadRequest):
            route = request.match_info.route.resource
            request.app[CONTEXT_KEY].malformed.report(
                "http", route.canonical if route is not None else request.path, request.remote, exc.message
            )
            request[MALFORMED_KEY] = True
        return _json_error(exc)


UNPARSED = "(unparsed request)"
"""The ``method`` label of HTTP requests aiohttp's parser refused (no route to name)."""
_PARSER_REFUSED_METHOD = "UNKNOWN"
"""The method of the request aiohttp makes up to answer one its parser refused."""


class AccessLog(AccessLogger):
    """aiohttp's access log (``aiohttp.access``, one INFO line per request), less the requests
    reported as malformed input (their one rate-limited line is `gateway.malformed`'s), with a
    ``token`` query parameter's value replaced (`gateway.auth.without_token`)."""

    def log(self, request: BaseRequest, response: web.StreamResponse, time: float) -> None:
        if request.get(MALFORMED_KEY) or (
            response.status == 400 and request.method == _PARSER_REFUSED_METHOD
        ):
            return
        super().log(without_token(request), response, time)


class ServerLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's request-handler logger for one gateway (`web.AppRunner(..., logger=)`).

    A request aiohttp's parser refused (``HttpProcessingError``: not HTTP, a bad header, ...)
    is the client's malformed input: answered 400 by aiohttp, reported to
    `gateway.malformed.MalformedInput` (counted, one line per peer per interval) instead of
    aiohttp's traceback. Everything else goes to ``aiohttp.server`` as before.
    """

    def __init__(self, malformed: MalformedInput) -> None:
        super().__init__(logging.getLogger("aiohttp.server"), {})
        self.malformed = malformed

    def _client_error(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        exc = kwargs.get("exc_info")
        if not isinstance(exc, HttpProcessingError):
            return False
        peer = args[0] if args and isinstance(args[0], str) else None  # "... from %s", remote
        self.malformed.report("http", UNPARSED, peer, f"{exc.code}: {exc.message}")
        return True

    def exception(self, msg: object, *args: Any, **kwargs: Any) -> None:
        if not self._client_error(args, kwargs):
            self.logger.exception(msg, *args, **kwargs)

    def debug(self, msg: object, *args: Any, **kwargs: Any) -> None:
        if not self._client_error(args, kwargs):
            self.logger.debug(msg, *args, **kwargs)


async def index(request: web.Request) -> web.StreamResponse:
    """``GET /``: the web page, or, for a WebSocket upgrade, the original clients' endpoint
    (`ORIGINAL_CLIENTS`)."""
    if web.WebSocketResponse().can_prepare(request).ok:
        return await _serve_websocket(request, ORIGINAL_CLIENTS)
    return web.FileResponse(STATIC_DIR / "index.html")


async def static_file(request: web.Request) -> web.FileResponse:
    """``GET /static/{name}``: one of `STATIC_FILES`; 404 for any other name."""
    name = request.match_info["name"]
    if name not in STATIC_FILES:
        raise web.HTTPNotFound()
    return web.FileResponse(STATIC_DIR / name)


async def healthz(request: web.Request) -> web.Response:
    """``GET /healthz``: liveness (the process answers)."""
    ctx = request.app[CONTEXT_KEY]
    return web.json_response({"status": "alive", "uptime_s": round(ctx.uptime_s(), 1)})


async def readyz(request: web.Request) -> web.Response:
    """``GET /readyz``: 200 when the gateway is ready (docs/GLOSSARY.md), else 503 + reason.

    A caller without the token (when one is set) gets ``{"ready": bool, "reason": code}`` only,
    the code one of ``triton_restarting``, ``triton_not_ready``, ``models_not_loaded``,
    ``no_avatar``, ``not_ready`` (null when ready). Otherwise the body also gives the reasons in
    words, and ``triton`` the combined state of the Triton endpoints (`gateway.endpoint_pool`,
    the state of the one endpoint when there is one): ``server`` (unknown | live | down) and each
    model's phase (``model_states``); ``server_ready`` and ``models`` (model -> ready) are the
    older, boolean form of the same. ``endpoints`` lists each endpoint's own state
    (`_endpoint_json`).
    Under ``lipsync up``, ``triton_supervisor`` gives the supervisor of tritonserver (state,
    ``restarts``, ``last_exit`` with its reason, ``restarting``), and while it restarts Triton
    the reason starts with "model server restarting" (`gateway.triton_supervision`).
    ``jpeg`` says how full frames are encoded (``mode``: spliced | full) and, for ``full``, why
    (``reason``: splicing off, or the start-up self-test's finding; `gateway.compositor`).
    """
    ctx = request.app[CONTEXT_KEY]
    snapshot = ctx.lifecycle.snapshot()
    avatars = ctx.store.names()
    gateway_ready = ctx.ready()
    reasons: list[tuple[str, str]] = []  # (code, words)
    supervised = ctx.supervision.reason(gateway_ready) if ctx.supervision is not None else None
    if supervised is not None:
        reasons.append(("triton_restarting", supervised))
    if not snapshot.live:
        reasons.append((
            "triton_not_ready",
            f"Triton at {snapshot.url} is not ready"
            + (f" ({snapshot.server_error})" if snapshot.server_error else ""),
        ))
    avatar_models = {a.model for a in ctx.store.avatars()}
    not_loaded = sorted(
        m for m, s in snapshot.models.items() if m in avatar_models and s.phase is not ModelPhase.READY
    )
    if snapshot.live and not_loaded:
        reasons.append(("models_not_loaded", f"avatar models not loaded in Triton: {', '.join(not_loaded)}"))
    if not avatars:
        reasons.append(("no_avatar", "no avatar loaded"))
    ready = gateway_ready and not reasons
    jpeg = ctx.jpeg_mode()
    if not ready and not reasons:
        reasons.append(("not_ready", "gateway not ready"))
    status = 200 if ready else 503
    if not caller_authenticated(request):
        reduced = {"ready": ready, "reason": reasons[0][0] if reasons else None}
        return web.json_response(reduced, status=status)
    body = {
        "ready": ready,
        "reason": "; ".join(words for _, words in reasons) if reasons else None,
        "triton": {
            "url": snapshot.url,
            "server": snapshot.server.value,
            "server_ready": snapshot.live,
            "models": {m: snapshot.model_ready(m) for m in snapshot.models},
            "model_states": {m: s.phase.value for m, s in snapshot.models.items()},
        },
        "endpoints": [_endpoint_json(e) for e in ctx.lifecycle.endpoints()],
        "avatars": avatars,
        "jpeg": {"mode": jpeg.mode, "reason": jpeg.reason},
    }
    if ctx.supervision is not None:
        body["triton_supervisor"] = ctx.supervision.to_json(gateway_ready)
    return web.json_response(body, status=status)


def _endpoint_json(endpoint: EndpointStatus) -> dict[str, Any]:
    """One Triton endpoint: ``url`` (host:port), ``server``, ``server_error``, ``ready`` (live
    with every required model ready), ``in_flight`` (calls), ``model_states``."""
    state = endpoint.state
    return {
        "url": state.url,
        "server": state.server.value,
        "server_error": state.server_error,
        "ready": state.ready,
        "in_flight": endpoint.in_flight,
        "model_states": {m: s.phase.value for m, s in state.models.items()},
    }


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
        raise UnknownAvatar(f"avatar {avatar.name!r} has no audio file")
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
    peer = peer_address(request.remote or "")
    try:
        await ctx.peers.acquire(peer, wait=False)  # the client's per-peer cap
    except GatewayError as exc:
        ctx.pipeline.record_refused("http", exc)
        raise
    try:
        frame = await ctx.pipeline.render(FrameRequest(request.match_info["name"], frame_id), protocol="http")
    finally:
        ctx.peers.release(peer)
    return web.Response(
        body=frame.jpeg,
        content_type="image/jpeg",
        headers={
            "X-Processing-Ms": f"{(time.perf_counter() - started) * 1e3:.1f}",
            "X-Bounds": ",".join(f"{b:g}" for b in frame.rect),
        },
    )


async def avatar_background(request: web.Request) -> web.Response:
    """``GET /api/avatars/{name}/backgrounds/{video_frame}.jpg``: the JPEG of one video frame, what a
    crop-output client draws the face rectangle on (`gateway.ws_protocol`, crop output).

    Caching: ``ETag`` (of the avatar's background set and the frame; ``If-None-Match`` gets 304);
    ``Cache-Control: immutable`` for a versioned URL (``?v=`` of ``backgrounds_url`` in the avatar's
    JSON) that is current, ``no-cache`` (revalidate) otherwise.

    Raises:
        UnknownAvatar: no such avatar, or one without backgrounds (404).
        BadRequest: a frame that is not an integer; FrameOutOfRange: outside ``0 .. N-1`` (400).
    """
    avatar = request.app[CONTEXT_KEY].store.get(request.match_info["name"])
    backgrounds = avatar.backgrounds
    if backgrounds is None:
        raise UnknownAvatar(f"avatar {avatar.name!r} has no background frames")
    raw = request.match_info["video_frame"]
    try:
        v = int(raw)
    except ValueError:
        raise BadRequest(f"video frame {raw!r} is not an integer") from None
    if not 0 <= v < len(backgrounds.frames):
        raise FrameOutOfRange(
            f"video frame {v} is out of range for avatar {avatar.name!r} "
            f"(valid: 0..{len(backgrounds.frames) - 1})"
        )
    version = backgrounds.etag.strip('"')
    etag = f'"{version}-{v}"'
    headers = {
        "ETag": etag,
        "Cache-Control": "public, max-age=31536000, immutable"
        if request.query.get("v") == version
        else "no-cache",
    }
    if etag in (t.strip() for t in request.headers.get("If-None-Match", "").split(",")):
        return web.Response(status=304, headers=headers)
    return web.Response(body=backgrounds.jpeg(v), content_type="image/jpeg", headers=headers)


async def stats(request: web.Request) -> web.Response:
    """``GET /api/stats``: uptime, in-flight frames, per-avatar counts and inference ms, and per
    Triton endpoint its state (`_endpoint_json`) with ``calls``, ``errors``, ``retries`` (calls
    sent elsewhere after it failed as down) and ``avg_call_ms`` (successful calls). Counts are
    the whole gateway's (every worker's, `GatewayMetrics.snapshot`); uptime, readiness, the
    endpoint states and ``worker`` (pid, number of workers) are the answering process's."""
    ctx = request.app[CONTEXT_KEY]
    snapshot = ctx.metrics.snapshot()  # the whole gateway: every worker's series
    per_avatar = {}
    for avatar in ctx.store.avatars():
        s = ctx.metrics.avatar_totals(avatar.name, snapshot)
        per_avatar[avatar.name] = {
            "total_requests": s.frames,
            "errors": s.errors,
            "avg_inference_ms": round(s.avg_inference_ms, 2),
            "min_inference_ms": round(s.inference_ms_min, 2),
            "max_inference_ms": round(s.inference_ms_max, 2),
            "frame_count": avatar.video_frames,
            "output_frames": avatar.feature_rows,
        }
    in_flight = int(snapshot.value("lipsync_gateway_in_flight") or 0)
    ws_open = len(request.app[WS_OPEN_KEY])  # every WebSocket of this process, /live included
    if ctx.metrics.multiprocess:  # several workers: /ws and / connections of all of them
        ws_open = int(snapshot.value("lipsync_gateway_ws_connections") or 0)
    return web.json_response(
        {
            "uptime_s": round(ctx.uptime_s(), 1),
            "ready": ctx.ready(),
            "in_flight": in_flight,
            "max_in_flight_total": ctx.pipeline.admission.limit,
            "ws_connections": ws_open,
            "worker": {"pid": os.getpid(), "workers": ctx.settings.workers},
            "avatars": per_avatar,
            "triton_endpoints": [
                {**_endpoint_json(e), **ctx.metrics.endpoint_totals(e.state.url, snapshot)}
                for e in ctx.lifecycle.endpoints()
            ],
        }
    )


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: Prometheus text exposition of the gateway's registry."""
    body = request.app[CONTEXT_KEY].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _base_app(ctx: GatewayContext, middlewares: list[Any]) -> web.Application:
    app = web.Application(middlewares=middlewares)
    app[CONTEXT_KEY] = ctx
    app[POLICY_KEY] = TokenPolicy.from_settings(ctx.settings)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


def create_app(ctx: GatewayContext) -> web.Application:
    """Build the aiohttp application for one gateway.

    Args:
        ctx: the running gateway's context (settings, store, Triton client, pipeline,
            metrics); the app only reads it.

    Returns:
        The application; `gateway.server.GatewayServer` runs it with an ``AppRunner``. Every
        route passes `gateway.auth.auth_middleware` (module doc).
    """
    app = _base_app(ctx, [_errors_as_json, auth_middleware])
    app[WS_OPEN_KEY] = set()
    app[WS_GATE_KEY] = WsGate(ctx.settings, ctx.metrics)
    app.on_shutdown.append(_close_websockets)
    app.router.add_get("/", index)
    app.router.add_get("/ws", websocket_handler)
    app.router.add_get(LIVE_PATH, live_websocket_handler)
    app.router.add_get("/api/avatars", list_avatars)
    app.router.add_get("/api/avatars/{name}", get_avatar)
    app.router.add_get("/api/avatars/{name}/audio.wav", avatar_audio)
    app.router.add_get("/api/avatars/{name}/frames/{frame_id}.jpg", avatar_frame)
    app.router.add_get("/api/avatars/{name}/backgrounds/{video_frame}.jpg", avatar_background)
    app.router.add_get("/api/stats", stats)
    app.router.add_get("/static/{name}", static_file)
    return app


def create_health_app(ctx: GatewayContext) -> web.Application:
    """The app of the optional health port (``LIPSYNC_HEALTH_PORT``): ``/healthz``, ``/readyz``
    (reduced for a caller without the token) and ``/metrics`` only, for probes and Prometheus."""
    return _base_app(ctx, [_errors_as_json])
