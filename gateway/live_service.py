"""`LiveSessions`: runs one live session per call for the transports, with metrics.

Both transports (gRPC ``lipsync.live.v1.LiveLipSync/Stream`` in `gateway.live_grpc`, WebSocket
``/live`` in `gateway.live_ws`) decode their messages into the `LiveInput` items below and hand
an async iterator of them to `LiveSessions.serve`, which yields what to send back: one
`SlotFrame` per slot, in order, and `SessionNotice` items for errors before the session has
started. The end of the input iterator is the end of input (gRPC half-close, WebSocket
``end`` or close).

Inside `serve` (one `gateway.live.session.LiveSession` per call):

- the **reader** task reads every message as it comes while the session holds less than
  `LiveSettings.max_held_s` of audio beyond its margin (`LiveSession.wait_accepts_audio`), so
  an `interrupt` behind a TTS burst is read, and takes effect, at once; past that a client
  that sends faster than real time is held back by the transport's own flow control (gRPC
  window, TCP);
- ``start`` resolves the avatar (`AvatarStore.get`; an unknown one is told to this session,
  which may start again) and gives the session an `AvatarRenderer`;
- a message the transport could not decode (`Refused`) is reported to this session: it comes
  back on the next frame (or as a notice before start), the session goes on;
- the **writer** is the caller iterating `serve`: frames as the session produces them.

Errors stay in their session: nothing here raises for a client's mistake, and a session's
failure ends only its own call.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

from gateway.errors import GatewayError
from gateway.live.clock import Clock, MonotonicClock
from gateway.live.session import LiveSession
from gateway.live.settings import LiveSettings
from gateway.live.timeline import State
from gateway.live.types import SessionNotice, SlotFrame
from gateway.live_render import AvatarRenderer, IdleFrames, TritonAudioEncoder
from gateway.metrics import GatewayMetrics
from gateway.pipeline import FramePipeline
from gateway.store import AvatarStore

log = logging.getLogger(__name__)

Transport = Literal["grpc", "ws"]
"""The ``transport`` label of the live metrics."""


@dataclass(frozen=True)
class Start:
    """``start``: the avatar name and the rate of the PCM to come (Hz)."""

    avatar: str
    sample_rate_hz: int


@dataclass(frozen=True)
class Pcm:
    """Audio: 16-bit little-endian mono PCM at the start's rate."""

    data: bytes


@dataclass(frozen=True)
class Control:
    """``flush`` (render what has arrived, silence pads the lookahead) or ``interrupt`` (drop
    audio not yet rendered; the next slot is idle)."""

    command: Literal["flush", "interrupt"]


@dataclass(frozen=True)
class Refused:
    """A message the transport could not decode: the error goes to this session."""

    error: GatewayError


LiveInput = Start | Pcm | Control | Refused
LiveOutput = SlotFrame | SessionNotice


def slot_kind(frame: SlotFrame) -> str:
    """``speaking``, ``late`` (a speaking slot sent idle) or ``idle``: the metrics' kind."""
    return "speaking" if frame.speaking else "late" if frame.late else "idle"


class LiveSessions:
    """The gateway's live sessions (module doc).

    Args:
        store: the loaded avatars.
        pipeline: renders speaking slots; its JPEG encoder makes the idle frames.
        encoder: the audio encoder (Triton's ``audio_encoder``).
        settings: pacing, deadlines, voice activity.
        metrics: the gateway's Prometheus series.
        clock: the clock (the real one unless a test says otherwise).
    """

    def __init__(
        self,
        store: AvatarStore,
        pipeline: FramePipeline,
        encoder: TritonAudioEncoder,
        settings: LiveSettings,
        metrics: GatewayMetrics,
        clock: Clock | None = None,
    ) -> None:
        self.store = store
        self.pipeline = pipeline
        self.encoder = encoder
        self.settings = settings
        self.metrics = metrics
        self.clock: Clock = clock or MonotonicClock()
        self.idle = IdleFrames(pipeline)
        self.open = 0

    async def serve(
        self, inputs: AsyncIterator[LiveInput], transport: Transport
    ) -> AsyncIterator[LiveOutput]:
        """One session: read ``inputs`` (back-pressured), yield its frames (module doc).

        Ends once the session has closed (end of input and every slot sent). Closing the
        generator early (the client went away) cancels the reader and the renders in flight.
        """
        session = LiveSession(self.encoder, self.clock, self.settings)
        started: list[float] = []  # clock time of the accepted start
        reader = asyncio.create_task(self._read(session, inputs, started), name=f"live-reader-{transport}")
        gauge = self.metrics.live_sessions.labels(transport=transport)
        gauge.inc()
        self.open += 1
        first = True
        try:
            async for item in session.frames():
                if isinstance(item, SlotFrame):
                    now = self.clock.now()
                    kind = slot_kind(item)
                    self.metrics.live_slots.labels(transport=transport, kind=kind).inc()
                    if first and started:
                        self.metrics.live_first_frame.observe(now - started[0])
                        first = False
                    if item.audio_at is not None:
                        self.metrics.live_audio_to_frame.labels(kind=kind).observe(now - item.audio_at)
                yield item
            await reader  # done: the input ended before the session could close
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            gauge.dec()
            self.open -= 1

    async def _read(
        self, session: LiveSession, inputs: AsyncIterator[LiveInput], started: list[float]
    ) -> None:
        """The reader (module doc); the end of ``inputs``, or a failure reading it, ends input."""
        renderer: AvatarRenderer | None = None
        iterator = aiter(inputs)
        try:
            while True:
                await session.wait_accepts_audio()
                try:
                    message = await anext(iterator)
                except StopAsyncIteration:
                    return
                if isinstance(message, Pcm):
                    session.push_pcm(message.data)
                elif isinstance(message, Start):
                    if renderer is None:
                        try:
                            avatar = self.store.get(message.avatar)
                        except GatewayError as exc:
                            session.report(exc)
                            continue
                        candidate = AvatarRenderer(avatar, self.pipeline, self.idle)
                    else:
                        candidate = renderer  # refused by the timeline: already started
                    session.start(message.sample_rate_hz, candidate)
                    if renderer is None and session.timeline.state is State.STREAMING:
                        renderer = candidate
                        started.append(self.clock.now())
                elif isinstance(message, Control):
                    if message.command == "flush":
                        session.flush()
                    else:
                        session.interrupt()
                else:
                    session.report(message.error)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the transport failed: this session's input ends
            log.info("live session input ended by %s: %s", type(exc).__name__, exc)
        finally:
            session.end_input()
