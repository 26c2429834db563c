"""The binary WebSocket protocol of the original system: pure encode/decode, no I/O.

Every integer is little-endian. One WebSocket binary message carries one frame request, and
the server answers each with one binary message (success or error); replies may arrive out of
request order, so they carry the ``frame_id`` the client asked for.

Request (client -> server)::

    [name_len u32][name utf-8, name_len bytes][frame_id u32][audio_len u32][audio, audio_len bytes]

Success reply (server -> client)::

    [1 u8][frame_id u32][processing_ms u32][jpeg_len u32][jpeg][bounds_len u32 = 16][4 x float32]

The four float32 are the crop rectangle ``x1, y1, x2, y2`` in pixels of the full frame, and
``bounds_len`` is their length **in bytes** (16), as the original server wrote it
(``struct.pack('<I', len(bounds_bytes))`` before the float32 bytes). Its clients read the field
as a byte count, take ``new Uint8Array(data, offset, boundsLength)``, copy it into an aligned
buffer and view that as a ``Float32Array``; `decode_reply` reads it the same way.

Error reply (server -> client)::

    [0 u8][frame_id u32][processing_ms u32][len u32][utf-8 message]

The message text is ``"<code>: <detail>"`` with a stable code from `gateway.errors`
(``bad_request``, ``unknown_avatar``, ``frame_out_of_range``, ``overloaded``, ...).

Two endpoints speak it (`gateway.http_app`), with the same layout and different images:

- ``/`` (a WebSocket upgrade on the page's own path, where the original clients connect,
  ``ws://HOST:8085``): the JPEG is the **face patch**, the crop rectangle's pixels of the
  composited frame (`lipsync.frames.face_patch`: the 328 crop with the prediction pasted into
  its inner 320, resized to the rectangle), so drawing it into the rectangle over the avatar's
  video frame, as the original real-time client does (``drawImage(img, x, y, w, h)``, no
  scaling since it has the rectangle's size), gives the composited frame. Audio in a request
  is ignored unless it is exactly a live-audio window ``/ws`` accepts for that frame (then it is
  used): the original clients send one 40 ms chunk at the browser's sample rate, which the
  original server ignored too.
- ``/ws``: the JPEG is the whole composited frame; audio of any other length than a live-audio
  window is a ``bad_request`` (`gateway.audio_features.check_window_chunks`).

``frame_id`` is unsigned on this wire, so there is no negative frame: a client that wraps -1
sends 4294967295, which the gateway answers with ``frame_out_of_range``.

A client must read its replies: the gateway queues a bounded amount for it and closes a
connection whose client does not take them with WebSocket close code 1013 (try again later)
and a reason (`gateway.ws_limits`); a client that reconnects is served again.

Decoding checks every length field against the bytes actually present and against the limits
given, and raises `ProtocolError` (a `gateway.errors.BadRequest`) with a precise message; it
never reads past the buffer and never allocates from an unchecked length.
"""
from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.errors import BadRequest

U32_MAX = 0xFFFFFFFF
"""Largest value of a u32 field (frame_id, processing_ms, lengths)."""

MAX_NAME_BYTES = 256
"""Default limit on the avatar name's UTF-8 length in a request (bytes)."""

_U32 = struct.Struct("<I")
_FLOAT32_BYTES = 4
_REPLY_HEAD = struct.Struct("<BIII")  # status, frame_id, processing_ms, payload length

STATUS_ERROR = 0
STATUS_OK = 1


class ProtocolError(BadRequest):
    """A message that does not follow the protocol (truncated, wrong lengths, over a limit).

    Attributes:
        frame_id: the request's frame_id when the decoder got far enough to read it, else 0,
            so the error reply can still name the frame the client meant.
    """

    def __init__(self, message: str, frame_id: int = 0) -> None:
        super().__init__(message)
        self.frame_id = frame_id


@dataclass(frozen=True, slots=True)
class WsRequest:
    """One decoded request (the HTTP app turns it into a `gateway.frame_request.FrameRequest`).

    Attributes:
        avatar: the avatar name (the wire's ``name``), UTF-8 decoded.
        frame_id: requested output frame, 0 .. 2**32-1 (the gateway checks the avatar's range).
        audio: raw audio bytes sent with the request (empty = use the package's features).
    """

    avatar: str
    frame_id: int
    audio: bytes = b""


@dataclass(frozen=True, slots=True)
class FrameReply:
    """A decoded success reply (used by clients, tests and the load generator).

    Attributes:
        frame_id: the frame this reply answers.
        processing_ms: server-side time for the frame (ms, integer).
        jpeg: JPEG bytes of the composited frame (``/ws``) or of the face patch (``/``).
        bounds: the crop rectangle ``(x1, y1, x2, y2)`` in px as float32 values.
    """

    frame_id: int
    processing_ms: int
    jpeg: bytes
    bounds: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """A decoded error reply.

    Attributes:
        frame_id: the frame the failed request named (0 when it could not be read).
        processing_ms: server-side time spent before failing (ms).
        message: ``"<code>: <detail>"``.
    """

    frame_id: int
    processing_ms: int
    message: str

    @property
    def code(self) -> str:
        """The stable error code before the first colon (``bad_request``, ...)."""
        return self.message.split(":", 1)[0].strip()


def _clamp_u32(value: float | int) -> int:
    """Round a non-negative number into the u32 range (negative and NaN -> 0)."""
    if not isinstance(value, int):
        if math.isnan(value):
            return 0
        value = round(value)
    return max(0, min(U32_MAX, value))


def _check_u32(name: str, value: int) -> None:
    if not 0 <= value <= U32_MAX:
        raise ValueError(f"{name}={value} does not fit in a u32 (0 .. {U32_MAX})")


# --------------------------------------------------------------------------- requests


def encode_request(avatar: str, frame_id: int, audio: bytes = b"") -> bytes:
    """Encode one frame request (what a client sends).

    Raises:
        ValueError: frame_id outside 0 .. 2**32-1.
    """
    _check_u32("frame_id", frame_id)
    name = avatar.encode("utf-8")
    return b"".join(
        (_U32.pack(len(name)), name, _U32.pack(frame_id), _U32.pack(len(audio)), audio)
    )


def decode_request(
    data: bytes | bytearray | memoryview,
    *,
    max_name_bytes: int = MAX_NAME_BYTES,
    max_audio_bytes: int = 1024 * 1024,
) -> WsRequest:
    """Decode and validate one request message.

    Args:
        data: the whole binary WebSocket message.
        max_name_bytes: largest accepted avatar-name length (bytes).
        max_audio_bytes: largest accepted audio length (bytes).

    Returns:
        The decoded `WsRequest` (audio may be non-empty; whether audio is supported is the
        caller's decision).

    Raises:
        ProtocolError: truncated message, a length field larger than its limit or than the
            bytes that follow, trailing bytes after the audio, an empty or non-UTF-8 name.
    """
    buf = memoryview(data)
    total = len(buf)
    if total < 4:
        raise ProtocolError(
            f"message truncated: {total} bytes, a request needs at least 12 "
            "([name_len u32][name][frame_id u32][audio_len u32])"
        )
    (name_len,) = _U32.unpack_from(buf, 0)
    if name_len == 0:
        raise ProtocolError("name_len=0: the avatar name must not be empty")
    if name_len > max_name_bytes:
        raise ProtocolError(f"name_len={name_len} exceeds the limit of {max_name_bytes} bytes")
    if 4 + name_len + 8 > total:
        raise ProtocolError(
            f"message truncated: name_len={name_len} but only {total - 4} bytes follow "
            f"(need {name_len} for the name + 8 for frame_id and audio_len)"
        )
    try:
        avatar = bytes(buf[4 : 4 + name_len]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"avatar name is not valid UTF-8: {exc.reason} at byte {exc.start}") from exc
    offset = 4 + name_len
    (frame_id,) = _U32.unpack_from(buf, offset)
    (audio_len,) = _U32.unpack_from(buf, offset + 4)
    offset += 8
    remaining = total - offset
    if audio_len > max_audio_bytes:
        raise ProtocolError(
            f"audio_len={audio_len} exceeds the limit of {max_audio_bytes} bytes", frame_id
        )
    if audio_len > remaining:
        raise ProtocolError(
            f"message truncated: audio_len={audio_len} but only {remaining} bytes follow",
            frame_id,
        )
    if audio_len < remaining:
        raise ProtocolError(
            f"message has {remaining - audio_len} unexpected trailing bytes after "
            f"audio_len={audio_len} bytes of audio (total {total} bytes)",
            frame_id,
        )
    return WsRequest(avatar=avatar, frame_id=frame_id, audio=bytes(buf[offset:]))


# --------------------------------------------------------------------------- replies


def encode_frame_reply(
    frame_id: int, processing_ms: float, jpeg: bytes, bounds: Sequence[float]
) -> bytes:
    """Encode a success reply.

    Args:
        frame_id: the frame answered (u32).
        processing_ms: server-side time (ms); rounded and clamped into u32.
        jpeg: JPEG bytes (the composited frame, or the face patch on ``/``).
        bounds: crop rectangle ``x1, y1, x2, y2`` (px), sent as float32 after their length in
            bytes (16).
    """
    _check_u32("frame_id", frame_id)
    head = _REPLY_HEAD.pack(STATUS_OK, frame_id, _clamp_u32(processing_ms), len(jpeg))
    tail = _U32.pack(len(bounds) * _FLOAT32_BYTES) + struct.pack(f"<{len(bounds)}f", *bounds)
    return b"".join((head, jpeg, tail))


def encode_error_reply(frame_id: int, processing_ms: float, message: str) -> bytes:
    """Encode an error reply; ``message`` should be ``"<code>: <detail>"`` (``str(err)``)."""
    text = message.encode("utf-8")
    head = _REPLY_HEAD.pack(
        STATUS_ERROR, _clamp_u32(frame_id), _clamp_u32(processing_ms), len(text)
    )
    return head + text


def decode_reply(data: bytes | bytearray | memoryview) -> FrameReply | ErrorReply:
    """Decode a server reply (client side).

    Raises:
        ProtocolError: unknown status byte, truncated message or inconsistent lengths.
    """
    buf = memoryview(data)
    total = len(buf)
    if total < _REPLY_HEAD.size:
        raise ProtocolError(f"reply truncated: {total} bytes, need at least {_REPLY_HEAD.size}")
    status, frame_id, processing_ms, length = _REPLY_HEAD.unpack_from(buf, 0)
    offset = _REPLY_HEAD.size
    if length > total - offset:
        raise ProtocolError(
            f"reply truncated: payload length {length} but only {total - offset} bytes follow",
            frame_id,
        )
    payload = bytes(buf[offset : offset + length])
    offset += length
    if status == STATUS_ERROR:
        if offset != total:
            raise ProtocolError(f"error reply has {total - offset} trailing bytes", frame_id)
        return ErrorReply(frame_id, processing_ms, payload.decode("utf-8", errors="replace"))
    if status != STATUS_OK:
        raise ProtocolError(f"unknown reply status byte {status} (expected 0 or 1)", frame_id)
    if total - offset < 4:
        raise ProtocolError("reply truncated: missing the bounds length", frame_id)
    (bounds_len,) = _U32.unpack_from(buf, offset)
    offset += 4
    if bounds_len != total - offset or bounds_len % _FLOAT32_BYTES:
        raise ProtocolError(
            f"reply has bounds_len={bounds_len} bytes of float32 bounds but "
            f"{total - offset} bytes follow",
            frame_id,
        )
    bounds = struct.unpack_from(f"<{bounds_len // _FLOAT32_BYTES}f", buf, offset)
    return FrameReply(frame_id, processing_ms, payload, tuple(bounds))
