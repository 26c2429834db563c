"""``GET /live``: a live session over a WebSocket (wire layout: `gateway.live_ws_protocol`).

The connection's messages are decoded into the session's inputs by a reader generator that
`gateway.live_service.LiveSessions.serve` pulls while the session holds less than
`LiveSettings.max_held_s` of audio ahead, so a client sending faster than real time is held
back by TCP beyond that (aiohttp stops reading the socket when its buffer is full). The
handler writes each frame as it comes; after the last one it closes the connection with 1000.
``{"type": "end"}`` or the client closing ends the input; a connection that goes away ends the
session (its renders are cancelled).
"""
from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

from aiohttp import WSCloseCode, WSMsgType, web

from gateway.errors import BadRequest, GatewayError
from gateway.live_service import LiveInput, LiveSessions, Pcm, Refused
from gateway.live_ws_protocol import End, decode_text, encode_output
from gateway.malformed import MalformedInput
from gateway.ws_limits import WsGate

log = logging.getLogger(__name__)


PATH = "/live"


async def _inputs(
    ws: web.WebSocketResponse, max_bytes: int, malformed: Callable[[str], None]
) -> AsyncIterator[LiveInput]:
    """The connection's messages as session inputs, until ``end`` or the close; input that
    does not follow the protocol also goes to ``malformed`` (`gateway.malformed`)."""
    async for msg in ws:
        if msg.type == WSMsgType.BINARY:
            if len(msg.data) > max_bytes:
                refused = BadRequest(
                    f"PCM message of {len(msg.data)} bytes exceeds the limit of {max_bytes} bytes "
                    "(LIPSYNC_WS_MAX_MESSAGE_BYTES); send smaller pieces"
                )
                malformed(refused.message)
                yield Refused(refused)
            else:
                yield Pcm(msg.data)
        elif msg.type == WSMsgType.TEXT:
            try:
                item = decode_text(msg.data)
            except GatewayError as exc:
                if isinstance(exc, BadRequest):
                    malformed(exc.message)
                yield Refused(exc)
                continue
            if isinstance(item, End):
                return
            yield item
        elif msg.type == WSMsgType.ERROR:  # aiohttp closed it (protocol error, too big)
            malformed(f"connection closed: {msg.data}")
            return


async def serve_live_websocket(
    ws: web.WebSocketResponse,
    request: web.Request,
    live: LiveSessions,
    max_message_bytes: int,
    malformed: MalformedInput,
    gate: WsGate,
) -> None:
    """Serve one ``/live`` connection (module doc) on its upgraded WebSocket until the session
    ends (then closed with 1000) or the client goes.

    Args:
        ws: the prepared WebSocket (`gateway.http_app` upgrades it and keeps it among the app's
            open WebSockets); it takes messages up to 4x ``max_message_bytes``.
        request: the upgrade request.
        live: the gateway's live sessions.
        max_message_bytes: largest PCM message accepted (``ws_max_message_bytes``); up to 4x
            that gets an error, beyond aiohttp closes with 1009.
        malformed: where messages that do not follow the protocol are reported (counted, one
            log line per peer per interval).
        gate: the WebSocket limits; frames go out within its send budget, and a client that
            does not take them is closed with 1013 (`gateway.ws_limits`), ending its session.
    """

    def report(detail: str) -> None:
        malformed.report("ws", PATH, request.remote, detail)

    sender = gate.sender(ws, request)
    try:
        async for item in live.serve(_inputs(ws, max_message_bytes, report), "ws"):
            if not await sender.send(encode_output(item)):
                break  # the client is gone or fell behind (then closed with 1013)
        else:
            await ws.close(code=WSCloseCode.OK, message=b"session ended")
    finally:
        await sender.wait_closed()
