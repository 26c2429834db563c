"""A WebSocket client on a plain socket (RFC 6455), for tests that need what a library client
does not do: never read (its socket's receive buffer set small), send frames whose header is
wrong, or read the close frame's code and reason byte for byte.

`RawWebSocket.connect(host, port, path, origin=...)` performs the upgrade (HTTP/1.1, a random
key, the server's accept checked) and returns the open connection; `send` writes one masked
frame; `read_frame` reads one frame (no fragmentation, as the gateway never fragments).
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import re
import socket
import struct
from dataclasses import dataclass

import numpy as np

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x2, 0x8, 0x9, 0xA


class UpgradeRefused(Exception):
    """The server answered the upgrade with an HTTP status other than 101.

    Attributes:
        status: the HTTP status code.
        body: the response body (bytes read after the headers, possibly partial).
    """

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"upgrade refused: HTTP {status}: {body[:200]!r}")
        self.status = status
        self.body = body


def frame(payload: bytes, opcode: int = OP_BINARY, *, fin: bool = True, mask: bytes | None = None) -> bytes:
    """One client frame: FIN + ``opcode``, masked (clients must mask) with ``mask`` (4 random
    bytes if None)."""
    key = os.urandom(4) if mask is None else mask
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    data = np.frombuffer(payload, dtype=np.uint8)
    return head + key + (data ^ np.resize(np.frombuffer(key, dtype=np.uint8), data.size)).tobytes()


@dataclass
class Frame:
    """One frame read from the server."""

    opcode: int
    payload: bytes

    @property
    def close_code(self) -> int | None:
        """A close frame's status code (None for other frames or an empty close)."""
        if self.opcode != OP_CLOSE or len(self.payload) < 2:
            return None
        return int(struct.unpack("!H", self.payload[:2])[0])

    @property
    def close_reason(self) -> str:
        """A close frame's reason text."""
        return self.payload[2:].decode("utf-8", errors="replace") if self.opcode == OP_CLOSE else ""


class RawWebSocket:
    """An open client connection (see module doc)."""

    def __init__(self, sock: socket.socket, pending: bytes = b"") -> None:
        self.sock = sock
        self._buf = pending

    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        path: str = "/ws",
        *,
        origin: str | None = None,
        rcvbuf: int | None = None,
        source: str | None = None,
        timeout_s: float = 10.0,
    ) -> RawWebSocket:
        """Open the connection and perform the upgrade.

        Args:
            host: an IPv4 or IPv6 address (``::1``).
            origin: an ``Origin`` header to send (None: none, as a non-browser client).
            rcvbuf: ``SO_RCVBUF`` of the socket (bytes), set before connecting.
            source: the local address to connect from (``127.0.0.2``: another client address
                on Linux's loopback); None: the system's choice.

        Raises:
            UpgradeRefused: the server did not switch protocols.
        """
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if source is not None:
            sock.bind((source, 0))
        sock.settimeout(timeout_s)
        sock.connect((host, port))
        key = base64.b64encode(os.urandom(16))
        authority = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        lines = [
            f"GET {path} HTTP/1.1", f"Host: {authority}", "Upgrade: websocket", "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key.decode()}", "Sec-WebSocket-Version: 13",
        ]
        if origin is not None:
            lines.append(f"Origin: {origin}")
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
        if status != 101:
            # read the body by its Content-Length: the server keeps the connection open, so
            # reading "until more comes" would wait for the socket's timeout
            match = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            length = int(match.group(1)) if match else 0
            with contextlib.suppress(OSError):
                while len(rest) < length and (chunk := sock.recv(65536)):
                    rest += chunk
            sock.close()
            raise UpgradeRefused(status, rest)
        accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
        if b"sec-websocket-accept: " + accept.lower() not in head.lower():
            sock.close()
            raise RuntimeError(f"bad upgrade answer: {head!r}")
        return cls(sock, rest)

    def send(self, payload: bytes, opcode: int = OP_BINARY) -> None:
        """Send one masked frame."""
        self.sock.sendall(frame(payload, opcode))

    def send_raw(self, data: bytes) -> None:
        """Send bytes as they are (a malformed frame, say)."""
        self.sock.sendall(data)

    def _read_exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self.sock.recv(max(65536, n - len(self._buf)))
            if not chunk:
                raise ConnectionError("connection closed by the server")
            self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def read_frame(self) -> Frame:
        """Read one whole frame (blocking, the socket's timeout applies).

        Raises:
            ConnectionError: the server closed the TCP connection first.
        """
        b0, b1 = self._read_exact(2)
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", self._read_exact(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", self._read_exact(8))
        return Frame(b0 & 0x0F, self._read_exact(n))

    def close(self) -> None:
        """Close the socket (no close handshake)."""
        self.sock.close()
