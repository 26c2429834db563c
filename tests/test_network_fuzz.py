"""Network fuzz test (issue 11): 10,000 random and mutated messages to a running gateway while
well-behaved clients stream.

The gateway is the fast tier's (the in-process fake Triton, `tests.fake_gateway`) in a process
of its own on 127.0.0.1. The fuzzers send from 127.0.0.1:

- gRPC (5,000 calls): to every method of every service the gateway serves (the seed service,
  admin, live sessions, health, reflection; with the admin token, which allows every call),
  each request random bytes, a valid request, or a valid one mutated (bytes flipped, cut,
  inserted, truncated, extended); streaming methods get 1-3 such messages;
- WebSocket (5,000 messages) on ``/ws`` and ``/live``: random bytes, valid and mutated frame
  requests, random and JSON-ish text, messages over the size limits, and whole frames with a
  broken WebSocket header (bad opcodes, reserved bits, unmasked, lengths that lie).

The well-behaved clients stream one frame at a time: a WebSocket client from 127.0.0.2 (another
client address: the WebSocket refuses a frame at once when its client's per-peer slots of
`gateway.limits` are full, and the fuzzers' address may fill its own), a gRPC
``StreamInference`` from 127.0.0.1 beside the fuzzers (a stream waits for a slot instead).
Asserted: the gateway never crashes and still serves a fresh client afterwards; the
well-behaved clients get every frame they ask for, no error; every fuzz message gets the answer
its protocol gives malformed input (an in-band error, ``INVALID_ARGUMENT`` for a message that
does not decode (issue 16), a WebSocket error reply or a protocol close), never a hang; the
gateway's RSS grows by less than 64 MiB; its log has no traceback and stays short (malformed
input is logged once per peer and interval). Bounded in time (well under 2 minutes) and
loopback only.
"""
from __future__ import annotations

import asyncio
import json
import random
import struct
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import aiohttp
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from gateway.audio_features import CHUNK_BYTES
from gateway.ws_protocol import decode_reply, encode_request
from proto import lipsync_pb2 as pb
from proto import live_pb2
from tests.fake_gateway import FakeGatewayProcess
from tests.fixtures_gateway import bearer
from tests.good_clients import GrpcStreamingClient, WsStreamingClient
from tests.raw_ws import OP_BINARY, OP_CLOSE, OP_TEXT, RawWebSocket, frame

AVATAR = "synthetic"
GRPC_MESSAGES = 5_000
WS_MESSAGES = 5_000
MiB = 1024 * 1024
DEADLINE_S = 5.0
"""Per gRPC fuzz call (a hang would end here as DEADLINE_EXCEEDED, which is not allowed)."""
WATCH = "/grpc.health.v1.Health/Watch"
WATCH_DEADLINE_S = 0.5
"""A Watch whose random bytes decode (an empty message does) streams until its deadline."""

SEED = "/optimized_lipsyncsrv.OptimizedLipSyncService/"
VALID: dict[str, Callable[[random.Random], bytes]] = {
    SEED + "GenerateInference": lambda r: pb.OptimizedInferenceRequest(
        model_name=r.choice([AVATAR, "nobody", ""]), frame_id=r.randint(-5, 30)).SerializeToString(),
    SEED + "GenerateBatchInference": lambda r: pb.BatchInferenceRequest(
        model_name=AVATAR, frame_ids=[r.randint(-2, 25) for _ in range(r.randint(0, 6))]).SerializeToString(),
    SEED + "GenerateBatchWithAudio": lambda r: pb.BatchInferenceWithAudioRequest(
        model_name=AVATAR, start_frame_id=r.randint(0, 12), frame_count=r.randint(0, 3),
        audio_chunks=[bytes(CHUNK_BYTES)] * r.randint(0, 20)).SerializeToString(),
    SEED + "GetStats": lambda r: pb.StatsRequest(model_name=r.choice([AVATAR, "x", ""])).SerializeToString(),
    SEED + "ListModels": lambda r: pb.ListModelsRequest().SerializeToString(),
    SEED + "HealthCheck": lambda r: pb.HealthRequest().SerializeToString(),
    SEED + "GetVideoFrame": lambda r: pb.GetVideoFrameRequest(
        model_name=AVATAR, frame_id=r.randint(-1, 25),
        video_type=r.choice(["full_body", "face_regions", "masked_regions", "x"])).SerializeToString(),
    SEED + "GetModelMetadata": lambda r: pb.GetModelMetadataRequest(model_name=AVATAR).SerializeToString(),
    "/grpc.health.v1.Health/Check": lambda r: health_pb2.HealthCheckRequest(
        service=r.choice(["", "x"])).SerializeToString(),
}
STREAMS: dict[str, Callable[[random.Random], bytes]] = {
    SEED + "StreamInference": VALID[SEED + "GenerateInference"],
    "/lipsync.live.v1.LiveLipSync/Stream": lambda r: r.choice([
        live_pb2.LiveRequest(start=live_pb2.LiveStart(avatar=AVATAR, sample_rate_hz=r.choice([16000, 7]))),
        live_pb2.LiveRequest(pcm=bytes(r.randint(0, 3) * 321)),
        live_pb2.LiveRequest(control=live_pb2.LiveControl(command=cast(Any, r.randint(0, 3)))),  # 3: unknown
    ]).SerializeToString(),
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": lambda r: b"\x3a\x00",  # list_services
}
ADMIN = "/optimized_lipsyncsrv.OptimizedLipSyncAdmin/"
ADMIN_TOKEN = "fuzz-admin-token-7c1d9e2f"
"""The fuzzed gateway's ``LIPSYNC_ADMIN_TOKEN``, sent on every gRPC call so that admin methods
are decoded too (it allows every call; without it they are refused before decoding)."""
RANDOM_ONLY = (SEED + "LoadPackage", ADMIN + "LoadPackage", ADMIN + "UnloadPackage", WATCH)
"""Methods sent random bytes only: a valid LoadPackage / UnloadPackage would load or unload
avatars (admin calls), a valid Watch streams until its deadline."""
AUTH = bearer(ADMIN_TOKEN)

CLIENT_RACE = "Internal error from Core"
"""What the gRPC client library reports (as INTERNAL) when it is still writing a stream's next
message after the server ended the call for the previous one: the server's status is lost."""
GRPC_ANSWERS = {
    grpc.StatusCode.OK,  # decoded: answered in-band
    grpc.StatusCode.INVALID_ARGUMENT,  # undecodable (issue 16: `gateway.grpc_decode_guard`)
    grpc.StatusCode.NOT_FOUND,  # GetStats of an unknown avatar, health of an unknown service
    grpc.StatusCode.DEADLINE_EXCEEDED,  # a health Watch (WATCH_DEADLINE_S)
    grpc.StatusCode.RESOURCE_EXHAUSTED,  # grpc_max_concurrent_rpcs
}


def _as_is(data: bytes) -> bytes:
    return data


RAW: dict[str, Callable[[bytes], bytes]] = {"request_serializer": _as_is, "response_deserializer": _as_is}
"""Requests and answers as bytes, unparsed."""


def mutate(rng: random.Random, data: bytes) -> bytes:
    """``data`` with 1-4 edits: a bit flipped, bytes cut or inserted, truncated or extended."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        at = rng.randint(0, max(0, len(out) - 1))
        op = rng.randrange(5)
        if op == 0 and out:
            out[at] ^= 1 << rng.randrange(8)
        elif op == 1:
            del out[at : at + rng.randint(1, 8)]
        elif op == 2:
            out[at:at] = rng.randbytes(rng.randint(1, 8))
        elif op == 3:
            del out[at:]
        else:
            out += rng.randbytes(rng.randint(1, 32))
    return bytes(out)


def grpc_message(rng: random.Random, valid: Callable[[random.Random], bytes] | None) -> bytes:
    kind = rng.randrange(3) if valid is not None else 0
    if kind == 0:
        return rng.randbytes(rng.choice([0, 1, 2, 5, 17, 64, 300, 2000]))
    assert valid is not None
    return valid(rng) if kind == 1 else mutate(rng, valid(rng))


async def fuzz_grpc(address: str, rng: random.Random, count: int, workers: int = 12) -> Counter[str]:
    """``count`` calls spread over every method (module doc); their status codes."""
    methods = [*VALID, *STREAMS, *RANDOM_ONLY]
    codes: Counter[str] = Counter()
    plan = [(rng.choice(methods), rng.getrandbits(32)) for _ in range(count)]

    async def call(channel: grpc.aio.Channel, method: str, seed: int) -> None:
        r = random.Random(seed)
        try:
            if method in STREAMS:
                messages = [grpc_message(r, STREAMS[method]) for _ in range(r.randint(1, 3))]
                stream = channel.stream_stream(method, **RAW)(
                    iter(messages), timeout=DEADLINE_S, metadata=AUTH
                )
                async for _ in stream:
                    pass
            elif method == WATCH:
                watch = channel.unary_stream(method, **RAW)(
                    grpc_message(r, None), timeout=WATCH_DEADLINE_S, metadata=AUTH
                )
                async for _ in watch:
                    pass
            else:
                message = grpc_message(r, VALID.get(method))
                await channel.unary_unary(method, **RAW)(message, timeout=DEADLINE_S, metadata=AUTH)
            codes["OK"] += 1
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and method != WATCH:
                codes["HUNG " + method] += 1
            elif exc.code() in GRPC_ANSWERS or (method in STREAMS and exc.details() == CLIENT_RACE):
                codes[exc.code().name] += 1
            else:
                codes[f"{exc.code().name} {method}: {exc.details()}"[:300]] += 1

    async with grpc.aio.insecure_channel(address) as channel:
        queue = list(reversed(plan))

        async def worker() -> None:
            while queue:
                method, seed = queue.pop()
                await call(channel, method, seed)

        await asyncio.gather(*(worker() for _ in range(workers)))
    return codes


def ws_message(rng: random.Random) -> bytes | str:
    if rng.random() < 0.01:  # over ws_max_message_bytes (1 MiB): an error reply, the connection stays
        return bytes(1024 * 1024 + rng.randint(1, 1000))
    kind = rng.randrange(7)
    if kind == 0:
        return rng.randbytes(rng.choice([0, 1, 3, 4, 11, 12, 40, 500]))
    if kind == 1:
        return encode_request(AVATAR, rng.randint(0, 25))
    if kind in (2, 3):
        return mutate(rng, encode_request(rng.choice([AVATAR, "x" * rng.randint(1, 300)]), rng.randint(0, 40),
                                          rng.randbytes(rng.choice([0, 0, 20480]))))
    if kind == 4:
        return "".join(chr(rng.randint(1, 0x2FFF)) for _ in range(rng.randint(0, 50)))
    if kind == 5:
        message = {"type": rng.choice(["start", "flush", "end", 3]), "avatar": rng.choice([AVATAR, 1])}
        return json.dumps(message)
    return struct.pack("<I", rng.getrandbits(32)) + rng.randbytes(rng.randint(0, 64))


async def fuzz_ws(url: str, rng: random.Random, count: int, connections: int = 4) -> Counter[str]:
    """``count`` messages to ``/ws`` over a few connections, each answered before the next: one
    reply per message (an error reply for what is malformed), or a close for what aiohttp
    refuses outright; a closed connection is replaced."""
    outcomes: Counter[str] = Counter()
    per_connection = count // connections

    async def one_connection(seed: int) -> None:
        r = random.Random(seed)
        sent = 0
        async with aiohttp.ClientSession() as session:
            while sent < per_connection:
                async with session.ws_connect(f"{url}/ws", max_msg_size=0) as ws:
                    while sent < per_connection:
                        message = ws_message(r)
                        sent += 1
                        await (ws.send_str(message) if isinstance(message, str) else ws.send_bytes(message))
                        answer = await ws.receive(timeout=30)
                        if answer.type == aiohttp.WSMsgType.BINARY:
                            outcomes["reply_" + type(decode_reply(answer.data)).__name__] += 1
                        else:
                            outcomes[f"closed_{ws.close_code}"] += 1
                            break

    await asyncio.gather(*(one_connection(rng.getrandbits(32)) for _ in range(connections)))
    return outcomes


def broken_frames(rng: random.Random) -> bytes:
    """One WebSocket frame whose header breaks RFC 6455 (or a valid one, now and then)."""
    payload = rng.randbytes(rng.randint(0, 40))
    kind = rng.randrange(6)
    if kind == 0:
        return frame(payload, opcode=rng.choice([0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xF]))
    if kind == 1:  # reserved bits set
        data = bytearray(frame(payload))
        data[0] |= rng.choice([0x40, 0x20, 0x10])
        return bytes(data)
    if kind == 2:  # unmasked client frame
        return bytes([0x82, len(payload)]) + payload
    if kind == 3:  # a length that lies (a 64-bit length far beyond the bytes sent)
        return bytes([0x82, 0x80 | 127]) + struct.pack("!Q", rng.getrandbits(63)) + b"\x00" * 4 + payload
    if kind == 4:  # a control frame over 125 bytes, or fragmented
        if rng.random() < 0.5:
            return frame(rng.randbytes(200), opcode=0x9)
        return frame(payload, fin=False, opcode=0x9)
    return frame(payload, opcode=rng.choice([OP_BINARY, OP_TEXT]))


def fuzz_ws_frames(port: int, rng: random.Random, count: int) -> Counter[str]:
    """``count`` connections to ``/ws`` and ``/live``, each sent one broken frame: the gateway
    answers (an error reply) or closes the connection (1002, 1007, 1009 or a dropped socket)."""
    outcomes: Counter[str] = Counter()
    for _ in range(count):
        ws = RawWebSocket.connect("127.0.0.1", port, rng.choice(["/ws", "/live"]), timeout_s=10)
        try:
            ws.send_raw(broken_frames(rng))
            answer = ws.read_frame()
            closed = answer.opcode == OP_CLOSE
            outcomes[f"close_{answer.close_code}" if closed else f"opcode_{answer.opcode}"] += 1
        except (ConnectionError, TimeoutError) as exc:
            outcomes[type(exc).__name__] += 1
        finally:
            ws.close()
    return outcomes


@pytest.mark.slow  # 10,000 messages over real sockets: ~15 s
@pytest.mark.timeout(240)
def test_network_fuzz(make_package: Callable[..., Path], tmp_path: Path) -> None:
    frames = np.random.default_rng(0).integers(0, 256, (10, 48, 64, 3), dtype=np.uint8)
    root = make_package(name=AVATAR, frames=frames).parent
    rng = random.Random(20_251_101)
    started = time.monotonic()
    env = {"LIPSYNC_ADMIN_TOKEN": ADMIN_TOKEN}
    with FakeGatewayProcess(root, env, log_path=tmp_path / "gateway.log") as gateway:
        good = [GrpcStreamingClient(gateway.grpc_address, AVATAR),
                WsStreamingClient("127.0.0.1", gateway.http_port, AVATAR, source="127.0.0.2")]
        time.sleep(1.0)
        baseline = gateway.status("VmRSS")
        gateway.reset_peak_rss()

        async def fuzz() -> tuple[Counter[str], Counter[str], Counter[str]]:
            return await asyncio.wait_for(asyncio.gather(
                fuzz_grpc(gateway.grpc_address, random.Random(rng.getrandbits(32)), GRPC_MESSAGES),
                fuzz_ws(gateway.http_url, random.Random(rng.getrandbits(32)), WS_MESSAGES - 300),
                asyncio.to_thread(fuzz_ws_frames, gateway.http_port, random.Random(rng.getrandbits(32)), 300),
            ), timeout=180)

        grpc_codes, ws_outcomes, frame_outcomes = asyncio.run(fuzz())
        peak = gateway.status("VmHWM")
        assert gateway.alive(), "the gateway crashed"
        during = [client.ok for client in good]
        time.sleep(0.5)
        for client in good:
            client.finish()
        fresh = WsStreamingClient("127.0.0.1", gateway.http_port, AVATAR)
        time.sleep(0.5)
        fresh.finish()
    elapsed = time.monotonic() - started
    log = (tmp_path / "gateway.log").read_text()
    print(f"\nfuzzed in {elapsed:.0f} s: gRPC {dict(grpc_codes)}; WS {dict(ws_outcomes)}; frames "
          f"{dict(frame_outcomes)}; good clients {during} frames; RSS {baseline / MiB:.0f} MiB + "
          f"{(peak - baseline) / MiB:.1f} MiB peak; log {len(log) / 1024:.0f} KiB")
    assert sum(grpc_codes.values()) == GRPC_MESSAGES
    assert set(grpc_codes) <= {c.name for c in GRPC_ANSWERS} | {"INTERNAL"}, "each call answered as it should"
    assert sum(ws_outcomes.values()) == WS_MESSAGES - 300 and sum(frame_outcomes.values()) == 300
    assert set(ws_outcomes) <= {"reply_FrameReply", "reply_ErrorReply"}, "every message gets its reply"
    for client in good:
        assert not client.errors, f"a well-behaved client got errors: {client.errors[:3]}"
    assert all(n > 0 for n in during) and fresh.ok > 0 and not fresh.errors
    assert peak - baseline < 64 * MiB, f"RSS grew {(peak - baseline) / MiB:.0f} MiB"
    assert "Traceback" not in log and len(log.splitlines()) < 200, "one line per peer and interval"
