"""Malformed client input: counted, and logged at most once per peer per interval, without a
traceback.

A request that does not decode is the client's error, not the server's: the client gets a
precise answer from its adapter (gRPC ``INVALID_ARGUMENT``, a WebSocket error reply, HTTP 400),
and the gateway records it here with `MalformedInput.report`:

- the counter ``lipsync_gateway_malformed_requests_total{protocol, method}`` counts every one
  (``method``: the full gRPC method name, the WebSocket path, or the HTTP route; label values
  come from the server's own routes, never from the request, so they stay few);
- one warning line per peer (its address without the port, so a client reconnecting does not
  get a new allowance) per ``interval_s``; the first line after a quiet interval says how many
  were not logged (`RateLimitedLog`). Anyone who can reach a port can send malformed input at
  line rate; this keeps the log's growth bounded by the number of peers, not of messages.

Who reports: `gateway.grpc_decode_guard` (undecodable protobuf messages, every gRPC method),
`gateway.http_app` (WebSocket messages that do not follow `gateway.ws_protocol`, WebSocket
protocol errors and refused handshakes, ``bad_request`` answers of the HTTP routes, and HTTP
requests aiohttp's parser refused).
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from prometheus_client import Counter

from gateway.frame_request import WireProtocol

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 10.0
"""One log line per peer per this many seconds."""
MAX_PEERS = 4096
"""Peers remembered at once; beyond it the longest-quiet one is forgotten (bounded memory)."""
MAX_DETAIL_CHARS = 200
"""A logged detail is cut to this many characters (it may quote the client's bytes)."""


@dataclass
class _Window:
    """One key's current interval: when its line was logged (s, the log's clock) and how many
    messages since were not."""

    logged_at: float
    suppressed: int = 0


class RateLimitedLog:
    """Warnings at most once per key per interval, with the count of the ones left out.

    Args:
        logger: where the lines go.
        interval_s: the interval (s), > 0.
        clock: monotonic time in seconds (tests pass their own).
        max_keys: keys remembered at once (the longest-quiet one is dropped beyond it).

    Thread-safe.
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = DEFAULT_INTERVAL_S,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = MAX_PEERS,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.logger = logger
        self.interval_s = interval_s
        self._clock = clock
        self._max_keys = max_keys
        self._windows: dict[Hashable, _Window] = {}
        self._lock = threading.Lock()

    def warning(self, key: Hashable, message: str) -> bool:
        """Log ``message`` as a warning unless ``key`` logged one less than ``interval_s`` ago.

        The line gets " (N more since <s> s ago not logged)" when messages of that key were
        left out in the interval before it.

        Returns:
            Whether the line was logged.
        """
        now = self._clock()
        with self._lock:
            window = self._windows.pop(key, None)  # re-inserted last: dict order = least recent first
            if window is not None and now - window.logged_at < self.interval_s:
                window.suppressed += 1
                self._windows[key] = window
                return False
            self._windows[key] = _Window(now)
            while len(self._windows) > self._max_keys:
                del self._windows[next(iter(self._windows))]
        if window is not None and window.suppressed:
            message += (
                f" ({window.suppressed} more since {now - window.logged_at:.0f} s ago not logged)"
            )
        self.logger.warning("%s", message)
        return True


def peer_host(peer: str) -> str:
    """A peer's address without its port: ``ipv4:10.0.0.2:5123`` -> ``ipv4:10.0.0.2``,
    ``ipv6:[::1]:5123`` -> ``ipv6:[::1]`` (gRPC's form); a plain host (aiohttp's
    ``request.remote``) is returned as it is."""
    kind, sep, address = peer.partition(":")
    if not sep or kind not in ("ipv4", "ipv6"):
        return peer
    host, colon, port = address.rpartition(":")
    return f"{kind}:{host}" if colon and port.isdigit() else peer


class MalformedInput:
    """The gateway's record of malformed client input (module doc).

    Args:
        counter: ``lipsync_gateway_malformed_requests_total`` with labels protocol, method.
        interval_s: one log line per peer per this many seconds.
    """

    def __init__(self, counter: Counter, interval_s: float = DEFAULT_INTERVAL_S) -> None:
        self.counter = counter
        self.log = RateLimitedLog(log, interval_s)

    def report(self, protocol: WireProtocol, method: str, peer: str | None, detail: str) -> None:
        """Count one malformed request and maybe log it (one line per peer per interval).

        Args:
            protocol: grpc | ws | http.
            method: the gRPC method (``/package.Service/Method``), WebSocket path or HTTP route
                it was sent to.
            peer: the client's address (gRPC ``context.peer()``, aiohttp ``request.remote``),
                None when unknown.
            detail: what was wrong, one line.
        """
        self.counter.labels(protocol=protocol, method=method).inc()
        host = peer_host(peer) if peer else "unknown peer"
        detail = " ".join(detail.split())  # one line
        if len(detail) > MAX_DETAIL_CHARS:
            detail = detail[:MAX_DETAIL_CHARS] + "..."
        self.log.warning(host, f"malformed {protocol} request from {host} to {method}: {detail}")
