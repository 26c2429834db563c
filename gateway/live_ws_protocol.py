"""The live WebSocket protocol (``ws://HOST:8085/live``): pure encode/decode, no I/O.

One connection is one live session, the same session as gRPC ``lipsync.live.v1.LiveLipSync``
(proto/live.proto); every integer and float is little-endian.

Client -> server:

- text messages, JSON objects with a ``type``::

      {"type": "start", "avatar": "demo", "sample_rate_hz": 48000}
      {"type": "flush"}        render what has arrived, padding the lookahead with silence
      {"type": "interrupt"}    drop audio not yet rendered; the next slot is idle
      {"type": "end"}          end of input: the frames of all audio received follow, then
                               the server closes the connection (1000)

- binary messages: audio, 16-bit little-endian mono PCM at the start's rate (8000-48000 Hz),
  any number of whole samples per message (an odd byte count is refused whole).

Closing the connection also ends the input. A text message that is not one of these gets a
``bad_request`` error on the next frame; the session goes on.

Server -> client, one binary message per slot (a *frame*) or per error before start (a
*notice*), 46 bytes of header then two variable parts::

    offset size
     0      1   kind u8          1 = frame (one slot), 2 = notice (an error, no slot)
     1      1   flags u8         bit 0 speaking, bit 1 late (other bits 0)
     2      8   seq u64          slot index 0, 1, 2, ... without gaps (0 in a notice)
    10      8   pts_s f64        seq * 0.04 (s)
    18      4   video_frame u32  the avatar's video frame shown
    22     16   bounds 4 x f32   crop rectangle x1, y1, x2, y2 (px)
    38      4   error_len u32    bytes of error text
    42      4   jpeg_len u32     bytes of JPEG
    46          error            utf-8, "code: message; ..." ("" when none)
    46+e        jpeg             the frame (empty in a notice)

The fields are those of ``LiveFrame`` (``speaking``, ``late``, ``error`` included);
``error_len + jpeg_len`` equals the message length less 46.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Final

from gateway.errors import BadRequest
from gateway.live.types import RenderedFrame, SessionNotice, SlotFrame
from gateway.live_service import Control, LiveInput, LiveOutput, Start

KIND_FRAME: Final[int] = 1
KIND_NOTICE: Final[int] = 2
FLAG_SPEAKING: Final[int] = 1
FLAG_LATE: Final[int] = 2

HEADER = struct.Struct("<BBQdI4fII")
"""kind, flags, seq, pts_s, video_frame, bounds x1 y1 x2 y2, error_len, jpeg_len (46 bytes)."""


@dataclass(frozen=True)
class End:
    """``{"type": "end"}``: end of input."""


def decode_text(text: str) -> LiveInput | End:
    """One text message -> the session's input, or `End`.

    Raises:
        BadRequest: not JSON, not an object, an unknown ``type``, or a ``start`` whose
            ``avatar`` is not a string or ``sample_rate_hz`` not an integer.
    """
    try:
        message = json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than the parser goes
        raise BadRequest(
            f'text message is not JSON ({exc}); send {{"type": "start" | "flush" | "interrupt" | "end"}}'
        ) from None
    if not isinstance(message, dict):
        raise BadRequest("a text message must be a JSON object with a \"type\"")
    kind = message.get("type")
    if kind == "start":
        avatar, rate = message.get("avatar"), message.get("sample_rate_hz")
        if not isinstance(avatar, str):
            raise BadRequest("start needs \"avatar\": the avatar name (a string)")
        if not isinstance(rate, int) or isinstance(rate, bool):
            raise BadRequest("start needs \"sample_rate_hz\": the PCM rate in Hz (an integer, 8000..48000)")
        return Start(avatar, rate)
    if kind == "flush":
        return Control("flush")
    if kind == "interrupt":
        return Control("interrupt")
    if kind == "end":
        return End()
    raise BadRequest(f"unknown message type {kind!r}: send start, flush, interrupt or end")


def encode_output(item: LiveOutput) -> bytes:
    """A frame (slot) or a notice (error before start) as one binary message (module doc)."""
    if isinstance(item, SessionNotice):
        error = item.error.encode()
        return HEADER.pack(KIND_NOTICE, 0, 0, 0.0, 0, 0.0, 0.0, 0.0, 0.0, len(error), 0) + error
    error = item.error.encode()
    jpeg = item.frame.jpeg
    flags = (FLAG_SPEAKING if item.speaking else 0) | (FLAG_LATE if item.late else 0)
    return b"".join(
        (
            HEADER.pack(
                KIND_FRAME,
                flags,
                item.seq,
                item.pts_s,
                item.video_frame,
                *item.frame.bounds,
                len(error),
                len(jpeg),
            ),
            error,
            jpeg,
        )
    )


def decode_output(data: bytes) -> LiveOutput:
    """A server message back into a `SlotFrame` (``audio_at`` None) or `SessionNotice` (clients,
    tests).

    Raises:
        ValueError: shorter than the header, lengths that do not add up, an unknown kind.
    """
    if len(data) < HEADER.size:
        raise ValueError(f"live message of {len(data)} bytes is shorter than its {HEADER.size}-byte header")
    kind, flags, seq, pts_s, video_frame, x1, y1, x2, y2, error_len, jpeg_len = HEADER.unpack_from(data)
    if HEADER.size + error_len + jpeg_len != len(data):
        raise ValueError(
            f"live message of {len(data)} bytes: header {HEADER.size} + error {error_len} + jpeg {jpeg_len} "
            "do not add up"
        )
    error = data[HEADER.size : HEADER.size + error_len].decode()
    if kind == KIND_NOTICE:
        return SessionNotice(error)
    if kind != KIND_FRAME:
        raise ValueError(f"unknown live message kind {kind}")
    return SlotFrame(
        seq=seq,
        pts_s=pts_s,
        frame=RenderedFrame(data[HEADER.size + error_len :], (x1, y1, x2, y2)),
        speaking=bool(flags & FLAG_SPEAKING),
        video_frame=video_frame,
        error=error,
        late=bool(flags & FLAG_LATE),
        audio_at=None,
    )
