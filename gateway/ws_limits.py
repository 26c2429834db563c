"""WebSocket limits (issue 11): who may connect, how many, and how far a client may fall behind.

Before the upgrade (`WsGate.admit`, HTTP errors as JSON, nothing allocated for the connection):

- **Origin**: a browser sends the page's origin with the upgrade. It must be the gateway's own
  (the ``Host`` the browser connected to: the gateway's page, or a proxy in front of it that
  keeps ``Host``) or one of ``ws_allowed_origins`` (``*`` = any); otherwise HTTP 403
  ``origin_not_allowed``. This stops another site's page from using a visitor's browser (and
  its network position) to stream from the gateway. A client that sends no ``Origin`` is not
  a browser (a browser always sends it on a WebSocket upgrade) and is allowed.
- **Connections**: at most ``max_ws_connections`` open at once; one more gets HTTP 503
  ``overloaded`` before the upgrade.

After it, every reply goes through the connection's `WsSender`, the **send budget**. A reply is
written only while the bytes the connection has queued in the gateway (the transport's write
buffer: replies its TCP connection has not taken yet, because the client reads slower than it
asks) plus the reply fit in ``ws_send_buffer_bytes`` (or nothing is queued: one reply always
fits), and the client must take it within ``ws_send_timeout_s``. The frames queued are
bounded by the per-connection in-flight limit: a frame's slot is held until its reply is
written (`gateway.http_app`). A client past either
limit has fallen behind and is closed with **1013 (try again later)** and a reason; its
transport is then aborted, which frees what was queued for it (a client that does not read
would never take the close frame either). Why close rather than drop replies: the protocol
promises one reply per request, a dropped reply would leave the client waiting for it, and an
error reply in its place would grow the same queue; a client that reads again can reconnect.
Closes are counted in ``lipsync_gateway_ws_closed_slow_total{reason}`` and refusals in
``lipsync_gateway_ws_refused_total{reason}``.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from aiohttp import WSCloseCode, hdrs, web

from gateway.errors import OriginNotAllowed, Overloaded

if TYPE_CHECKING:
    from gateway.config import GatewaySettings
    from gateway.metrics import GatewayMetrics

log = logging.getLogger(__name__)

_DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}
_WS_HEADER_MAX_BYTES = 14
"""Longest WebSocket frame header (RFC 6455 5.2: 2 + 8 length bytes + 4 mask bytes)."""
_CLOSE_REASON_BYTES = 123
"""Longest close reason: a control frame carries 125 bytes, 2 of them the code."""


def _host_port(netloc: str, scheme: str | None) -> tuple[str, int | None] | None:
    """``host[:port]`` -> (lower-case host, port or the scheme's default); None if unparsable."""
    try:
        parts = urlsplit(f"//{netloc}")
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname:
        return None
    return parts.hostname.lower(), port if port is not None else _DEFAULT_PORTS.get(scheme or "")


def origin_allowed(origin: str | None, host: str | None, allowed: Sequence[str]) -> bool:
    """Whether a WebSocket upgrade with this ``Origin`` may proceed (module doc).

    Args:
        origin: the request's ``Origin`` header (None: not a browser, allowed).
        host: the request's ``Host`` header (``host[:port]``).
        allowed: extra origins (``scheme://host[:port]``, compared without a trailing slash and
            case-insensitively); ``*`` allows any.

    Returns:
        True for no Origin, the request's own origin (host and port as the browser connected,
        default ports filled in), an allowed one or ``*``; else False (``null`` included).
    """
    if origin is None:
        return True
    normalized = origin.strip().rstrip("/").lower()
    if "*" in allowed or normalized in (a.lower() for a in allowed):
        return True
    try:
        parts = urlsplit(normalized)
    except ValueError:
        return False
    if parts.scheme not in _DEFAULT_PORTS or host is None:
        return False
    own = _host_port(parts.netloc, parts.scheme)
    if own is None:
        return False
    target = _host_port(host, parts.scheme)  # Host carries no scheme: the page's is assumed
    return target is not None and own == target


class WsGate:
    """The WebSocket limits of one gateway, for every WebSocket path (``/ws``, ``/live``): the
    checks before the upgrade, the count of open connections, the send budget after it.

    Args:
        settings: ``max_ws_connections``, ``ws_allowed_origins``, ``ws_send_buffer_bytes``,
            ``ws_send_timeout_s``.
        metrics: ``ws_refused_total``, ``ws_closed_slow_total`` and the ``ws_connections``
            gauge.
    """

    def __init__(self, settings: GatewaySettings, metrics: GatewayMetrics) -> None:
        self.max_connections = settings.max_ws_connections
        self.allowed_origins = tuple(settings.ws_allowed_origins)
        self.send_buffer_bytes = settings.ws_send_buffer_bytes
        self.send_timeout_s = settings.ws_send_timeout_s
        self.metrics = metrics
        self.open = 0

    @contextlib.contextmanager
    def admit(self, request: web.Request) -> Iterator[None]:
        """Hold one connection for the block (the whole WebSocket), after the checks.

        Raises:
            OriginNotAllowed: a browser page of another origin (HTTP 403).
            Overloaded: ``max_ws_connections`` are open (HTTP 503).
        """
        origin = request.headers.get(hdrs.ORIGIN)
        if not origin_allowed(origin, request.host, self.allowed_origins):
            self.metrics.ws_refused.labels(reason="origin").inc()
            log.info("WebSocket from origin %r refused (host %r)", origin, request.host)
            raise OriginNotAllowed(
                f"WebSocket from origin {origin!r} refused: only the page's own origin and "
                "LIPSYNC_WS_ALLOWED_ORIGINS may connect"
            )
        if self.open >= self.max_connections:
            self.metrics.ws_refused.labels(reason="connections").inc()
            raise Overloaded(
                f"the gateway already has {self.open} WebSocket connections (limit "
                f"{self.max_connections}, LIPSYNC_MAX_WS_CONNECTIONS); retry later"
            )
        self.open += 1
        self.metrics.ws_connections.inc()
        try:
            yield
        finally:
            self.open -= 1
            self.metrics.ws_connections.dec()

    def sender(self, ws: web.WebSocketResponse, request: web.Request) -> WsSender:
        """The send budget of the connection ``request`` upgraded to ``ws``."""
        return WsSender(
            ws,
            request.transport,
            max_buffer_bytes=self.send_buffer_bytes,
            timeout_s=self.send_timeout_s,
            metrics=self.metrics,
        )


class WsSender:
    """Sends one connection's replies within its send budget (module doc).

    Args:
        ws: the prepared WebSocket.
        transport: the connection's transport (``request.transport``), whose write buffer is
            the queue measured; None (already gone) disables the byte budget.
        max_buffer_bytes: ``ws_send_buffer_bytes``.
        timeout_s: ``ws_send_timeout_s``; also the time the close handshake gets.
        metrics: where closes are counted.
    """

    def __init__(
        self,
        ws: web.WebSocketResponse,
        transport: asyncio.Transport | None,
        *,
        max_buffer_bytes: int,
        timeout_s: float,
        metrics: GatewayMetrics,
    ) -> None:
        self.ws = ws
        self.transport = transport
        self.max_buffer_bytes = max_buffer_bytes
        self.timeout_s = timeout_s
        self.metrics = metrics
        self._closer: asyncio.Task[None] | None = None

    @property
    def behind(self) -> bool:
        """The client fell behind: the connection is being closed, replies are not sent."""
        return self._closer is not None

    def _fits(self, payload: bytes) -> bool:
        """Whether ``payload`` in one WebSocket frame fits the transport's empty write buffer
        below its high-water mark: writing it then cannot pause the transport, the only case
        in which ``send_bytes`` waits (for the client to take bytes)."""
        if self.transport is None:
            return False
        return len(payload) + _WS_HEADER_MAX_BYTES <= self.transport.get_write_buffer_limits()[1]

    def queued_bytes(self) -> int:
        """Bytes written for this connection that its TCP connection has not taken yet."""
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    async def send(self, payload: bytes) -> bool:
        """Send one reply, or close the connection with 1013 if the client fell behind.

        Returns:
            True when the reply was written; False when it was not: the connection is gone or
            closing (logged at debug) or the client fell behind. Never raises for those.
        """
        if self.behind or self.ws.closed:
            return False
        queued = self.queued_bytes()
        if queued and queued + len(payload) > self.max_buffer_bytes:
            self._fall_behind(
                "send_buffer",
                f"client not reading: {queued} bytes of replies queued (limit {self.max_buffer_bytes})",
            )
            return False
        try:
            if not queued and self._fits(payload):
                # the write cannot pause the transport, so send_bytes returns without waiting
                # for the client: no timer to arm (about 5 us of the event loop per reply)
                await self.ws.send_bytes(payload)
            else:
                # asyncio.timeout, not wait_for: no task and no waiter future per reply (issue 9)
                async with asyncio.timeout(self.timeout_s):
                    await self.ws.send_bytes(payload)
        except TimeoutError:
            # written, but the client took none of it in time
            self._fall_behind("send_timeout", f"client took no reply for {self.timeout_s:g} s")
            return False
        except (ConnectionError, RuntimeError) as exc:
            log.debug("WebSocket reply dropped, connection gone: %s", exc)
            return False
        return True

    def _fall_behind(self, reason: str, detail: str) -> None:
        """Start closing with 1013 (once), in a task of its own: the caller may be a frame
        task that the connection cancels when it ends."""
        if self._closer is not None:
            return
        self.metrics.ws_closed_slow.labels(reason=reason).inc()
        log.info("closing a WebSocket with 1013: %s", detail)
        self._closer = asyncio.create_task(self._close(detail), name="ws-close-slow")

    async def _close(self, detail: str) -> None:
        message = detail.encode("utf-8")[:_CLOSE_REASON_BYTES]
        try:
            await asyncio.wait_for(
                self.ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=message), self.timeout_s
            )
        except (TimeoutError, ConnectionError, RuntimeError) as exc:
            log.debug("WebSocket close handshake not completed: %s", exc)
        finally:
            if self.transport is not None:
                self.transport.abort()  # frees what is still queued for the client

    async def wait_closed(self) -> None:
        """Wait for a close started by `send` (no-op if none)."""
        if self._closer is not None:
            await asyncio.gather(self._closer, return_exceptions=True)
