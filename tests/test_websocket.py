"""The binary WebSocket protocol end to end: a real gateway (`served_gateway`: one process, then
two workers) against the real CPU tritonserver and the demo avatar. Every bad request gets a
clear error reply, and a valid request afterwards still succeeds (on the same connection, or on
a new one when the server had to close it)."""
from __future__ import annotations

import asyncio
import json
import struct
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import aiohttp
import numpy as np
import pytest
from numpy.typing import NDArray

from gateway.audio_features import WINDOW_CHUNK_BYTES
from gateway.http_app import TRANSPORT_CAP_FACTOR
from gateway.ws_protocol import (
    U32_MAX,
    ErrorReply,
    FrameReply,
    decode_reply,
    encode_request,
)
from lipsync.audio import float_to_pcm16, load_wav_16k_mono
from lipsync.frames import pingpong_index
from lipsync.paths import MODEL_REPOSITORY_CPU, SPEECH_DIR
from tests.gateway_metrics import scrape
from tests.original_ws_client import OriginalClientFrame, draw_into_rectangle, parse_reply_as_original_client
from tests.reference_frames import decode_jpeg, psnr

pytestmark = pytest.mark.triton

T = TypeVar("T")
REPLY_TIMEOUT_S = 30.0


def run(fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run an async test body on a fresh event loop (the gateway has its own loop/thread)."""
    return asyncio.run(fn())


@asynccontextmanager
async def connect(http_url: str, **kwargs: Any) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    """A WebSocket to the gateway's ``/ws`` (client side accepts big replies)."""
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{http_url}/ws", max_msg_size=64 * 2**20, **kwargs) as ws,
    ):
        yield ws


async def receive_reply(ws: aiohttp.ClientWebSocketResponse) -> FrameReply | ErrorReply:
    msg = await ws.receive(timeout=REPLY_TIMEOUT_S)
    assert msg.type == aiohttp.WSMsgType.BINARY, f"expected a binary reply, got {msg.type} {msg.data!r}"
    return decode_reply(msg.data)


async def ask(ws: aiohttp.ClientWebSocketResponse, payload: bytes) -> FrameReply | ErrorReply:
    await ws.send_bytes(payload)
    return await receive_reply(ws)


def outside_mask(shape: tuple[int, ...], rect: NDArray[np.int32], margin: int) -> NDArray[np.bool_]:
    """True outside the rectangle grown by ``margin`` px (away from JPEG blocks it touches)."""
    x1, y1, x2, y2 = (int(v) for v in rect)
    mask = np.ones(shape[:2], dtype=bool)
    mask[max(0, y1 - margin) : y2 + margin, max(0, x1 - margin) : x2 + margin] = False
    return mask


def assert_valid_frame(reply: FrameReply | ErrorReply, frame_id: int, demo_package: Any) -> NDArray[np.uint8]:
    assert isinstance(reply, FrameReply), f"expected a frame, got error {reply}"
    assert reply.frame_id == frame_id
    image = decode_jpeg(reply.jpeg)
    frames = demo_package.frames
    assert image.shape == frames.shape[1:], "the reply is the full frame at the package's size"
    v = pingpong_index(frame_id, frames.shape[0])
    assert reply.bounds == tuple(float(x) for x in demo_package.rects[v])
    return image


@pytest.fixture(scope="module")
def url(served_gateway: Any) -> str:
    return served_gateway.http_url


def test_valid_frame_returns_the_composited_full_frame(url: str, demo_package: Any) -> None:
    rows = demo_package.features.shape[0]
    frame_id = min(37, rows - 1)

    async def body() -> FrameReply | ErrorReply:
        async with connect(url) as ws:
            return await ask(ws, encode_request("demo", frame_id))

    reply = run(body)
    image = assert_valid_frame(reply, frame_id, demo_package)
    v = pingpong_index(frame_id, demo_package.frames.shape[0])
    mask = outside_mask(image.shape, demo_package.rects[v], margin=8)
    # Outside the crop rectangle the frame is the package's frame (only JPEG q95 loss).
    assert psnr(image[mask], demo_package.frames[v][mask]) >= 35.0
    assert isinstance(reply, FrameReply) and reply.processing_ms < 60_000


def test_original_clients_on_the_root_path_composite_the_face_patch(url: str, demo_package: Any) -> None:
    """Issue 14: a client of the original system on ``ws://HOST:PORT/`` (no path), parsing the
    replies as it does, with and without its 40 ms 24 kHz chunk: each JPEG drawn into its
    rectangle over the avatar's frame is the full frame ``/ws`` answers for that frame id."""
    import soxr

    speech = load_wav_16k_mono(sorted(SPEECH_DIR.glob("*.wav"))[0])[16_000:32_000]
    at_24k = soxr.resample(speech, 16_000, 24_000)
    chunk_24k = float_to_pcm16(at_24k[:960]).astype("<i2").tobytes()  # 40 ms at 24 kHz
    assert len(chunk_24k) == 1920
    frame_ids = [0, 7, 23, 40, 41]

    async def body() -> tuple[list[Any], list[FrameReply | ErrorReply]]:
        ws_url = f"{url.replace('http', 'ws', 1)}/"
        async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=2**26) as ws:
            root = []
            for k, frame_id in enumerate(frame_ids):
                await ws.send_bytes(encode_request("demo", frame_id, chunk_24k if k % 2 else b""))
                msg = await ws.receive(timeout=REPLY_TIMEOUT_S)
                assert msg.type == aiohttp.WSMsgType.BINARY
                root.append(parse_reply_as_original_client(msg.data))
        async with connect(url) as ws:
            full = [await ask(ws, encode_request("demo", frame_id)) for frame_id in frame_ids]
        return root, full

    root, full = run(body)
    for frame_id, reply, whole in zip(frame_ids, root, full, strict=True):
        assert isinstance(reply, OriginalClientFrame), reply
        assert reply.frame_id == frame_id
        v = pingpong_index(frame_id, demo_package.frames.shape[0])
        assert reply.bounds == tuple(float(x) for x in demo_package.rects[v]), "the crop rectangle"
        patch = decode_jpeg(reply.jpeg)
        x1, y1, x2, y2 = (int(x) for x in demo_package.rects[v])
        assert patch.shape == (y2 - y1, x2 - x1, 3), "the face patch has the rectangle's size"
        drawn = draw_into_rectangle(demo_package.frames[v], patch, reply.bounds)
        expected = assert_valid_frame(whole, frame_id, demo_package)
        mad = float(np.abs(drawn.astype(np.int16) - expected.astype(np.int16)).mean())
        inside = psnr(drawn[y1:y2, x1:x2], expected[y1:y2, x1:x2])
        print(f"frame {frame_id}: mean absolute difference {mad:.2f} grey levels, rectangle {inside:.1f} dB")
        assert mad < 3.0, (frame_id, mad)
        assert inside >= 30.0, (frame_id, inside)  # two JPEGs of the same pixels, nothing shifted


def test_concurrent_requests_on_one_connection_are_all_answered(url: str, demo_package: Any) -> None:
    ids = [0, 5, 10, 15, 20, 25]

    async def body() -> list[FrameReply | ErrorReply]:
        async with connect(url) as ws:
            for i in ids:  # all sent before any reply is read: processed concurrently
                await ws.send_bytes(encode_request("demo", i))
            return [await receive_reply(ws) for _ in ids]

    replies = run(body)
    assert sorted(r.frame_id for r in replies) == ids
    for reply in replies:
        assert_valid_frame(reply, reply.frame_id, demo_package)


def _bad_requests(rows: int) -> list[tuple[str, bytes, str, str]]:
    """(case, payload, expected code, expected text in the message)."""
    demo = b"demo"
    silence = b"\0" * WINDOW_CHUNK_BYTES
    return [
        ("unknown avatar", encode_request("nobody", 0),
         "unknown_avatar", "'nobody' is not loaded"),
        ("frame == rows", encode_request("demo", rows),
         "frame_out_of_range", f"valid: 0..{rows - 1}"),
        ("frame 0xFFFFFFFF (-1 as u32)", encode_request("demo", U32_MAX),
         "frame_out_of_range", str(U32_MAX)),
        ("empty message", b"",
         "bad_request", "message truncated: 0 bytes"),
        ("truncated name", struct.pack("<I", 40) + demo + b"\0" * 8,
         "bad_request", "name_len=40 but only 12 bytes follow"),
        ("audio_len past the end", struct.pack("<I", 4) + demo + struct.pack("<II", 1, 500) + b"x" * 10,
         "bad_request", "audio_len=500 but only 10 bytes follow"),
        ("trailing bytes", encode_request("demo", 1) + b"zz",
         "bad_request", "2 unexpected trailing bytes"),
        ("huge name_len", struct.pack("<I", 10**6) + b"x" * 16,
         "bad_request", "exceeds the limit of 256 bytes"),
        ("live audio of a wrong length", encode_request("demo", 1, b"\0" * 1000),
         "bad_request", f"live audio for frame_id=1 must be {WINDOW_CHUNK_BYTES} bytes"),
        ("live audio, unknown avatar", encode_request("nobody", 1, silence),
         "unknown_avatar", "'nobody' is not loaded"),
    ]


def test_bad_requests_get_clear_errors_and_the_connection_keeps_serving(
    url: str, demo_package: Any
) -> None:
    rows = demo_package.features.shape[0]
    cases = _bad_requests(rows)

    async def body() -> list[tuple[str, FrameReply | ErrorReply, FrameReply | ErrorReply]]:
        out = []
        async with connect(url) as ws:
            for case, payload, _, _ in cases:
                bad = await ask(ws, payload)
                good = await ask(ws, encode_request("demo", 3))
                out.append((case, bad, good))
            # text messages are not part of the protocol
            await ws.send_str("hello")
            out.append(("text message", await receive_reply(ws), await ask(ws, encode_request("demo", 4))))
        return out

    results = run(body)
    expected = {case: (code, text) for case, _, code, text in cases}
    expected["text message"] = ("bad_request", "text messages are not part of the protocol")
    for case, bad, good in results:
        code, text = expected[case]
        assert isinstance(bad, ErrorReply), f"{case}: expected an error reply, got a frame"
        assert bad.code == code, f"{case}: {bad.message}"
        assert text in bad.message, f"{case}: {bad.message}"
        assert isinstance(good, FrameReply), f"after {case}: {good}"
    # the frame_id of a readable request is echoed in its error reply
    by_case = {case: bad for case, bad, _ in results}
    assert by_case["frame == rows"].frame_id == rows
    assert by_case["frame 0xFFFFFFFF (-1 as u32)"].frame_id == U32_MAX


def too_big_count(http_url: str) -> float:
    """The gateway's count of messages over the transport cap (connection closed)."""
    return scrape(http_url).get(("lipsync_gateway_ws_messages_total", (("kind", "too_big"),)), 0.0)


def test_oversized_messages(url: str, served_gateway: Any) -> None:
    limit = served_gateway.settings.ws_max_message_bytes
    too_big_before = too_big_count(url)

    async def body() -> tuple[Any, ...]:
        async with connect(url) as ws:
            # Over the limit but under the transport cap: error reply, connection stays.
            over = await ask(ws, encode_request("demo", 2, b"\0" * limit))
            after = await ask(ws, encode_request("demo", 2))
        async with connect(url) as ws:
            # Over the transport cap: aiohttp refuses to buffer it and closes the connection
            # with 1009 (message too big), possibly while the client is still sending.
            try:
                await ws.send_bytes(b"\0" * (limit * TRANSPORT_CAP_FACTOR + 1))
                closed = await ws.receive(timeout=REPLY_TIMEOUT_S)
            except ConnectionError:
                closed = None
            close_code = ws.close_code
        async with connect(url) as ws:  # a new connection serves normally
            fresh = await ask(ws, encode_request("demo", 2))
        return over, after, closed, close_code, fresh

    over, after, closed, close_code, fresh = run(body)
    assert isinstance(over, ErrorReply) and over.code == "bad_request"
    assert f"message of {limit + 12 + 4} bytes exceeds the limit of {limit} bytes" in over.message
    assert isinstance(after, FrameReply)
    if closed is not None:  # the close frame arrived before the connection dropped
        assert closed.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
        assert close_code in (None, aiohttp.WSCloseCode.MESSAGE_TOO_BIG), close_code
    assert too_big_count(url) == too_big_before + 1, "the server closed it as too big"
    assert isinstance(fresh, FrameReply)


def test_per_connection_limit_answers_overloaded_at_once(url: str, served_gateway: Any) -> None:
    limit = served_gateway.settings.max_in_flight_per_connection
    n = limit + 4

    async def body() -> tuple[list[FrameReply | ErrorReply], FrameReply | ErrorReply]:
        async with connect(url) as ws:
            for i in range(n):
                await ws.send_bytes(encode_request("demo", i))
            replies = [await receive_reply(ws) for _ in range(n)]
            return replies, await ask(ws, encode_request("demo", 1))

    replies, after = run(body)
    overloaded = [r for r in replies if isinstance(r, ErrorReply)]
    frames = [r for r in replies if isinstance(r, FrameReply)]
    assert len(frames) >= limit, [str(r) for r in overloaded]
    assert overloaded, "more than the limit in flight must be refused, not queued"
    for r in overloaded:
        assert r.code == "overloaded" and f"limit {limit}" in r.message
    # Refusals come back before the frames they overtook (no queueing behind Triton).
    first_frame = next(i for i, r in enumerate(replies) if isinstance(r, FrameReply))
    assert any(i < first_frame for i, r in enumerate(replies) if isinstance(r, ErrorReply))
    assert isinstance(after, FrameReply)


def test_live_audio_changes_the_mouth_region(url: str, demo_package: Any) -> None:
    wavs = sorted(SPEECH_DIR.glob("*.wav"))
    assert wavs, f"no speech in {SPEECH_DIR}"
    speech = load_wav_16k_mono(wavs[0])
    samples = WINDOW_CHUNK_BYTES // 2
    window = speech[16000 : 16000 + samples]  # 0.64 s of real speech from 1 s in
    assert window.size == samples
    speech_pcm = float_to_pcm16(window).astype("<i2").tobytes()
    silence_pcm = b"\0" * WINDOW_CHUNK_BYTES
    frame_id = 6

    async def body() -> list[FrameReply | ErrorReply]:
        async with connect(url) as ws:
            return [
                await ask(ws, encode_request("demo", frame_id, speech_pcm)),
                await ask(ws, encode_request("demo", frame_id, silence_pcm)),
                await ask(ws, encode_request("demo", frame_id, speech_pcm)),
            ]

    with_speech, with_silence, again = run(body)
    a = assert_valid_frame(with_speech, frame_id, demo_package)
    b = assert_valid_frame(with_silence, frame_id, demo_package)
    c = assert_valid_frame(again, frame_id, demo_package)
    v = pingpong_index(frame_id, demo_package.frames.shape[0])
    x1, y1, x2, y2 = (int(x) for x in demo_package.rects[v])
    inside = (slice(y1, y2), slice(x1, x2))
    diff_inside = np.abs(a[inside].astype(int) - b[inside].astype(int)).mean()
    assert diff_inside > 5.0, "speech and silence must give different mouth regions"
    assert np.array_equal(a, c), "the same audio gives the same frame"
    mask = outside_mask(a.shape, demo_package.rects[v], margin=8)
    assert psnr(a[mask], b[mask]) >= 45.0, "outside the crop the audio changes nothing"


def test_triton_killed_then_restarted_websocket_and_readyz(
    start_triton: Any, start_gateway: Any, gateway_packages_root: Any
) -> None:
    """A dead Triton: WebSocket callers get ``triton_unavailable`` within seconds on the same
    connection, /readyz says 503 with the reason; after a restart the same connection renders
    again, without restarting the gateway."""
    triton = start_triton(MODEL_REPOSITORY_CPU, model_control_mode="explicit", load_models=("lipsync_demo",))
    gw = start_gateway(triton.grpc_url, gateway_packages_root)

    def readyz() -> tuple[int, dict[str, Any]]:
        try:
            with urllib.request.urlopen(f"{gw.http_url}/readyz", timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    async def body() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with connect(gw.http_url) as ws:
            out["before"] = await ask(ws, encode_request("demo", 1))
            triton.kill()
            t0 = time.monotonic()
            out["dead"] = await ask(ws, encode_request("demo", 2))
            out["dead_s"] = time.monotonic() - t0
            await asyncio.sleep(1.5)  # the model lifecycle probes Triton every 0.5 s
            out["readyz_dead"] = await asyncio.to_thread(readyz)
            await asyncio.to_thread(triton.start, 180.0)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and (await asyncio.to_thread(readyz))[0] != 200:
                await asyncio.sleep(0.5)
            out["readyz_back"] = await asyncio.to_thread(readyz)
            out["after"] = await ask(ws, encode_request("demo", 3))
        return out

    out = run(body)
    assert isinstance(out["before"], FrameReply)
    dead = out["dead"]
    assert isinstance(dead, ErrorReply) and dead.code == "triton_unavailable", dead
    assert out["dead_s"] < 3.0, f"error took {out['dead_s']:.1f} s"
    status, body_dead = out["readyz_dead"]
    assert status == 503 and body_dead["ready"] is False and "Triton" in body_dead["reason"]
    assert out["readyz_back"][0] == 200
    assert isinstance(out["after"], FrameReply), out["after"]


def test_stopping_the_gateway_closes_open_websockets_at_once(
    triton_server: Any, start_gateway: Any, gateway_packages_root: Any
) -> None:
    """A page left open does not hold the gateway's shutdown: the connection is closed with
    1001 (going away) and `stop` returns in well under aiohttp's 60 s handler timeout."""
    gw = start_gateway(triton_server.grpc_url, gateway_packages_root)

    async def body() -> tuple[Any, float, int | None]:
        async with connect(gw.http_url) as ws:
            first = await ask(ws, encode_request("demo", 1))
            # like a browser, keep reading (answers pings and the close handshake)
            reader = asyncio.create_task(ws.receive(timeout=REPLY_TIMEOUT_S))
            t0 = time.monotonic()
            await asyncio.to_thread(gw.call, gw.server.stop, 30.0)
            elapsed = time.monotonic() - t0
            msg = await reader
            assert msg.type == aiohttp.WSMsgType.CLOSE, msg
            return first, elapsed, msg.data

    first, elapsed, code = run(body)
    assert isinstance(first, FrameReply)
    assert elapsed < 10.0, f"stop took {elapsed:.1f} s with a WebSocket open"
    assert code == 1001
