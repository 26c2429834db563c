"""Live-session clients (gRPC ``lipsync.live.v1.LiveLipSync/Stream`` and WebSocket ``/live``)
that play a `Script` of audio and commands in real time and record every frame with its
arrival time. Used by `perf.live_load`, the live tests and `examples/live_client.py`'s test.

A script is a list of steps run in order after ``start``: `Audio` (PCM sent in chunks of
``chunk_ms``, paced at real time against one schedule, so sending never drifts; or all at
once with ``paced=False``: a TTS burst), `Pause` (send nothing), `Command` (``flush`` /
``interrupt``). The end of the script is the end of input (gRPC half-close, WebSocket
``end``); the client then reads until the server closes the session.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
import grpc

from gateway.live.types import SessionNotice, SlotFrame
from gateway.live_ws_protocol import decode_output
from proto import live_pb2 as pb
from proto import live_pb2_grpc as pbg

Transport = Literal["grpc", "ws"]


@dataclass(frozen=True)
class Audio:
    """16-bit LE mono PCM at the session's rate; paced in real time unless ``paced=False``."""

    pcm: bytes
    paced: bool = True


@dataclass(frozen=True)
class Pause:
    """Send nothing for ``seconds``."""

    seconds: float


@dataclass(frozen=True)
class Command:
    """``flush`` or ``interrupt``."""

    command: Literal["flush", "interrupt"]


Step = Audio | Pause | Command


@dataclass(frozen=True)
class Received:
    """One frame as the client got it: the frame (``audio_at`` None) and its arrival
    (``time.monotonic()``, s)."""

    frame: SlotFrame
    at: float


@dataclass
class SessionRecord:
    """What one session saw.

    Attributes:
        frames: every frame, in arrival order.
        notices: errors before start (no slot), in order.
        started_at: when ``start`` was sent (monotonic s).
        pcm_sent: ``(time sent, samples sent so far including this chunk)`` per PCM message.
        commands_at: when each command was sent, by name (the last one).
        ended_at: when the input was ended (monotonic s).
        closed_at: when the server closed the session (monotonic s).
        error: a transport failure ("" when none).
    """

    frames: list[Received] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    started_at: float = 0.0
    pcm_sent: list[tuple[float, int]] = field(default_factory=list)
    commands_at: dict[str, float] = field(default_factory=dict)
    ended_at: float = 0.0
    closed_at: float = 0.0
    error: str = ""

    @property
    def slots(self) -> list[SlotFrame]:
        """The frames, in arrival order."""
        return [r.frame for r in self.frames]


async def _play(
    script: Sequence[Step], sample_rate_hz: int, chunk_ms: float, record: SessionRecord,
    send_pcm: Callable[[bytes], Awaitable[object]], send_command: Callable[[str], Awaitable[object]],
) -> None:
    """Run the script through ``send_pcm`` / ``send_command`` (awaitables), pacing audio."""
    chunk_bytes = max(2, int(sample_rate_hz * chunk_ms / 1000) * 2)
    samples = 0
    schedule = time.monotonic()  # when the next paced byte is due
    for step in script:
        if isinstance(step, Pause):
            schedule = max(schedule, time.monotonic()) + step.seconds
            await asyncio.sleep(max(0.0, schedule - time.monotonic()))
        elif isinstance(step, Command):
            record.commands_at[step.command] = time.monotonic()
            await send_command(step.command)
        elif not step.paced:
            await send_pcm(step.pcm)
            samples += len(step.pcm) // 2
            record.pcm_sent.append((time.monotonic(), samples))
            schedule = time.monotonic()
        else:
            schedule = max(schedule, time.monotonic())
            for i in range(0, len(step.pcm), chunk_bytes):
                piece = step.pcm[i : i + chunk_bytes]
                await asyncio.sleep(max(0.0, schedule - time.monotonic()))
                await send_pcm(piece)
                samples += len(piece) // 2
                record.pcm_sent.append((time.monotonic(), samples))
                schedule += len(piece) / 2 / sample_rate_hz


def _keep(record: SessionRecord, item: SlotFrame | SessionNotice) -> None:
    if isinstance(item, SessionNotice):
        record.notices.append(item.error)
    else:
        record.frames.append(Received(item, time.monotonic()))


def frame_from_proto(message: pb.LiveFrame) -> SlotFrame | SessionNotice:
    """A ``LiveFrame`` as the gateway's `SlotFrame` (or `SessionNotice`: one without a JPEG)."""
    from gateway.live.types import RenderedFrame

    if not message.jpeg:
        return SessionNotice(message.error)
    x1, y1, x2, y2 = message.bounds
    return SlotFrame(
        seq=message.seq, pts_s=message.pts_s, frame=RenderedFrame(message.jpeg, (x1, y1, x2, y2)),
        speaking=message.speaking, video_frame=message.video_frame, error=message.error,
        late=message.late, audio_at=None,
    )


async def run_grpc(
    address: str, avatar: str, sample_rate_hz: int, script: Sequence[Step], *,
    chunk_ms: float = 20.0, timeout_s: float = 300.0, start: bool = True,
) -> SessionRecord:
    """One session over gRPC at ``address`` (``host:port``); see the module doc.

    ``start=False`` sends no ``start`` (to test a session that never starts).
    """
    record = SessionRecord()
    queue: asyncio.Queue[pb.LiveRequest | None] = asyncio.Queue()

    async def requests() -> AsyncIterator[pb.LiveRequest]:
        while (item := await queue.get()) is not None:
            yield item

    async def send_pcm(data: bytes) -> None:
        queue.put_nowait(pb.LiveRequest(pcm=data))

    async def send_command(command: str) -> None:
        value = pb.LiveControl.FLUSH if command == "flush" else pb.LiveControl.INTERRUPT
        queue.put_nowait(pb.LiveRequest(control=pb.LiveControl(command=value)))

    async with grpc.aio.insecure_channel(
        address, options=[("grpc.max_receive_message_length", 64 << 20)]
    ) as channel:
        call = pbg.LiveLipSyncStub(channel).Stream(requests(), timeout=timeout_s)
        record.started_at = time.monotonic()
        if start:
            queue.put_nowait(pb.LiveRequest(start=pb.LiveStart(avatar=avatar, sample_rate_hz=sample_rate_hz)))

        async def writer() -> None:
            await _play(script, sample_rate_hz, chunk_ms, record, send_pcm, send_command)
            record.ended_at = time.monotonic()
            queue.put_nowait(None)

        task = asyncio.create_task(writer())
        try:
            async for message in call:
                _keep(record, frame_from_proto(message))
            record.closed_at = time.monotonic()
        except grpc.aio.AioRpcError as exc:
            record.error = f"{exc.code().name}: {exc.details()}"
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    return record


async def run_ws(
    url: str, avatar: str, sample_rate_hz: int, script: Sequence[Step], *,
    chunk_ms: float = 20.0, timeout_s: float = 300.0, start: bool = True,
    first: Sequence[bytes | str] = (),
) -> SessionRecord:
    """One session over the WebSocket at ``url`` (``http://host:port``, ``/live`` appended).

    ``first``: raw messages sent before ``start`` (to test errors before start).
    """
    record = SessionRecord()
    ws_url = url.replace("http://", "ws://").rstrip("/") + "/live"
    async with aiohttp.ClientSession() as http, http.ws_connect(ws_url, max_msg_size=64 << 20) as ws:
        async def send(message: bytes | str) -> None:
            await (ws.send_str(message) if isinstance(message, str) else ws.send_bytes(message))

        async def send_command(command: str) -> None:
            await ws.send_str(json.dumps({"type": command}))

        async def writer() -> None:
            for message in first:
                await send(message)
            if start:
                await ws.send_str(
                    json.dumps({"type": "start", "avatar": avatar, "sample_rate_hz": sample_rate_hz})
                )
            await _play(script, sample_rate_hz, chunk_ms, record, ws.send_bytes, send_command)
            record.ended_at = time.monotonic()
            await ws.send_str(json.dumps({"type": "end"}))

        record.started_at = time.monotonic()
        task = asyncio.create_task(writer())
        try:
            async with asyncio.timeout(timeout_s):
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        _keep(record, decode_output(msg.data))
                    elif msg.type in (aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSED):
                        break
            record.closed_at = time.monotonic()
            if ws.close_code not in (None, 1000):
                record.error = f"closed with {ws.close_code}"
        except TimeoutError:
            record.error = f"no end within {timeout_s} s"
        finally:
            if not task.done():
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    return record


async def run_session(
    transport: Transport,
    address: str,
    avatar: str,
    sample_rate_hz: int,
    script: Sequence[Step],
    **kwargs: Any,
) -> SessionRecord:
    """`run_grpc` (``address`` = ``host:port``) or `run_ws` (``address`` = ``http://host:port``)."""
    if transport == "grpc":
        return await run_grpc(address, avatar, sample_rate_hz, script, **kwargs)
    return await run_ws(address, avatar, sample_rate_hz, script, **kwargs)
