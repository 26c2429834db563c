"""Malformed client input (issue 16): a real `GatewayServer` on loopback ports (Triton is the
in-process fake) flooded with input that does not decode, over gRPC (every method of every
service the server serves, found by reflection), the WebSocket and HTTP. Each caller gets a
precise client error, the log grows by a few lines per peer instead of a traceback per message,
every message is counted in /metrics, and a well-behaved client is served throughout."""
from __future__ import annotations

import asyncio
import itertools
import logging
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import grpc
import numpy as np
import pytest

from gateway.malformed import RateLimitedLog, peer_host
from gateway.server import GatewayServer
from gateway.ws_protocol import FrameReply, decode_reply, encode_request
from proto import lipsync_pb2 as pb
from proto import lipsync_pb2_grpc as pbg
from tests.fake_gateway import fake_settings
from tests.fake_triton import fake_triton
from tests.fixtures_gateway import ADMIN_METADATA, ADMIN_TOKEN
from tests.undecodable import UNDECODABLE, assert_undecodable, send_undecodable, served_methods

AVATAR = "synthetic"
MESSAGES = 500
LOG_LINES_MAX = 50

# ----------------------------------------------------------------------------- the log
class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rate_limited_log_one_line_per_key_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    limited = RateLimitedLog(logging.getLogger("test.limited"), 10.0, clock=clock, max_keys=2)
    with caplog.at_level(logging.WARNING, "test.limited"):
        assert limited.warning("a", "first a")
        assert not limited.warning("a", "second a")
        assert limited.warning("b", "first b")
        clock.now += 9.9
        assert not limited.warning("a", "third a")
        clock.now += 0.2
        assert limited.warning("a", "fourth a")
        assert limited.warning("c", "first c")  # 3 keys: b, the least recent, is forgotten
        assert limited.warning("b", "b again")
    assert [r.getMessage() for r in caplog.records] == [
        "first a", "first b", "fourth a (2 more since 10 s ago not logged)", "first c", "b again",
    ]
    with pytest.raises(ValueError, match="interval_s must be > 0"):
        RateLimitedLog(logging.getLogger("x"), 0)


def test_peer_host_drops_the_port() -> None:
    assert peer_host("ipv4:10.0.0.2:5123") == "ipv4:10.0.0.2"
    assert peer_host("ipv6:[::1]:5123") == "ipv6:[::1]"
    assert peer_host("127.0.0.1") == "127.0.0.1"
    assert peer_host("unix:/tmp/sock") == "unix:/tmp/sock"


# ----------------------------------------------------------------------------- a live server
def run_on_server(make_package: Callable[..., Path], body: Callable[[GatewayServer], object]) -> None:
    frames = np.random.default_rng(0).integers(0, 256, (10, 48, 64, 3), dtype=np.uint8)
    root = make_package(name=AVATAR, frames=frames).parent
    fake = fake_triton(f"lipsync_{AVATAR}", loaded=("audio_encoder",))

    async def run() -> None:
        settings = fake_settings(root, fake, admin_token=ADMIN_TOKEN)  # admin methods decode too
        server = GatewayServer(settings, grace_s=0.5, triton_client=fake)
        await server.start()
        try:
            await body(server)  # type: ignore[misc]
        finally:
            await server.stop()

    asyncio.run(run())


def malformed_count(server: GatewayServer, protocol: str) -> float:
    assert server.ctx is not None
    families = server.ctx.metrics.registry.collect()
    return sum(
        s.value for f in families if f.name == "lipsync_gateway_malformed_requests"
        for s in f.samples if s.name.endswith("_total") and s.labels["protocol"] == protocol
    )


def test_undecodable_grpc_messages_get_invalid_argument_on_every_method(
    make_package: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    """The issue's test: 500 undecodable messages over unary and streaming methods of every
    service (seed, health, reflection, and any added later that reflection lists)."""

    async def body(server: GatewayServer) -> None:
        async with grpc.aio.insecure_channel(server.grpc_address) as channel:
            methods = await served_methods(channel)
            services = {m.split("/")[1] for m, *_ in methods}
            assert {"optimized_lipsyncsrv.OptimizedLipSyncService", "grpc.health.v1.Health",
                    "grpc.reflection.v1alpha.ServerReflection"} <= services
            assert {(c, s) for _, c, s, _ in methods} >= {(False, False), (False, True), (True, True)}
            assert_undecodable(methods)

            # a well-behaved client streams frames the whole time
            flood_done = asyncio.Event()
            served: list[bool] = []

            async def well_behaved() -> None:
                def requests() -> Iterator[pb.OptimizedInferenceRequest]:
                    for i in itertools.count():
                        if flood_done.is_set() and i >= 20:
                            return
                        yield pb.OptimizedInferenceRequest(model_name=AVATAR, frame_id=i % 20)

                async with grpc.aio.insecure_channel(server.grpc_address) as good:
                    stub = pbg.OptimizedLipSyncServiceStub(good)
                    async for answer in stub.StreamInference(requests()):
                        served.append(answer.success)

            client = asyncio.create_task(well_behaved())
            lines_before = caplog.text.count("\n")
            sem = asyncio.Semaphore(16)

            async def one(k: int) -> tuple[str, bool, tuple[int, grpc.StatusCode, str]]:
                method, client_streaming, server_streaming, _ = methods[k % len(methods)]
                good_first = "StreamInference" in method and k % 3 == 0  # answers, then the status
                async with sem:
                    bad = UNDECODABLE[k % len(UNDECODABLE)]
                    got = await send_undecodable(channel, method, client_streaming, server_streaming,
                                                 bad, good_first, ADMIN_METADATA)
                return method, good_first, got

            results = await asyncio.gather(*(one(k) for k in range(MESSAGES)))
            flood_done.set()
            await asyncio.wait_for(client, 60)
            log_lines = caplog.text.count("\n") - lines_before

        for method, good_first, (answers, code, details) in results:
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, code, details)
            assert details.startswith(f"{method}: the request message does not decode"), details
            assert answers == (1 if good_first else 0), (method, answers)
        assert any(good_first for _, good_first, _ in results), "a stream answered before its bad message"
        print(f"{MESSAGES} undecodable messages over {len(methods)} methods: the log grew by "
              f"{log_lines} lines; {len(served)} frames served meanwhile")
        assert log_lines < LOG_LINES_MAX, caplog.text
        assert "Traceback" not in caplog.text
        assert malformed_count(server, "grpc") == MESSAGES
        assert len(served) >= 20 and all(served), "the well-behaved client was served throughout"

    with caplog.at_level(logging.INFO):
        run_on_server(make_package, body)


def test_malformed_websocket_and_http_input_is_counted_and_logged_once_per_peer(
    make_package: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    async def body(server: GatewayServer) -> None:
        host, port = "127.0.0.1", server.http_port
        lines_before = caplog.text.count("\n")
        async with aiohttp.ClientSession() as session:
            for path in ("/ws", "/"):
                async with session.ws_connect(f"{server.http_url}{path}") as ws:
                    for k in range(40):
                        await ws.send_bytes(struct.pack("<I", 1000 + k) + b"x")  # name_len past the end
                        await ws.send_str("hello")
                    for _ in range(80):
                        assert decode_reply((await ws.receive(timeout=10)).data).code == "bad_request"  # type: ignore[union-attr]
                    answer = await ws_ask(ws, encode_request(AVATAR, 1))
                    assert isinstance(decode_reply(answer.data), FrameReply), "the connection still serves"
            async with session.ws_connect(f"{server.http_url}/live") as ws:
                for _ in range(10):
                    await ws.send_str("not json")  # refused, the session goes on
                await ws.send_str('{"type": "end"}')
                async for _ in ws:
                    pass
            for _ in range(30):
                async with session.get(f"{server.http_url}/api/avatars/{AVATAR}/frames/x.jpg") as resp:
                    assert resp.status == 400 and (await resp.json())["error"] == "bad_request"
                async with session.get(f"{server.http_url}/ws") as resp:  # not an upgrade
                    assert resp.status == 400
            async with session.get(f"{server.http_url}/live") as resp:
                assert resp.status == 400
        tls_hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"  # a TLS client on the HTTP port
        bad_header = b"GET / HTTP/1.1\r\nBad Header\r\n\r\n"
        for garbage in (tls_hello, bad_header) * 10:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(garbage)
            await writer.drain()
            assert (await reader.read(64)).startswith(b"HTTP/1.")
            writer.close()
        log_lines = caplog.text.count("\n") - lines_before
        assert malformed_count(server, "ws") == 2 * 80 + 30 + 10 + 1
        assert malformed_count(server, "http") == 30 + 20
        assert server.ctx is not None
        value = server.ctx.metrics.registry.get_sample_value
        assert value("lipsync_gateway_malformed_requests_total",
                     {"protocol": "http", "method": "/api/avatars/{name}/frames/{frame_id}.jpg"}) == 30
        assert value("lipsync_gateway_malformed_requests_total",
                     {"protocol": "http", "method": "(unparsed request)"}) == 20
        assert value("lipsync_gateway_malformed_requests_total", {"protocol": "ws", "method": "/"}) == 80
        assert value("lipsync_gateway_malformed_requests_total", {"protocol": "ws", "method": "/live"}) == 11
        malformed_lines = [r for r in caplog.records if r.name == "gateway.malformed"]
        assert len(malformed_lines) == 1, [r.getMessage() for r in malformed_lines]  # one peer, one interval
        assert "Traceback" not in caplog.text and log_lines < LOG_LINES_MAX, caplog.text

    with caplog.at_level(logging.INFO):
        run_on_server(make_package, body)


async def ws_ask(ws: aiohttp.ClientWebSocketResponse, payload: bytes) -> aiohttp.WSMessage:
    await ws.send_bytes(payload)
    return await ws.receive(timeout=10)
