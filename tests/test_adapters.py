"""The protocol adapters (gRPC service, WebSocket handler, HTTP routes, grpc.health) of a real
`GatewayServer` on loopback ports whose Triton is the in-process fake (identity UNet): each
decodes its wire format into one `FrameRequest`, errors keep their codes, outcomes are counted
once, and readiness is pushed to grpc.health and /readyz without polling."""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.audio_features import CHUNK_BYTES, WINDOW_CHUNK_BYTES
from gateway.server import GatewayServer
from gateway.ws_protocol import ErrorReply, FrameReply, decode_reply, encode_request
from proto import lipsync_pb2 as pb
from proto import lipsync_pb2_grpc as pbg
from tests.fake_gateway import SYNTHETIC_AVATAR, on_fake_server
from tests.fake_triton import FakeTriton
from tests.original_ws_client import OriginalClientFrame, parse_reply_as_original_client
from tests.reference_frames import identity_composite

AVATAR = SYNTHETIC_AVATAR



def requests_counted(server: GatewayServer, protocol: str) -> tuple[float, float]:
    assert server.ctx is not None
    value = server.ctx.metrics.registry.get_sample_value
    ok, error = (
        value("lipsync_gateway_requests_total", {"protocol": protocol, "outcome": o}) or 0.0
        for o in ("ok", "error")
    )
    return ok, error


async def ws_exchange(url: str, messages: list[bytes | str]) -> list[FrameReply | ErrorReply]:
    """Send each message and read its reply, one at a time, on one connection."""
    out = []
    async with aiohttp.ClientSession() as session, session.ws_connect(f"{url}/ws") as ws:
        for message in messages:
            await (ws.send_str(message) if isinstance(message, str) else ws.send_bytes(message))
            out.append(decode_reply((await ws.receive(timeout=10)).data))
    return out


def test_websocket_frames_and_errors(make_package: Callable[..., Path]) -> None:
    async def body(server: GatewayServer, fake: FakeTriton) -> None:
        assert server.ctx is not None
        avatar = server.ctx.store.get(AVATAR)
        m = avatar.feature_rows
        replies = await ws_exchange(server.http_url, [
            encode_request(AVATAR, 3),
            encode_request("nobody", 0),
            encode_request(AVATAR, m),
            encode_request(AVATAR, 1, bytes(1000)),
            b"\x01\x00",
            "hello",
            encode_request(AVATAR, 4, bytes(WINDOW_CHUNK_BYTES)),
            encode_request(AVATAR, 2, bytes(10 * CHUNK_BYTES)),
        ])
        ok = replies[0]
        assert isinstance(ok, FrameReply) and ok.frame_id == 3
        assert ok.jpeg == server.ctx.pipeline.encoder.encode(
            identity_composite(avatar.frames[3], avatar.rects[3])
        )
        assert ok.bounds == avatar.rect(3)
        codes = [(r.frame_id, r.code) for r in replies[1:6] if isinstance(r, ErrorReply)]
        assert codes == [(0, "unknown_avatar"), (m, "frame_out_of_range"), (1, "bad_request"),
                         (0, "bad_request"), (0, "bad_request")]
        assert isinstance(replies[6], FrameReply), "live audio renders"
        assert isinstance(replies[7], FrameReply), "start of a clip: the frame_id + 8 chunks since it began"
        assert requests_counted(server, "ws") == (3.0, 5.0)
        value = server.ctx.metrics.registry.get_sample_value
        assert value("lipsync_gateway_ws_messages_total", {"kind": "binary"}) == 7
        assert value("lipsync_gateway_ws_messages_total", {"kind": "text"}) == 1

    on_fake_server(make_package, body)


def test_root_websocket_speaks_the_original_format(make_package: Callable[..., Path]) -> None:
    """``ws://HOST:PORT/`` (issue 14): the original clients' replies, parsed as they parse them:
    the face patch (the crop rectangle's pixels of the composite) and its rectangle; their
    40 ms chunk at the browser's rate is ignored, a live-audio window is used; a plain GET /
    is still the page."""

    async def body(server: GatewayServer, fake: FakeTriton) -> None:
        assert server.ctx is not None
        avatar = server.ctx.store.get(AVATAR)
        browser_chunk = bytes(2 * 24_000 * 40 // 1000)  # 40 ms of 24 kHz int16 mono
        asks = [(3, b""), (4, browser_chunk), (2, bytes(10 * CHUNK_BYTES)), (5, bytes(WINDOW_CHUNK_BYTES))]
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{server.http_url}/") as resp:
                assert resp.status == 200 and "<canvas" in await resp.text()
            async with session.ws_connect(f"{server.http_url}/") as ws:
                replies = []
                for frame_id, audio in asks:
                    await ws.send_bytes(encode_request(AVATAR, frame_id, audio))
                    replies.append(parse_reply_as_original_client((await ws.receive(timeout=10)).data))
                await ws.send_bytes(encode_request("nobody", 1, browser_chunk))
                error = parse_reply_as_original_client((await ws.receive(timeout=10)).data)
        assert error == "unknown_avatar: avatar 'nobody' is not loaded (loaded: synthetic)"
        for (frame_id, _), reply in zip(asks, replies, strict=True):
            assert isinstance(reply, OriginalClientFrame) and reply.frame_id == frame_id
            v = avatar.video_index(frame_id)
            assert reply.bounds == avatar.rect(v)
            x1, y1, x2, y2 = avatar.rects[v]
            patch = identity_composite(avatar.frames[v], avatar.rects[v])[y1:y2, x1:x2]
            assert reply.jpeg == server.ctx.pipeline.encoder.encode(patch)
        # the browser's chunk was ignored; the two live-audio windows were used (a mel window a chunk)
        assert sum(len(x[0]) for model, x in fake.inputs if model == "audio_encoder") == 10 + 16
        assert requests_counted(server, "ws") == (4.0, 1.0)

    on_fake_server(make_package, body)


def test_websocket_connection_limit_answers_overloaded_at_once(make_package: Callable[..., Path]) -> None:
    async def body(server: GatewayServer, fake: FakeTriton) -> None:
        fake.hold_inference = asyncio.Event()
        async with aiohttp.ClientSession() as session, session.ws_connect(f"{server.http_url}/ws") as ws:
            await ws.send_bytes(encode_request(AVATAR, 1))
            await ws.send_bytes(encode_request(AVATAR, 2))
            refused = decode_reply((await ws.receive(timeout=10)).data)
            assert isinstance(refused, ErrorReply) and refused.frame_id == 2 and refused.code == "overloaded"
            fake.hold_inference.set()
            assert isinstance(decode_reply((await ws.receive(timeout=10)).data), FrameReply)
        assert requests_counted(server, "ws") == (1.0, 1.0)

    on_fake_server(make_package, body, max_in_flight_per_connection=1)


def test_grpc_frames_batches_with_audio_and_stream(make_package: Callable[..., Path]) -> None:
    async def body(server: GatewayServer, fake: FakeTriton) -> None:
        async with grpc.aio.insecure_channel(server.grpc_address) as channel:
            stub = pbg.OptimizedLipSyncServiceStub(channel)
            r = await stub.GenerateInference(pb.OptimizedInferenceRequest(model_name=AVATAR, frame_id=2))
            assert (
                r.success and r.frame_id == 2 and r.model_name == AVATAR and r.prediction_shape == "48x64x3"
            )
            bad = await stub.GenerateInference(pb.OptimizedInferenceRequest(model_name="nobody", frame_id=2))
            assert not bad.success and bad.error.startswith("unknown_avatar: ")

            chunks = [bytes(CHUNK_BYTES)] * 18
            r = await stub.GenerateBatchWithAudio(pb.BatchInferenceWithAudioRequest(
                model_name=AVATAR, start_frame_id=5, frame_count=3, audio_chunks=chunks))
            assert [x.frame_id for x in r.responses] == [5, 6, 7] and all(x.success for x in r.responses)
            encoded = [len(x[0]) for model, x in fake.inputs if model == "audio_encoder"]
            assert sum(encoded) == 15, "features computed once: one mel window per chunk used (5 + 3 + 7)"
            r = await stub.GenerateBatchWithAudio(pb.BatchInferenceWithAudioRequest(
                model_name=AVATAR, start_frame_id=2, frame_count=3, audio_chunks=chunks[:11]))
            assert [x.success for x in r.responses] == [False] * 3
            expected = "expected 12 audio chunks for start_frame_id=2, frame_count=3: 2 past"
            assert expected in r.responses[0].error
            r = await stub.GenerateBatchWithAudio(pb.BatchInferenceWithAudioRequest(
                model_name=AVATAR, start_frame_id=-1, frame_count=1, audio_chunks=chunks[:16]))
            assert (
                r.responses[0].error.startswith("frame_out_of_range: frame_id -1")
                and "valid: >= 0" in r.responses[0].error
            )

            ids = [4, 1, 9, 0]
            stream = stub.StreamInference(
                iter(pb.OptimizedInferenceRequest(model_name=AVATAR, frame_id=i) for i in ids)
            )
            assert [x.frame_id async for x in stream] == ids
        # 1 + 3 + 4 frames rendered; 1 frame and 2 batches refused, each counted once
        assert requests_counted(server, "grpc") == (8.0, 3.0)

    on_fake_server(make_package, body)


def test_readiness_is_pushed_to_grpc_health_and_readyz(make_package: Callable[..., Path]) -> None:
    async def body(server: GatewayServer, fake: FakeTriton) -> None:
        assert server.ctx is not None
        lifecycle = server.ctx.lifecycle

        async def health() -> int:
            answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            return int(answer.status)

        async def readyz() -> tuple[int, Any]:
            async with aiohttp.ClientSession() as session, session.get(f"{server.http_url}/readyz") as resp:
                return resp.status, await resp.json()

        async with grpc.aio.insecure_channel(server.grpc_address) as channel:
            assert await health() == health_pb2.HealthCheckResponse.SERVING
            status, ready = await readyz()
            assert status == 200 and ready["triton"]["server"] == "live"
            assert ready["triton"]["model_states"] == {"lipsync_synthetic": "ready", "audio_encoder": "ready"}

            fake.mode = "refused"
            await lifecycle.probe_once()  # the periodic probe is off: only this can tell
            for _ in range(100):
                if await health() == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                await asyncio.sleep(0)
            assert await health() == health_pb2.HealthCheckResponse.NOT_SERVING
            status, body_down = await readyz()
            assert (
                status == 503
                and body_down["triton"]["server"] == "down"
                and not body_down["triton"]["server_ready"]
            )
            assert "Triton at fake-triton:8001 is not ready" in body_down["reason"]
            assert server.ctx.metrics.registry.get_sample_value("lipsync_gateway_triton_ready") == 0.0

            fake.restart()
            await lifecycle.probe_once()
            await lifecycle.wait_loading()
            for _ in range(100):
                if await health() == health_pb2.HealthCheckResponse.SERVING:
                    break
                await asyncio.sleep(0)
            assert await health() == health_pb2.HealthCheckResponse.SERVING
            assert (await readyz())[0] == 200

    on_fake_server(make_package, body)


@pytest.mark.parametrize(("path", "status"), [("3.jpg", 200), ("x.jpg", 400), ("99999.jpg", 400)])
def test_http_frame_route(make_package: Callable[..., Path], path: str, status: int) -> None:
    async def body(server: GatewayServer, fake: FakeTriton) -> tuple[int, dict[str, str], bytes]:
        async with aiohttp.ClientSession() as session, session.get(
            f"{server.http_url}/api/avatars/{AVATAR}/frames/{path}"
        ) as resp:
            return resp.status, dict(resp.headers), await resp.read()

    got, headers, _ = on_fake_server(make_package, body)
    assert got == status
    if status == 200:
        assert headers["Content-Type"] == "image/jpeg" and headers["X-Bounds"] == "20,12,44,36"
