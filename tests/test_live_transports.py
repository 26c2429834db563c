"""Live sessions over both transports (gRPC ``lipsync.live.v1.LiveLipSync/Stream`` and the
WebSocket ``/live``) on a real `GatewayServer` whose Triton is the in-process fake (identity
UNet, slicing audio encoder): the slot stream, speaking frames through the pipeline and idle
frames from the cache without Triton, errors to the session that made them, metrics, health
and reflection. The same flows against the real tritonserver: `tests/test_live_triton.py`."""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gateway.live.session import LiveSession
from gateway.server import GatewayServer
from lipsync.contract import avatar_model_name
from lipsync.frames import pingpong_index
from perf.live_clients import Audio, Command, Pause, SessionRecord, Step, Transport, run_session
from tests.fake_gateway import SYNTHETIC_AVATAR, on_fake_server
from tests.fake_triton import FakeTriton
from tests.fixtures_live import speech_paths, speech_pcm16
from tests.gateway_metrics import sample

T = TypeVar("T")
AVATAR = SYNTHETIC_AVATAR
TRANSPORTS: list[Transport] = ["grpc", "ws"]


def on_server(
    make_package: Callable[..., Path],
    body: Callable[[GatewayServer, FakeTriton], Awaitable[T]],
    **settings: Any,
) -> T:
    return on_fake_server(make_package, body, unet_loaded=True, **settings)


def address(server: GatewayServer, transport: Transport) -> str:
    return server.grpc_address if transport == "grpc" else server.http_url


def speech(seconds: float) -> bytes:
    return speech_pcm16(speech_paths()[1])[: int(16000 * seconds)].astype("<i2").tobytes()


def check_slots(record: SessionRecord) -> None:
    seqs = [f.seq for f in record.slots]
    assert seqs == list(range(len(seqs))), "slots 0, 1, 2, ... without gaps, in order"
    for f in record.slots:
        assert f.pts_s == pytest.approx(f.seq * 0.04, abs=1e-9)
        assert f.video_frame == pingpong_index(f.seq, 10)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_speech_then_end_gives_every_slot_speaking_through_the_unet_idle_from_the_cache(
    make_package: Callable[..., Path], transport: Transport
) -> None:
    async def body(server: GatewayServer, fake: FakeTriton) -> None:
        assert server.ctx is not None
        unet = avatar_model_name(AVATAR)
        script: list[Step] = [Audio(speech(1.5)), Pause(0.5)]
        record = await run_session(transport, address(server, transport), AVATAR, 16000, script)
        assert not record.error and not record.notices
        check_slots(record)
        slots = record.slots
        speaking = [f for f in slots if f.speaking]
        assert len(slots) >= 50 and len(speaking) > 15 and not any(f.late or f.error for f in slots)
        assert not slots[0].speaking and not slots[-1].speaking
        unet_frames = sum(len(x[0]) for model, x in fake.inputs if model == unet)  # calls may be coalesced
        assert unet_frames == len(speaking), "one UNet frame per speaking slot, none per idle slot"
        avatar = server.ctx.store.get(AVATAR)
        for f in slots:
            assert f.frame.bounds == avatar.rect(f.video_frame)
            if not f.speaking:  # the avatar's own frame at the serving quality, byte for byte
                assert f.frame.jpeg == await server.ctx.pipeline.encode(avatar.frames[f.video_frame])
        assert server.ctx.live.idle.cached(AVATAR) == 10
        assert record.closed_at - record.ended_at < 2.0
        kinds = {k: sample(server, "lipsync_gateway_live_slots_total", transport=transport, kind=k)
                 for k in ("speaking", "idle", "late")}
        assert kinds == {"speaking": len(speaking), "idle": len(slots) - len(speaking), "late": 0}
        assert sample(server, "lipsync_gateway_requests_total", protocol="live", outcome="ok") == len(
            speaking
        )
        assert sample(server, "lipsync_gateway_live_first_frame_seconds_count") == 1
        assert sample(server, "lipsync_gateway_live_audio_to_frame_seconds_count", kind="speaking") == len(
            speaking
        )
        assert sample(server, "lipsync_gateway_live_sessions", transport=transport) == 0

    on_server(make_package, body)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_errors_reach_their_session_which_goes_on(
    make_package: Callable[..., Path], transport: Transport
) -> None:
    """Audio before start, an unknown avatar, a bad rate; then a good start, an odd byte count
    (and over gRPC a second start, a bad command, an empty request): each error reaches this
    session, whose slots stay unbroken, and a session beside it sees none."""
    async def body(server: GatewayServer, fake: FakeTriton) -> None:
        addr = address(server, transport)
        bad_then_good: list[Step] = [Pause(0.1), Audio(b"\x00\x01\x02", paced=False), Pause(0.2)]
        if transport == "ws":
            first: list[bytes | str] = [
                b"\x00\x00",
                json.dumps({"type": "start", "avatar": "nobody", "sample_rate_hz": 16000}),
                json.dumps({"type": "start", "avatar": AVATAR, "sample_rate_hz": 100}),
            ]
            record, good = await asyncio.gather(
                run_session("ws", addr, AVATAR, 16000, bad_then_good, first=first),
                run_session("ws", addr, AVATAR, 16000, [Audio(speech(1.0)), Pause(0.3)]),
            )
        else:
            record, good = await asyncio.gather(
                grpc_session_with_errors(addr),
                run_session("grpc", addr, AVATAR, 16000, [Audio(speech(1.0)), Pause(0.3)]),
            )
        assert not record.error, record.error
        # errors before start come as notices, or on slot 0 when the start was read before
        # the session wrote them
        errors = " ".join(record.notices + [f.error for f in record.slots])
        assert "unknown_avatar: avatar 'nobody' is not loaded" in errors
        assert "pcm refused: the session has not started" in errors
        assert "sample_rate_hz must be 8000..48000" in errors
        assert "3 bytes refused" in errors
        check_slots(record)
        check_slots(good)
        assert (
            not good.notices and not any(f.error for f in good.slots) and any(f.speaking for f in good.slots)
        )

    on_server(make_package, body)


async def grpc_session_with_errors(addr: str) -> SessionRecord:
    """Like the WebSocket case over gRPC: raw requests before and after start."""
    import time

    from perf.live_clients import _keep, frame_from_proto
    from proto import live_pb2 as pb
    from proto import live_pb2_grpc as pbg

    record = SessionRecord()
    requests = [
        pb.LiveRequest(pcm=b"\x00\x00"),
        pb.LiveRequest(start=pb.LiveStart(avatar="nobody", sample_rate_hz=16000)),
        pb.LiveRequest(start=pb.LiveStart(avatar=AVATAR, sample_rate_hz=100)),
        pb.LiveRequest(start=pb.LiveStart(avatar=AVATAR, sample_rate_hz=16000)),
        pb.LiveRequest(pcm=b"\x00\x01\x02"),
        pb.LiveRequest(start=pb.LiveStart(avatar=AVATAR, sample_rate_hz=16000)),
        pb.LiveRequest(control=pb.LiveControl(command=pb.LiveControl.COMMAND_UNSPECIFIED)),
        pb.LiveRequest(),
    ]

    async def gen() -> AsyncIterator[pb.LiveRequest]:
        for r in requests:
            yield r
        await asyncio.sleep(0.3)

    async with grpc.aio.insecure_channel(addr) as channel:
        async for message in pbg.LiveLipSyncStub(channel).Stream(gen(), timeout=30):
            _keep(record, frame_from_proto(message))
    record.closed_at = time.monotonic()
    errors = " ".join(f.error for f in record.slots)
    assert "start refused: the session has already started" in errors
    assert "LiveControl.command 0 refused" in errors and "empty LiveRequest" in errors
    return record


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_interrupt_makes_the_next_frame_idle(
    make_package: Callable[..., Path], transport: Transport, monkeypatch: pytest.MonkeyPatch
) -> None:
    read_at: list[int] = []
    original = LiveSession.interrupt

    def interrupt(self: LiveSession) -> None:
        read_at.append(self.sent)  # frames sent when the server read the interrupt
        original(self)

    monkeypatch.setattr(LiveSession, "interrupt", interrupt)

    async def body(server: GatewayServer, fake: FakeTriton) -> None:
        fake.hold_inference = asyncio.Event()  # speaking renders stay in flight

        async def release() -> None:
            await asyncio.sleep(1.4)
            assert fake.hold_inference is not None
            fake.hold_inference.set()

        releaser = asyncio.create_task(release())
        pcm = speech(2.0)
        script: list[Step] = [Audio(pcm[:32000]), Command("interrupt"), Pause(0.3)]
        record = await run_session(transport, address(server, transport), AVATAR, 16000, script)
        await releaser
        check_slots(record)
        assert len(read_at) == 1
        after = record.slots[read_at[0]:]
        assert after and not after[0].speaking and not after[0].late
        assert not any(f.speaking for f in after)

    on_server(make_package, body, live={"render_timeout_s": 5.0})


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_interrupt_behind_a_tts_burst_is_read_at_once(
    make_package: Callable[..., Path], transport: Transport, monkeypatch: pytest.MonkeyPatch
) -> None:
    """8 s of speech sent at once in 20 ms messages, `interrupt` 0.5 s later: the server reads
    it at once (it reads on while holding the audio beyond its margin; it used to read 20 ms
    per 20 ms played, so the interrupt came after the burst had nearly played, ~7 s), the next
    frame is idle, and the held speech is dropped: the session ends after ~2 s of slots, not
    8 s."""
    read_at: list[tuple[float, int]] = []  # when the server read the interrupt, frames sent then
    original = LiveSession.interrupt

    def interrupt(self: LiveSession) -> None:
        read_at.append((time.monotonic(), self.sent))
        original(self)

    monkeypatch.setattr(LiveSession, "interrupt", interrupt)
    burst = np.concatenate([speech_pcm16(p) for p in speech_paths()])[: 8 * 16000].astype("<i2").tobytes()

    async def body(server: GatewayServer, fake: FakeTriton) -> None:
        script: list[Step] = [Audio(burst[i : i + 640], paced=False) for i in range(0, len(burst), 640)]
        script += [Pause(0.5), Command("interrupt"), Pause(1.0)]
        record = await run_session(transport, address(server, transport), AVATAR, 16000, script)
        check_slots(record)
        assert len(read_at) == 1
        read, sent = read_at[0]
        assert read - record.commands_at["interrupt"] < 1.0
        assert any(f.speaking for f in record.slots[:sent])
        after = record.slots[sent:]
        assert after and not any(f.speaking or f.late for f in after)
        assert len(record.slots) < 25 * 3

    on_server(make_package, body)


def test_live_service_in_health_and_reflection(make_package: Callable[..., Path]) -> None:
    async def body(server: GatewayServer, fake: FakeTriton) -> None:
        async with grpc.aio.insecure_channel(server.grpc_address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            answer = await health.Check(health_pb2.HealthCheckRequest(service="lipsync.live.v1.LiveLipSync"))
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)

            async def ask() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
                yield reflection_pb2.ServerReflectionRequest(list_services="")

            async for reply in stub.ServerReflectionInfo(ask()):
                names = {s.name for s in reply.list_services_response.service}
                assert {
                    "lipsync.live.v1.LiveLipSync",
                    "optimized_lipsyncsrv.OptimizedLipSyncService",
                } <= names

    on_server(make_package, body)
