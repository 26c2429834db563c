"""Bounded per-client resources (issue 11, defects 3-5), on a real `GatewayServer` whose Triton
is the in-process fake (identity UNet):

- a WebSocket client that never reads: the gateway's memory stays bounded (a gateway in its own
  process, its RSS measured from ``/proc``), the client is closed with 1013 and a reason, and
  another client's stream is served throughout; a cap on WebSocket connections and an Origin
  check before the upgrade;
- gRPC: one client address cannot take every frame slot (another client still gets frames), a
  cap on concurrent calls, idle connections closed, max connection age with and without grace;
- work beside frame rendering (``GetVideoFrame`` JPEGs, ``GenerateBatchWithAudio``'s audio
  features) is capped and refused ``overloaded`` past the cap; a flood of it leaves another
  client's stream most of its frame rate.

Each test here fails on the gateway before these limits (the issue's defects 3, 4 and 5).
"""
from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import grpc
import numpy as np
import pytest
from numpy.typing import NDArray

from gateway.audio_features import CHUNK_BYTES
from gateway.server import GatewayServer
from gateway.ws_protocol import FrameReply, decode_reply, encode_request
from proto import lipsync_pb2 as pb
from proto import lipsync_pb2_grpc as pbg
from tests.fake_gateway import FakeGatewayProcess, fake_triton_for, serve_on_fake
from tests.fake_triton import FakeTriton
from tests.gateway_metrics import sample
from tests.good_clients import WsStreamingClient
from tests.raw_ws import OP_CLOSE, RawWebSocket, UpgradeRefused
from tests.waiting import until

T = TypeVar("T")
AVATAR = "synthetic"
MiB = 1024 * 1024


def noise_frames(height: int, width: int, n: int = 10) -> NDArray[np.uint8]:
    """Random frames: their JPEGs are about as large as a frame can make them."""
    return np.random.default_rng(0).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


def on_server(root: Path, body: Callable[[GatewayServer, FakeTriton], Awaitable[T]], **settings: Any) -> T:
    """Run ``body`` against a gateway serving ``root`` on the fake Triton (own event loop)."""
    return serve_on_fake(root, fake_triton_for(root), body, **settings)


def request(frame_id: int) -> pb.OptimizedInferenceRequest:
    return pb.OptimizedInferenceRequest(model_name=AVATAR, frame_id=frame_id)


# ----------------------------------------------------------------------------- WebSocket


@pytest.mark.slow  # 1,000 requests never read, RSS sampled: ~13 s
def test_websocket_client_that_never_reads_leaves_memory_bounded(make_package: Callable[..., Path]) -> None:
    """Defect 3: 1,000 requests from a client that never reads. Before: every reply was queued
    in the gateway (the frame's slot was given back before the send), ~200 KB each."""
    root = make_package(name=AVATAR, frames=noise_frames(288, 384)).parent
    with FakeGatewayProcess(root) as gateway:  # default limits
        host, port = "127.0.0.1", int(gateway.http_url.rsplit(":", 1)[1])
        good = WsStreamingClient(host, port, AVATAR)
        time.sleep(0.5)  # the good stream and the gateway warm
        gateway.reset_peak_rss()
        before = gateway.status("VmRSS")
        bad = RawWebSocket.connect(host, port, rcvbuf=16 * 1024)
        sent = 0
        with contextlib.suppress(ConnectionError):  # closed by the gateway (no longer expected here)
            for frame_id in range(1000):
                bad.send(encode_request(AVATAR, frame_id % 20))
                sent += 1
                time.sleep(0.005)  # about one frame's render: most requests are admitted
        deadline = time.monotonic() + 30
        while gateway.metric("lipsync_gateway_ws_connections") > 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        growth = gateway.status("VmHWM") - before
        connections = gateway.metric("lipsync_gateway_ws_connections")
        served_during = good.ok
        time.sleep(0.5)
        good.finish()
        bad.close()
        assert gateway.alive()
        slow_closes = gateway.metric("lipsync_gateway_ws_closed_slow_total")
    print(f"RSS growth {growth / MiB:.1f} MiB; good client {served_during} frames, errors {good.errors[:3]}")
    assert sent == 1000
    assert growth < 64 * MiB, f"gateway RSS grew {growth / MiB:.0f} MiB with a client that never reads"
    assert connections == 1 and slow_closes == 1, "the client that never reads is closed (1013)"
    assert not good.errors and good.ok > served_during > 0, "the other client's stream is served throughout"


async def closed_without_reading(server: GatewayServer, frames: int, reason: str) -> RawWebSocket:
    """A raw WebSocket client that asks for ``frames`` frames (within the connection's in-flight
    limit: none refused) and reads nothing, once the gateway has closed it for ``reason``."""
    ws = await asyncio.to_thread(RawWebSocket.connect, "127.0.0.1", server.http_port, rcvbuf=16 * 1024)
    for frame_id in range(frames):
        await asyncio.to_thread(ws.send, encode_request(AVATAR, frame_id))
    await until(
        lambda: sample(server, "lipsync_gateway_ws_closed_slow_total", reason=reason) == 1,
        f"the gateway to close the connection ({reason})",
        timeout_s=20,
    )
    return ws


def test_websocket_client_falling_behind_is_closed_with_1013_and_a_reason(
    make_package: Callable[..., Path],
) -> None:
    """Replies of 2 MB (720p noise) against a send budget of 1 MiB: the client asks for 4 frames
    without reading; once a reply does not fit, the connection is closed with 1013 and a reason,
    which the client reads after the replies sent before."""
    root = make_package(name=AVATAR, frames=noise_frames(720, 1280)).parent

    async def body(server: GatewayServer, fake: FakeTriton) -> None:
        ws = await closed_without_reading(server, 4, "send_buffer")
        frames = []
        while True:  # now read: the reply written before, then the close frame
            frame = await asyncio.to_thread(ws.read_frame)
            frames.append(frame)
            if frame.opcode == OP_CLOSE:
                break
        ws.close()
        close = frames[-1]
        assert close.close_code == 1013 and close.close_reason.startswith("client not reading: "), close
        replies = [decode_reply(f.payload) for f in frames[:-1]]
        # what the kernel's socket buffers took went out; the reply that did not fit did not
        assert 1 <= len(replies) < 4 and all(isinstance(r, FrameReply) for r in replies)

    on_server(root, body, ws_send_buffer_bytes=1 * MiB, ws_send_timeout_s=30.0)


def test_websocket_client_taking_no_reply_in_time_is_closed_with_1013(
    make_package: Callable[..., Path],
) -> None:
    """Replies of 2 MB (720p noise), more than the kernel's socket buffers and the transport take
    before it pauses, within a large send budget: a client that reads nothing is closed once a
    reply waits longer than ``ws_send_timeout_s`` (the timeout is armed whenever a write can
    pause the transport)."""
    root = make_package(name=AVATAR, frames=noise_frames(720, 1280)).parent

    async def body(server: GatewayServer, fake: FakeTriton) -> None:
        ws = await closed_without_reading(server, 6, "send_timeout")
        assert sample(server, "lipsync_gateway_ws_closed_slow_total", reason="send_buffer") == 0
        ws.close()

    on_server(root, body, ws_send_buffer_bytes=64 * MiB, ws_send_timeout_s=0.5)


def test_websocket_connection_cap_refuses_before_the_upgrade(make_package: Callable[..., Path]) -> None:
    root = make_package(name=AVATAR).parent

    async def body(server: GatewayServer, fake: FakeTriton) -> None:
        url = f"{server.http_url}/ws"
        async with aiohttp.ClientSession() as session:
            first = await session.ws_connect(url)
            second = await session.ws_connect(url)
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(url)
            assert refused.value.status == 503
            async with session.get(url, headers={"Upgrade": "websocket", "Connection": "Upgrade",
                                                 "Sec-WebSocket-Version": "13",
                                                 "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}) as resp:
                body_json = await resp.json()
            assert resp.status == 503 and body_json["error"] == "overloaded"
            assert "LIPSYNC_MAX_WS_CONNECTIONS" in body_json["message"]
            await second.close()
            await until(lambda: sample(server, "lipsync_gateway_ws_connections") == 1,
                        "the closed connection's slot back", timeout_s=20)
            third = await session.ws_connect(url)  # room again
            await third.send_bytes(encode_request(AVATAR, 1))
            assert isinstance(decode_reply((await third.receive(timeout=10)).data), FrameReply)
            await third.close()
            await first.close()
        assert sample(server, "lipsync_gateway_ws_refused_total", reason="connections") == 2

    on_server(root, body, max_ws_connections=2)


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        (None, True),  # not a browser
        ("http://127.0.0.1:{port}", True),  # the gateway's own page
        ("HTTP://127.0.0.1:{port}/", True),
        ("https://app.example", True),  # LIPSYNC_WS_ALLOWED_ORIGINS
        ("http://evil.example", False),
        ("http://127.0.0.1:1", False),  # another port is another origin
        ("null", False),  # a sandboxed page or file://
    ],
)
def test_websocket_origin_check(make_package: Callable[..., Path], origin: str | None, allowed: bool) -> None:
    root = make_package(name=AVATAR).parent

    async def body(server: GatewayServer, fake: FakeTriton) -> None:
        sent = None if origin is None else origin.format(port=server.http_port)
        if allowed:
            ws = await asyncio.to_thread(RawWebSocket.connect, "127.0.0.1", server.http_port, origin=sent)
            await asyncio.to_thread(ws.send, encode_request(AVATAR, 2))
            assert isinstance(decode_reply((await asyncio.to_thread(ws.read_frame)).payload), FrameReply)
            ws.close()
        else:
            with pytest.raises(UpgradeRefused) as refused:
                await asyncio.to_thread(RawWebSocket.connect, "127.0.0.1", server.http_port, origin=sent)
            assert refused.value.status == 403 and b'"origin_not_allowed"' in refused.value.body
            assert sample(server, "lipsync_gateway_ws_refused_total", reason="origin") == 1

    on_server(root, body, ws_allowed_origins=["https://app.example"])


# ----------------------------------------------------------------------------- gRPC


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback(), reason="needs IPv6 loopback for a second client address")
def test_grpc_one_client_cannot_take_every_slot(make_package: Callable[..., Path]) -> None:
    """Defect 4: 64 concurrent GenerateInference calls from one address took every global slot
    (64) and any other client got ``overloaded``. The second client here connects over IPv6
    loopback, so its address differs."""
    root = make_package(name=AVATAR).parent

    async def body(server: GatewayServer, fake: FakeTriton) -> None:
        assert server.ctx is not None
        fake.hold_inference = asyncio.Event()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as greedy_channel, \
                grpc.aio.insecure_channel(f"[::1]:{server.grpc_port}") as other_channel:
            greedy = pbg.OptimizedLipSyncServiceStub(greedy_channel)
            other = pbg.OptimizedLipSyncServiceStub(other_channel)
            calls = [asyncio.ensure_future(greedy.GenerateInference(
                request(i % 20))) for i in range(64)]
            admission = server.ctx.pipeline.admission  # frames, however Triton calls coalesce them
            await until(lambda: sum(c.done() for c in calls) + admission.in_flight >= 64,
                        "the greedy client's calls to be taken or refused", timeout_s=20)
            in_flight = admission.in_flight
            mine = asyncio.ensure_future(other.GenerateInference(
                request(3)))
            stream = other.StreamInference(iter(
                [request(i) for i in (5, 6, 7)]))
            stream_answers = asyncio.ensure_future(_collect(stream))
            await until(  # the other client's frames in flight (or answered at once)
                lambda: admission.in_flight >= in_flight + 2 or (mine.done() and stream_answers.done()),
                "the other client's frames",
                timeout_s=20,
            )
            fake.hold_inference.set()
            answer = await mine
            streamed = await stream_answers
            greedy_answers = await asyncio.gather(*calls)
        assert answer.success, f"another client got {answer.error!r}"
        assert [r.success for r in streamed] == [True] * 3 and [r.frame_id for r in streamed] == [5, 6, 7]
        refused = [r for r in greedy_answers if not r.success]
        assert in_flight == 32 and len(refused) == 32, "one address holds at most max_in_flight_per_peer"
        assert all(r.error.startswith("overloaded: your address already has 32 frames") for r in refused)
        assert sample(server, "lipsync_gateway_limit_refusals_total", limit="peer") == 32

    on_server(root, body, host="::")


async def _collect(stream: Any) -> list[Any]:
    return [r async for r in stream]


def test_grpc_concurrent_calls_are_capped(make_package: Callable[..., Path]) -> None:
    root = make_package(name=AVATAR).parent

    async def body(server: GatewayServer, fake: FakeTriton) -> None:
        assert server.ctx is not None
        fake.hold_inference = asyncio.Event()
        async with grpc.aio.insecure_channel(server.grpc_address) as channel:
            stub = pbg.OptimizedLipSyncServiceStub(channel)
            calls = [asyncio.ensure_future(stub.GenerateInference(
                request(i))) for i in range(6)]
            admission = server.ctx.pipeline.admission  # frames, however Triton calls coalesce them
            await until(lambda: admission.in_flight + sum(c.done() for c in calls) >= 6,
                        "the 6 calls to be admitted or refused", timeout_s=20)
            fake.hold_inference.set()
            results = await asyncio.gather(*calls, return_exceptions=True)
        codes = sorted(r.code().name if isinstance(r, grpc.aio.AioRpcError) else "OK" for r in results)
        assert codes == ["OK"] * 4 + ["RESOURCE_EXHAUSTED"] * 2

    on_server(root, body, grpc_max_concurrent_rpcs=4)


def test_grpc_idle_connection_is_closed(make_package: Callable[..., Path]) -> None:
    root = make_package(name=AVATAR).parent

    async def body(server: GatewayServer, fake: FakeTriton) -> None:
        async with grpc.aio.insecure_channel(server.grpc_address) as channel:
            stub = pbg.OptimizedLipSyncServiceStub(channel)
            assert (await stub.GenerateInference(request(1))).success
            assert channel.get_state() == grpc.ChannelConnectivity.READY
            await until(lambda: channel.get_state() != grpc.ChannelConnectivity.READY,
                        "the server to close the idle connection", timeout_s=10)
            # a new call reconnects
            assert (await stub.GenerateInference(request(2))).success

    on_server(root, body, grpc_max_connection_idle_s=0.5)


@pytest.mark.slow  # waits out real connection ages: ~2.5 s per case
@pytest.mark.parametrize("grace_s", [None, 0.5])
def test_grpc_max_connection_age_and_grace(make_package: Callable[..., Path], grace_s: float | None) -> None:
    """A stream open when its connection reaches the max age runs on (no grace: the default) or
    is ended after the grace."""
    root = make_package(name=AVATAR).parent

    async def body(server: GatewayServer, fake: FakeTriton) -> None:
        fake.hold_inference = asyncio.Event()
        async with grpc.aio.insecure_channel(server.grpc_address) as channel:
            stub = pbg.OptimizedLipSyncServiceStub(channel)
            stream = stub.StreamInference(iter([request(1)]))
            answers = asyncio.ensure_future(_collect(stream))
            await until(lambda: fake.count("infer") == 1, "the frame in flight", timeout_s=20)
            await asyncio.sleep(2.5)  # past age (0.5 s) + grace (0.5 s)
            fake.hold_inference.set()
            if grace_s is None:
                assert [r.success for r in await answers] == [True]
            else:
                with pytest.raises(grpc.aio.AioRpcError) as ended:
                    await answers
                assert ended.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                                              grpc.StatusCode.INTERNAL)

    on_server(root, body, grpc_max_connection_age_s=0.5, grpc_max_connection_age_grace_s=grace_s)


# ----------------------------------------------------------------------------- work beside rendering


def test_batch_audio_features_take_a_bounded_slot(make_package: Callable[..., Path]) -> None:
    """Defect 5: GenerateBatchWithAudio's mel + encoder ran with no slot at all."""
    root = make_package(name=AVATAR).parent
    chunks = [bytes(CHUNK_BYTES)] * 18

    async def body(server: GatewayServer, fake: FakeTriton) -> None:
        fake.hold_inference = asyncio.Event()  # holds the audio encoder's calls
        async with grpc.aio.insecure_channel(server.grpc_address) as channel:
            stub = pbg.OptimizedLipSyncServiceStub(channel)

            def call() -> Any:
                return stub.GenerateBatchWithAudio(pb.BatchInferenceWithAudioRequest(
                    model_name=AVATAR, start_frame_id=8, frame_count=3, audio_chunks=chunks))

            held = [asyncio.ensure_future(call()) for _ in range(2)]
            await until(lambda: fake.count("infer", "audio_encoder") >= 2, "2 encoder calls", timeout_s=20)
            refused = await call()
            fake.hold_inference.set()
            served = await asyncio.gather(*held)
        assert [r.success for r in refused.responses] == [False] * 3
        assert refused.responses[0].error.startswith("overloaded: GenerateBatchWithAudio's audio features: ")
        assert all(r.success for answer in served for r in answer.responses)
        assert sample(server, "lipsync_gateway_limit_refusals_total", limit="aux") == 1

    on_server(root, body, max_aux_in_flight=2)


@pytest.mark.slow  # two streams' rates measured over seconds of real time: ~7 s
def test_video_frame_flood_is_refused_and_streams_keep_their_rate(make_package: Callable[..., Path]) -> None:
    """Defect 5: a flood of GetVideoFrame (a full-frame JPEG each, in the composite pool's
    unbounded queue) starved every stream and nobody was told ``overloaded``. Measured side by
    side: a stream's frame rate alone and during a flood of 48 concurrent callers."""
    root = make_package(name=AVATAR, frames=noise_frames(360, 640)).parent

    async def body(server: GatewayServer, fake: FakeTriton) -> None:
        async with grpc.aio.insecure_channel(server.grpc_address) as channel:
            stub = pbg.OptimizedLipSyncServiceStub(channel)

            async def stream_rate(seconds: float) -> tuple[float, int]:
                done, errors, t0 = 0, 0, time.perf_counter()
                while time.perf_counter() - t0 < seconds:
                    r = await stub.GenerateInference(request(done % 20))
                    done += 1
                    errors += not r.success
                return done / (time.perf_counter() - t0), errors

            stop = asyncio.Event()
            answers: dict[str, int] = {"ok": 0, "overloaded": 0, "other": 0}

            async def flood() -> None:
                while not stop.is_set():
                    r = await stub.GetVideoFrame(pb.GetVideoFrameRequest(model_name=AVATAR, frame_id=1,
                                                                         video_type="full_body"))
                    refused = r.error.startswith("overloaded: ")
                    answers["ok" if r.success else "overloaded" if refused else "other"] += 1
                    if not r.success:
                        await asyncio.sleep(0.1)  # a client told to retry later

            await stream_rate(0.5)  # warm
            alone, _ = await stream_rate(3.0)
            flooders = [asyncio.ensure_future(flood()) for _ in range(48)]
            await asyncio.sleep(0.5)
            during, errors = await stream_rate(3.0)
            stop.set()
            await asyncio.gather(*flooders)
        print(f"stream alone {alone:.1f} fps, during the flood {during:.1f} fps; flood answers {answers}")
        assert errors == 0 and answers["other"] == 0
        assert answers["overloaded"] > 0 and answers["ok"] > 0, "the flood is served within its cap"
        # measured on a loaded 2-core machine: before, 5 % of its rate; with the limits 23-37 %
        assert during >= 0.15 * alone, f"the stream kept {during / alone:.0%} of its frame rate"

    # the stream's frames encoded whole, as the flood's are: with spliced JPEGs (issue 9) a
    # stream frame costs a fraction of a GetVideoFrame encode and the ratio compares unlike work
    on_server(root, body, jpeg_splice=False)
