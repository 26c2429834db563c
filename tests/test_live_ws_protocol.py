"""The live WebSocket wire layout (`gateway.live_ws_protocol`), byte by byte."""
from __future__ import annotations

import json
import struct

import pytest

from gateway.errors import BadRequest
from gateway.live.types import RenderedFrame, SessionNotice, SlotFrame
from gateway.live_service import Control, Start
from gateway.live_ws_protocol import (
    HEADER,
    End,
    decode_output,
    decode_text,
    encode_output,
)


def test_frame_layout_is_little_endian_with_fixed_offsets() -> None:
    frame = SlotFrame(
        seq=2**33 + 5,
        pts_s=(2**33 + 5) * 0.04,
        frame=RenderedFrame(b"\xff\xd8JPEG\xff\xd9", (1.5, 2.0, 30.0, 40.25)),
        speaking=False,
        video_frame=77,
        error="bad_request: x",
        late=True,
        audio_at=12.0,
    )
    data = encode_output(frame)
    assert HEADER.size == 46 and len(data) == 46 + 14 + 8
    assert data[0] == 1 and data[1] == 0b10  # frame; late, not speaking
    assert data[2:10] == (2**33 + 5).to_bytes(8, "little")
    assert struct.unpack("<d", data[10:18])[0] == (2**33 + 5) * 0.04
    assert data[18:22] == (77).to_bytes(4, "little")
    assert struct.unpack("<4f", data[22:38]) == (1.5, 2.0, 30.0, 40.25)
    assert data[38:42] == (14).to_bytes(4, "little") and data[42:46] == (8).to_bytes(4, "little")
    assert data[46:60] == b"bad_request: x" and data[60:] == b"\xff\xd8JPEG\xff\xd9"
    back = decode_output(data)
    assert back == SlotFrame(frame.seq, frame.pts_s, frame.frame, False, 77, "bad_request: x", True, None)


def test_speaking_flag_and_notice() -> None:
    frame = SlotFrame(0, 0.0, RenderedFrame(b"J", (0.0, 0.0, 1.0, 1.0)), True, 0, "", False, None)
    assert encode_output(frame)[1] == 0b01
    notice = encode_output(SessionNotice("unknown_avatar: avatar 'x' is not loaded"))
    assert (
        notice[0] == 2
        and notice[42:46] == bytes(4)
        and len(notice) == 46 + len("unknown_avatar: avatar 'x' is not loaded")
    )
    assert decode_output(notice) == SessionNotice("unknown_avatar: avatar 'x' is not loaded")


@pytest.mark.parametrize(
    "data", [b"", bytes(45), encode_output(SessionNotice("abc"))[:-1], b"\x03" + bytes(45)]
)
def test_decoding_refuses_what_does_not_add_up(data: bytes) -> None:
    with pytest.raises(ValueError):
        decode_output(data)


def test_text_messages() -> None:
    assert decode_text('{"type": "start", "avatar": "demo", "sample_rate_hz": 48000}') == Start("demo", 48000)
    assert decode_text('{"type": "flush"}') == Control("flush")
    assert decode_text('{"type": "interrupt"}') == Control("interrupt")
    assert decode_text('{"type": "end"}') == End()


@pytest.mark.parametrize(("text", "why"), [
    ("hello", "not JSON"),
    ("[1]", "JSON object"),
    ('{"type": "stop"}', "unknown message type 'stop'"),
    ('{"avatar": "demo"}', "unknown message type None"),
    ('{"type": "start", "sample_rate_hz": 16000}', "\"avatar\""),
    ('{"type": "start", "avatar": "demo", "sample_rate_hz": "16000"}', "\"sample_rate_hz\""),
    ('{"type": "start", "avatar": "demo", "sample_rate_hz": true}', "\"sample_rate_hz\""),
    (json.dumps({"type": "start", "avatar": "demo", "sample_rate_hz": 16000.5}), "\"sample_rate_hz\""),
])
def test_bad_text_messages_are_bad_requests(text: str, why: str) -> None:
    with pytest.raises(BadRequest) as info:
        decode_text(text)
    assert why in str(info.value) and str(info.value).startswith("bad_request: ")
