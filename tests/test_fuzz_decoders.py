"""Property-based tests (hypothesis) of every decoder of client input (issue 11, fuzzing): the
binary WebSocket request/reply codec, the live WebSocket text messages and frames, the live gRPC
requests, the audio payload checks, the live PCM checks and the package manifest loader.

The property is the same everywhere: any input, random or a mutation of a valid one, is either
accepted (and then means what it says: it re-encodes to the same bytes, or has the shape the
contract gives) or refused with the module's own error (`gateway.errors.BadRequest` and its
`ProtocolError`, `lipsync.package.PackageError`), never another exception. The HTTP routes'
parameters are fuzzed against a running gateway in tests/test_fuzz_http.py, the network as a
whole in tests/test_network_fuzz.py.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.audio_features import (
    CHUNK_BYTES,
    WINDOW_CHUNK_BYTES,
    check_chunks,
    check_window_chunks,
    pcm_mel_windows,
)
from gateway.errors import BadRequest
from gateway.live.pcm import (
    MAX_SAMPLE_RATE_HZ,
    MIN_SAMPLE_RATE_HZ,
    PcmResampler,
    check_sample_rate,
    decode_pcm16,
)
from gateway.live.types import RenderedFrame, SessionNotice, SlotFrame
from gateway.live_grpc import decode_request as decode_live_request
from gateway.live_service import Control, Pcm, Refused, Start
from gateway.live_ws_protocol import End, decode_output, decode_text, encode_output
from gateway.ws_protocol import (
    MAX_NAME_BYTES,
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
from lipsync.contract import MANIFEST_NAME, MEL_BANDS, MEL_WINDOW
from lipsync.package import PackageError, load_package
from proto import live_pb2

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
"""Examples per property: a few seconds each on a loaded 2-core machine."""

u32 = st.integers(0, 2**32 - 1)
names = st.text(min_size=1, max_size=80).filter(lambda s: 0 < len(s.encode()) <= MAX_NAME_BYTES)


@st.composite
def mutated(draw: st.DrawFn, valid: st.SearchStrategy[bytes]) -> bytes:
    """A valid message with a few bytes flipped, cut, inserted or its tail dropped or extended."""
    data = bytearray(draw(valid))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "truncate", "extend"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut" and data:
            del data[at : at + draw(st.integers(1, 8))]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "truncate":
            del data[at:]
        else:
            data += draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


# ----------------------------------------------------------------------------- binary WebSocket


ws_requests = st.builds(encode_request, names, u32, st.binary(max_size=2048))


@FUZZ
@given(st.one_of(st.binary(max_size=4096), ws_requests, mutated(ws_requests)))
@example(b"")
@example(b"\xff\xff\xff\xff")  # name_len 2**32-1 on 4 bytes
@example(encode_request("a", 1)[:-1])
def test_ws_request_decoder(data: bytes) -> None:
    try:
        request = decode_request(data, max_audio_bytes=4096)
    except ProtocolError as exc:
        assert str(exc).startswith("bad_request: ")
        return
    assert isinstance(request, WsRequest)
    again = encode_request(request.avatar, request.frame_id, request.audio)
    assert again == data, "accepted = exactly what was sent"


@FUZZ
@given(names, u32, st.binary(max_size=2048))
def test_ws_request_round_trip(avatar: str, frame_id: int, audio: bytes) -> None:
    assert decode_request(encode_request(avatar, frame_id, audio)) == WsRequest(avatar, frame_id, audio)


finite32 = st.floats(allow_nan=False, allow_infinity=False, width=32)
ws_replies = st.one_of(
    st.builds(
        encode_frame_reply, u32, st.floats(0, 1e6), st.binary(max_size=512), st.lists(finite32, max_size=4)
    ),
    st.builds(encode_error_reply, u32, st.floats(0, 1e6), st.text(max_size=200)),
)


@FUZZ
@given(st.one_of(st.binary(max_size=4096), ws_replies, mutated(ws_replies)))
def test_ws_reply_decoder(data: bytes) -> None:
    try:
        reply = decode_reply(data)
    except ProtocolError:
        return
    assert isinstance(reply, FrameReply | ErrorReply)


# ----------------------------------------------------------------------------- live WebSocket

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
live_texts = st.one_of(
    st.text(max_size=300),
    json_values.map(json.dumps),
    st.fixed_dictionaries(
        {"type": st.sampled_from(["start", "flush", "interrupt", "end", "START", ""])},
        optional={"avatar": json_values, "sample_rate_hz": json_values},
    ).map(json.dumps),
)


@FUZZ
@given(live_texts)
@example("[" * 100_000)  # nesting deeper than the JSON parser's recursion limit
@example('{"type": "start", "avatar": "demo", "sample_rate_hz": true}')
def test_live_text_decoder(text: str) -> None:
    try:
        item = decode_text(text)
    except BadRequest:
        return
    assert isinstance(item, Start | Control | End)
    if isinstance(item, Start):
        assert isinstance(item.avatar, str) and type(item.sample_rate_hz) is int


slot_frames = st.builds(
    SlotFrame,
    seq=st.integers(0, 2**64 - 1),
    pts_s=st.floats(allow_nan=False),
    frame=st.builds(RenderedFrame, st.binary(max_size=256), st.tuples(*[finite32] * 4)),
    speaking=st.booleans(),
    video_frame=u32,
    error=st.text(max_size=50),
    late=st.booleans(),
    audio_at=st.none(),
)
live_outputs = st.one_of(slot_frames, st.builds(SessionNotice, st.text(max_size=50)))


@FUZZ
@given(live_outputs)
def test_live_frame_round_trip(item: SlotFrame | SessionNotice) -> None:
    assert decode_output(encode_output(item)) == item


@FUZZ
@given(st.one_of(st.binary(max_size=512), mutated(live_outputs.map(encode_output))))
def test_live_frame_decoder(data: bytes) -> None:
    try:
        item = decode_output(data)
    except ValueError:  # the documented client-side error (UnicodeDecodeError included)
        return
    assert isinstance(item, SlotFrame | SessionNotice)


live_requests = st.one_of(
    st.builds(lambda a, r: live_pb2.LiveRequest(start=live_pb2.LiveStart(avatar=a, sample_rate_hz=r)),
              st.text(max_size=30), u32),
    st.builds(lambda b: live_pb2.LiveRequest(pcm=b), st.binary(max_size=256)),
    st.builds(lambda c: live_pb2.LiveRequest(control=live_pb2.LiveControl(command=c)), st.integers(0, 5)),
).map(lambda m: m.SerializeToString())


@FUZZ
@given(st.one_of(st.binary(max_size=512), live_requests, mutated(live_requests)))
def test_live_grpc_request_decoder(data: bytes) -> None:
    try:
        request = live_pb2.LiveRequest.FromString(data)
    except DecodeError:
        return  # the gRPC server answers it (tests/test_network_fuzz.py)
    item = decode_live_request(request)
    assert isinstance(item, Start | Pcm | Control | Refused)


# ----------------------------------------------------------------------------- audio payloads


@FUZZ
@given(st.lists(st.binary(max_size=CHUNK_BYTES + 2), max_size=40), st.integers(-3, 30), st.integers(-3, 20))
@example([bytes(CHUNK_BYTES)] * 18, 3, 8)
@example([bytes(CHUNK_BYTES)] * 12, 3, 2)  # start of a clip: 2 chunks of past
def test_batch_audio_chunk_checks(chunks: list[bytes], frames: int, start: int) -> None:
    try:
        pcm = check_chunks(chunks, frames, start)
    except BadRequest:
        return
    assert frames >= 1 and len(pcm) % CHUNK_BYTES == 0 and 0 < len(pcm) <= len(chunks) * CHUNK_BYTES


@st.composite
def pcm_payloads(draw: st.DrawFn) -> bytes:
    """PCM of a length a live-audio request may carry (or one byte off), its samples noise of
    some amplitude from a drawn seed, silence or full scale."""
    chunks = draw(st.sampled_from([0, 1, 8, 11, 15, 16, 17]))
    n = chunks * CHUNK_BYTES // 2 + draw(st.sampled_from([0, 0, 0, 1]))
    amplitude = draw(st.sampled_from([0, 1, 300, 32767]))
    samples = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).integers(
        -amplitude - 1, amplitude + 1, n, dtype=np.int32)
    data = np.clip(samples, -32768, 32767).astype("<i2").tobytes()
    return data + (b"\x00" if draw(st.booleans()) and draw(st.booleans()) else b"")


@FUZZ
@given(pcm_payloads())
@example(b"\x00\x80" * (WINDOW_CHUNK_BYTES // 2))  # full-scale negative
@example(bytes(WINDOW_CHUNK_BYTES))  # digital silence
def test_window_audio_check_then_features(pcm: bytes) -> None:
    """Whatever passes the check gives finite mel windows, one per chunk (a NaN would reach the
    UNet); any frame id, the start of a clip included."""
    for frame_id in (0, 3, 8, 2**32 - 1):
        try:
            n = check_window_chunks(pcm, frame_id)
        except BadRequest:
            continue
        mel = pcm_mel_windows(pcm, n)
        assert mel.shape == (n, MEL_BANDS, MEL_WINDOW) and np.isfinite(mel).all()


@FUZZ
@given(st.integers(-(2**40), 2**40))
def test_live_sample_rate_check(rate: int) -> None:
    try:
        assert check_sample_rate(rate) == rate
    except BadRequest:
        assert not MIN_SAMPLE_RATE_HZ <= rate <= MAX_SAMPLE_RATE_HZ


@settings(max_examples=100, deadline=None)
@given(st.sampled_from([8000, 11025, 16000, 22050, 44100, 48000]),
       st.lists(st.binary(max_size=3000), max_size=6))
def test_live_pcm_messages(rate: int, messages: list[bytes]) -> None:
    resampler = PcmResampler(check_sample_rate(rate))
    for data in messages:
        try:
            samples = decode_pcm16(data)
        except BadRequest:
            assert len(data) % 2 == 1
            continue
        assert samples.dtype == np.float32 and samples.shape == (len(data) // 2,)
        assert np.all(samples >= -1.0) and np.all(samples < 1.0)
        assert np.isfinite(resampler.push(samples)).all()
    assert np.isfinite(resampler.drain()).all()


# ----------------------------------------------------------------------------- package manifests


@pytest.fixture(scope="module")
def valid_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid small package (the `make_package` writer), shared by the examples."""
    from lipsync.package import SourceMedia, write_package
    from tests.fixtures_packages import synthetic_package_arrays, untrained_weights

    folder = tmp_path_factory.mktemp("fuzz") / "pkg"
    arrays = synthetic_package_arrays(n_frames=4)
    n, h, w = arrays["frames"].shape[:3]
    write_package(
        folder, name="pkg", weights=untrained_weights(),
        source=SourceMedia(video="v", audio="a", video_fps=25.0, video_frames=n, video_width=w,
                           video_height=h, audio_sample_rate=16000),
        **arrays,
    )
    return folder


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path into a JSON value."""
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


def _set(doc: Any, path: tuple[Any, ...], value: Any, delete: bool) -> Any:
    if not path:
        return value
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return doc


@st.composite
def manifest_mutations(draw: st.DrawFn, original: str) -> bytes:
    """The valid manifest with a value replaced or a key removed (JSON-level), or its text
    mutated byte-wise."""
    if draw(st.booleans()):
        return draw(mutated(st.just(original.encode())))
    doc = json.loads(original)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(doc)))
        delete = bool(path) and draw(st.booleans())
        doc = _set(doc, path, draw(json_values), delete)
    return json.dumps(doc).encode()


@pytest.mark.slow  # writes and loads hundreds of packages: ~30 s
def test_mutated_manifests_give_package_error(valid_package: Path, tmp_path: Path) -> None:
    """A mutated ``manifest.json`` (the data files intact) loads or raises `PackageError`."""
    original = (valid_package / MANIFEST_NAME).read_text()
    folder = tmp_path / "pkg"
    shutil.copytree(valid_package, folder)
    outcomes: dict[str, int] = {}

    @FUZZ
    @given(manifest_mutations(original))
    @example(b"[" * 100_000)  # nesting deeper than the JSON parser's recursion limit
    @example(b"\xff\xfe{}")
    @example(json.dumps({**json.loads(original), "feature_rows": 10**30}).encode())
    def check(text: bytes) -> None:
        (folder / MANIFEST_NAME).write_bytes(text)
        try:
            load_package(folder)
        except PackageError:
            outcomes["refused"] = outcomes.get("refused", 0) + 1
            return
        outcomes["loaded"] = outcomes.get("loaded", 0) + 1

    check()
    assert outcomes.get("refused", 0) > 0
