"""Unit tests of the binary WebSocket protocol (gateway/ws_protocol.py): byte layouts written
out by hand with `struct`, round trips, and every way a request can be malformed."""
from __future__ import annotations

import struct

import pytest

from gateway.errors import BadRequest
from gateway.ws_protocol import (
    U32_MAX,
    ErrorReply,
    FrameReply,
    ProtocolError,
    WsRequest,
    decode_reply,
    decode_request,
    encode_error_reply,
    encode_frame_reply,
    encode_request,
)
from tests.original_ws_client import OriginalClientFrame, parse_reply_as_original_client


def test_request_layout_is_little_endian_as_the_original_system() -> None:
    raw = encode_request("demo", 7)
    assert raw == struct.pack("<I", 4) + b"demo" + struct.pack("<II", 7, 0)
    raw = encode_request("é", 0x01020304, b"\x10\x20")
    assert raw == b"\x02\x00\x00\x00" + "é".encode() + b"\x04\x03\x02\x01" + b"\x02\x00\x00\x00\x10\x20"


def test_request_round_trip() -> None:
    req = decode_request(encode_request("avatar_ü", U32_MAX, b"pcm!"))
    assert req == WsRequest(avatar="avatar_ü", frame_id=U32_MAX, audio=b"pcm!")


def test_encode_request_rejects_negative_frame() -> None:
    with pytest.raises(ValueError, match="does not fit in a u32"):
        encode_request("demo", -1)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "message truncated: 0 bytes"),
        (b"\x04\x00", "message truncated: 2 bytes"),
        (struct.pack("<I", 40) + b"demo" + b"\x00" * 8, "name_len=40 but only 12 bytes follow"),
        (struct.pack("<I", 4) + b"demo" + b"\x00" * 4, "name_len=4 but only 8 bytes follow"),
        (struct.pack("<I", 0) + b"\x00" * 8, "name_len=0"),
        (struct.pack("<I", 100_000) + b"x" * 20, "name_len=100000 exceeds the limit of 256"),
        (struct.pack("<I", 2) + b"\xff\xfe" + b"\x00" * 8, "not valid UTF-8"),
        (
            struct.pack("<I", 4) + b"demo" + struct.pack("<II", 3, 10) + b"abc",
            "audio_len=10 but only 3 bytes follow",
        ),
        (
            struct.pack("<I", 4) + b"demo" + struct.pack("<II", 3, 0) + b"junk",
            "4 unexpected trailing bytes",
        ),
        (
            struct.pack("<I", 4) + b"demo" + struct.pack("<II", 3, U32_MAX),
            f"audio_len={U32_MAX} exceeds the limit",
        ),
    ],
)
def test_malformed_requests_raise_precise_bad_request(raw: bytes, message: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_request(raw)
    assert message in info.value.message
    assert isinstance(info.value, BadRequest)
    assert str(info.value).startswith("bad_request: ")


def test_protocol_error_keeps_frame_id_when_it_was_readable() -> None:
    raw = struct.pack("<I", 4) + b"demo" + struct.pack("<II", 42, 10) + b"abc"
    with pytest.raises(ProtocolError) as info:
        decode_request(raw)
    assert info.value.frame_id == 42


def test_limits_are_configurable() -> None:
    raw = encode_request("a" * 20, 1, b"x" * 100)
    with pytest.raises(ProtocolError, match="name_len=20 exceeds the limit of 10 bytes"):
        decode_request(raw, max_name_bytes=10)
    with pytest.raises(ProtocolError, match="audio_len=100 exceeds the limit of 99 bytes"):
        decode_request(raw, max_audio_bytes=99)
    assert decode_request(raw, max_name_bytes=20, max_audio_bytes=100).audio == b"x" * 100


def test_frame_reply_layout_and_round_trip() -> None:
    jpeg = b"\xff\xd8fake\xff\xd9"
    raw = encode_frame_reply(5, 12.6, jpeg, (1.0, 2.5, 3.0, 4.0))
    assert raw[:13] == struct.pack("<BIII", 1, 5, 13, len(jpeg))
    assert raw[13 : 13 + len(jpeg)] == jpeg
    assert raw[13 + len(jpeg) :] == struct.pack("<I4f", 16, 1.0, 2.5, 3.0, 4.0), "bounds_len in bytes"
    assert decode_reply(raw) == FrameReply(5, 13, jpeg, (1.0, 2.5, 3.0, 4.0))
    assert parse_reply_as_original_client(raw) == OriginalClientFrame(5, 13, jpeg, (1.0, 2.5, 3.0, 4.0))


def test_error_reply_layout_and_round_trip() -> None:
    raw = encode_error_reply(9, 0.4, "unknown_avatar: no avatar named 'x'")
    assert raw[:13] == struct.pack("<BIII", 0, 9, 0, 35)
    reply = decode_reply(raw)
    assert reply == ErrorReply(9, 0, "unknown_avatar: no avatar named 'x'")
    assert isinstance(reply, ErrorReply) and reply.code == "unknown_avatar"


def test_processing_ms_is_clamped_into_u32() -> None:
    assert decode_reply(encode_error_reply(1, -5.0, "x")).processing_ms == 0
    assert decode_reply(encode_error_reply(1, 1e12, "x")).processing_ms == U32_MAX
    assert decode_reply(encode_error_reply(1, float("nan"), "x")).processing_ms == 0


ONE_BYTE_JPEG = struct.pack("<BIII", 1, 0, 0, 1) + b"j"
"""The head of a success reply and its 1-byte "JPEG"."""


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\x01\x00", "reply truncated"),
        (struct.pack("<BIII", 2, 0, 0, 0), "unknown reply status byte 2"),
        (struct.pack("<BIII", 1, 0, 0, 10) + b"abc", "payload length 10 but only 3"),
        (ONE_BYTE_JPEG + struct.pack("<I", 16) + b"\x00" * 8, "bounds_len=16 bytes .* but 8"),
        (ONE_BYTE_JPEG + struct.pack("<I", 4) + b"\x00" * 16, "bounds_len=4 bytes .* but 16"),
        (ONE_BYTE_JPEG + struct.pack("<I", 6) + b"\x00" * 6, "bounds_len=6 bytes"),
        (struct.pack("<BIII", 1, 0, 0, 1) + b"j", "missing the bounds length"),
    ],
)
def test_malformed_replies(raw: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        decode_reply(raw)
