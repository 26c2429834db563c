"""``GET /live``: a live session over a WebSocket (wire layout: `gateway.live_ws_protocol`).

The connection's messages are decoded into the session's inputs by a reader generator that
`gateway.live_service.LiveSessions.serve` pulls only while the session accepts audio, so a
client sending faster than real time is held back by TCP (aiohttp stops reading the socket
when its buffer is full). The handler writes each frame as it comes; after the last one it
closes the connection with 1000. ``{"type": "end"}`` or the client closing ends the input; a
connection that goes away ends the session (its renders are cancelled).
"""
from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import WSCloseCode, WSMsgType, web

from gateway.errors import BadRequest, GatewayError
from gateway.live_service import LiveInput, LiveSessions, Pcm, Refused
from gateway.live_ws_protocol import End, decode_text, encode_output

log = logging.getLogger(__name__)


async def _inputs(ws: web.WebSocketResponse, max_bytes: int) -> AsyncIterator[LiveInput]:
    """The connection's messages as session inputs, until ``end`` or the close."""
    async for msg in ws:
        if msg.type == WSMsgType.BINARY:
            if len(msg.data) > max_bytes:
                yield Refused(BadRequest(
                    f"PCM message of {len(msg.data)} bytes exceeds the limit of {max_bytes} bytes "
                    "(LIPSYNC_WS_MAX_MESSAGE_BYTES); send smaller pieces"
                ))
            else:
                yield Pcm(msg.data)
        elif msg.type == WSMsgType.TEXT:
            try:
                item = decode_text(msg.data)
            except GatewayError as exc:
                yield Refused(exc)
                continue
            if isinstance(item, End):
                return
            yield item
        elif msg.type == WSMsgType.ERROR:
            log.warning("live WebSocket closed: %s", msg.data)
            return


async def serve_live_websocket(
    request: web.Request, live: LiveSessions, max_message_bytes: int, open_ws: set[web.WebSocketResponse]
) -> web.WebSocketResponse:
    """Serve one ``/live`` connection (module doc).

    Args:
        request: the upgrade request.
        live: the gateway's live sessions.
        max_message_bytes: largest PCM message accepted (``ws_max_message_bytes``); up to 4x
            that gets an error, beyond aiohttp closes with 1009.
        open_ws: the app's open WebSockets (closed with 1001 when the gateway stops).
    """
    ws = web.WebSocketResponse(max_msg_size=max_message_bytes * 4, heartbeat=30.0, compress=False)
    await ws.prepare(request)
    open_ws.add(ws)
    try:
        async for item in live.serve(_inputs(ws, max_message_bytes), "ws"):
            if ws.closed:
                break
            try:
                await ws.send_bytes(encode_output(item))
            except (ConnectionError, RuntimeError) as exc:
                log.debug("live WebSocket gone: %s", exc)
                break
        else:
            await ws.close(code=WSCloseCode.OK, message=b"session ended")
    finally:
        open_ws.discard(ws)
    return ws
