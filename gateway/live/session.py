"""`LiveSession`: drives a `SessionTimeline` with the clock, the audio encoder and a renderer.

The transport's reader calls the input methods (`start`, `push_pcm`, `flush`, `interrupt`,
`end_input`, `report`), waiting for `wait_accepts_audio` before reading the next message; its
writer iterates `frames()` and sends each item.

Input is read ahead of the timeline: the timeline takes audio only up to `margin_s` (+ 0.45 s
of lookahead) ahead of the wall clock; audio read beyond that, and the `flush` and end of input
that follow it, are *held* here in order and handed to the timeline as it plays. The reader
keeps reading until `LiveSettings.max_held_s` of audio is held (then it waits: back-pressure
through the transport's flow control), so a control message behind a TTS burst is read at once:
`interrupt` drops the held audio with the rest of the audio not yet rendered and takes effect
at the next slot, not after the burst has played.

Inside `frames()`:

1. the timeline plans the next slots (up to `max_in_flight` unsent at once);
2. the feature rows the speaking ones that get a render need (item 4) are encoded in one
   `AudioEncoder.encode` call per segment, started at once and not awaited here (Triton's
   dynamic batcher merges the calls of concurrent sessions; rows already being encoded for an
   earlier batch are not asked again), so idle slots keep flowing while the encoder works;
3. each slot is its own task: a speaking one waits for its rows, builds its window and renders
   (`render_speaking`), an idle one is `idle_frame` (no inference). A yielded slot releases
   what only earlier slots needed (bounded state);
4. frames are yielded strictly in slot order. A speaking slot whose encoder call or render
   failed, or whose render is not done by its deadline, is sent as the idle frame of the same
   video frame, `late = True`. The deadline is `max(ready, due_at) + render_timeout_s`, `ready`
   being when the slot could first be planned: its planning time, but at most its own audio's
   arrival + `WINDOW_LOOKAHEAD_S` (0.45 s). So a slot planned late only because the session's
   earlier renders held it back (Triton slower than real time) is not given a fresh timeout:
   once its deadline has passed at planning it is sent idle and late without a Triton call,
   and the stream catches up with the wall clock instead of lagging more and more. Whether a
   speaking slot gets a render at all is `gateway.live.admission.RenderAdmission`'s call, at
   planning: a window of renders in flight that halves when a render misses its deadline and
   grows while they make it, and no render started with less time left than renders take; a
   slot refused is sent idle and late at once, without a render. So the session shows as
   many speaking frames as the renderer completes in time, and Triton does not spend its
   time on batches whose every frame is thrown away. A slot past its deadline has its render
   cancelled at once, head of the queue or not;
5. `interrupt` turns every slot not yet yielded into an idle frame at once (not late).

No slot is ever skipped or repeated: `seq` runs 0, 1, 2, ... until the timeline closes.
"""
from __future__ import annotations

import asyncio
import functools
import logging
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from gateway.errors import GatewayError
from gateway.live.admission import RenderAdmission
from gateway.live.clock import Clock
from gateway.live.features import AudioEncoder, SegmentFeatures, window_feature_indices
from gateway.live.segment import AudioSegment
from gateway.live.settings import LiveSettings
from gateway.live.timeline import (
    WINDOW_LOOKAHEAD_S,
    Closed,
    Notice,
    SessionTimeline,
    SlotPlan,
    Wait,
)
from gateway.live.types import RenderedFrame, Renderer, SessionNotice, SlotFrame

logger = logging.getLogger(__name__)


_Mark = Literal["flush", "end"]
"""A `flush` or the end of input held behind audio (module doc)."""


@dataclass
class _Slot:
    """A planned slot not yet yielded: its render task and how to finish it."""

    plan: SlotPlan
    task: asyncio.Task[RenderedFrame]
    speaking: bool
    deadline: float  # clock time after which a speaking render is given up (s); inf for idle
    late: bool = False
    started_at: float = 0.0  # clock time its render started (s)
    running_at_start: int = 0  # the session's other renders running then


class LiveSession:
    """One live session (module doc).

    Args:
        encoder: the AVE audio encoder (`encode(f32[N, 80, 16]) -> f32[N, 512]`).
        clock: the clock (`MonotonicClock` in the gateway, a simulated one in tests).
        settings: pacing, deadlines, voice activity.
    """

    def __init__(self, encoder: AudioEncoder, clock: Clock, settings: LiveSettings | None = None) -> None:
        self.settings = settings or LiveSettings()
        self.timeline = SessionTimeline(self.settings)
        self._encoder = encoder
        self._clock = clock
        self._renderer: Renderer | None = None
        self._slots: deque[_Slot] = deque()
        self._input = asyncio.Event()
        self._held: deque[bytes | _Mark] = deque()  # input read ahead of the timeline (module doc)
        self._held_bytes = 0  # PCM bytes in _held
        self._room = asyncio.Event()  # set while the reader may read (less than max_held_s held)
        self._room.set()
        self._rate = 0  # the started session's PCM rate (Hz)
        self._encoding: dict[tuple[int, int], asyncio.Future[None]] = {}  # (segment, row) -> call
        self.sent = 0
        """Slots yielded by `frames()` so far (the next one is slot `sent`)."""
        self.admission = RenderAdmission(self.settings.max_in_flight, self.settings.render_timeout_s)
        """Which speaking slots get a render (module doc, 4); read it, do not change it."""

    # ------------------------------------------------------------------------- input side
    def start(self, sample_rate_hz: int, renderer: Renderer) -> None:
        """`start` with the avatar already resolved to its renderer (errors: see the timeline)."""
        before = self.timeline.state
        self.timeline.start(sample_rate_hz, renderer.video_frames, self._clock.now())
        if self.timeline.state is not before:  # started now (a refused start keeps the first)
            self._renderer = renderer
            self._rate = sample_rate_hz
        self._input.set()

    def report(self, error: GatewayError) -> None:
        """An error found by the transport (unknown avatar, bad message): told to this session."""
        self.timeline.report(error)
        self._input.set()

    def push_pcm(self, data: bytes) -> None:
        """16-bit LE mono PCM at the start's rate (held while the timeline is full, module doc)."""
        if self._held or self._clock.now() < self.timeline.accepts_audio_at():
            self._held.append(data)
            self._held_bytes += len(data)
            if self._held_bytes >= self.settings.max_held_s * self._rate * 2:
                self._room.clear()
        else:
            self.timeline.push_pcm(data, self._clock.now())
        self._input.set()

    def flush(self) -> None:
        """Render what has arrived, padding the lookahead with silence (after the held audio)."""
        if self._held:
            self._held.append("flush")
        else:
            self.timeline.flush(self._clock.now())
        self._input.set()

    def interrupt(self) -> None:
        """Drop audio not yet rendered (held or on the timeline); every frame not yet sent
        becomes idle."""
        self._held.clear()
        self._held_bytes = 0
        self._room.set()
        self.timeline.interrupt(self._clock.now())
        if self._renderer is not None:
            for slot in self._slots:
                if slot.speaking:
                    self._to_idle(slot, late=False)
        self._input.set()

    def end_input(self) -> None:
        """End of input: frames for all audio received follow, then `frames()` ends."""
        if self._held:
            self._held.append("end")
        else:
            self.timeline.end_input(self._clock.now())
        self._input.set()

    def accepts_audio(self) -> bool:
        """True when the transport may read the next message (less than `max_held_s` of audio
        held, module doc)."""
        return self._room.is_set()

    async def wait_accepts_audio(self) -> None:
        """Return once the next message may be read (back-pressure, module doc)."""
        await self._room.wait()

    @property
    def held_s(self) -> float:
        """Audio read but not yet on the timeline (s), module doc."""
        return self._held_bytes / 2 / self._rate if self._rate else 0.0

    @property
    def speaking_in_flight(self) -> int:
        """Speaking slots planned and not yet sent (their renders running or done)."""
        return sum(slot.speaking for slot in self._slots)

    def _feed(self, now: float) -> None:
        """Hand the held input to the timeline as far as it takes audio at clock time ``now``."""
        while self._held and now >= self.timeline.accepts_audio_at():
            item = self._held.popleft()
            if item == "flush":
                self.timeline.flush(now)
            elif item == "end":
                self.timeline.end_input(now)
            else:
                assert isinstance(item, bytes)
                self._held_bytes -= len(item)
                self.timeline.push_pcm(item, now)
        if not self._held or self._held_bytes < self.settings.max_held_s * self._rate * 2:
            self._room.set()

    # ------------------------------------------------------------------------- output side
    async def frames(self) -> AsyncIterator[SlotFrame | SessionNotice]:
        """The session's output, in order, until it closes (module doc)."""
        try:
            closed = False
            while True:
                now = self._clock.now()
                self._feed(now)
                self._give_up_overdue(now)
                if self._slots and self._slots[0].task.done():
                    frame = await self._finish(self._slots.popleft())
                    self.sent = frame.seq + 1
                    yield frame
                    continue
                self._input.clear()
                plans: list[SlotPlan] = []
                wait_until: float | None = None
                while not closed and len(self._slots) + len(plans) < self.settings.max_in_flight:
                    item = self.timeline.poll(now)
                    if isinstance(item, SlotPlan):
                        plans.append(item)
                    elif isinstance(item, Notice):
                        yield SessionNotice(item.error)
                    elif isinstance(item, Wait):
                        wait_until = item.until
                        break
                    elif isinstance(item, Closed):
                        closed = True
                if plans:
                    self._launch(plans)
                    continue
                if closed and not self._slots:
                    return
                if self._held:
                    feed_at = self.timeline.accepts_audio_at()
                    wait_until = feed_at if wait_until is None else min(wait_until, feed_at)
                await self._wait(wait_until)
        finally:
            for slot in self._slots:
                slot.task.cancel()

    def _give_up_overdue(self, now: float) -> None:
        """Send idle (late) every speaking slot whose deadline has passed, head or not: its
        render is cancelled so it takes no more of Triton's time."""
        for slot in self._slots:
            if slot.speaking and now >= slot.deadline and not self._render_ok(slot):
                logger.info("live: slot %d missed its render deadline, sent idle", slot.plan.seq)
                self.admission.missed(now - slot.started_at, slot.running_at_start)
                self._to_idle(slot, late=True)

    @staticmethod
    def _render_ok(slot: _Slot) -> bool:
        return slot.task.done() and not slot.task.cancelled() and slot.task.exception() is None

    async def _wait(self, until: float | None) -> None:
        """Until new input, the head slot's render, a slot's deadline, or clock time `until`
        (the next slot's time, or when held audio goes to the timeline)."""
        waiters: list[asyncio.Future[Any]] = [asyncio.ensure_future(self._input.wait())]
        times = [t for t in (until, *(s.deadline for s in self._slots)) if t is not None]
        if times and min(times) != float("inf"):
            waiters.append(asyncio.ensure_future(self._clock.sleep_until(min(times))))
        watched: set[asyncio.Future[Any]] = set(waiters)
        if self._slots:
            watched.add(self._slots[0].task)
        try:
            await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    def _launch(self, plans: list[SlotPlan]) -> None:
        """Start every plan's task: a speaking one the admission lets render waits for its
        feature rows (encoded in one call per segment, shared with the slots that need the same
        rows; none for a slot refused) and then renders; the others are idle frames."""
        now = self._clock.now()
        running = self._rendering()
        admitted: dict[int, tuple[float, int]] = {}  # seq -> deadline, renders running at its start
        for plan in (p for p in plans if p.speaking):
            deadline = self._deadline(plan)
            if self.admission.admit(now, deadline, running):
                admitted[plan.seq] = deadline, running
                running += 1
            else:
                logger.debug(
                    "live: slot %d refused a render (window %.1f, %d running, %.2f s left, "
                    "service %.3f s)",
                    plan.seq, self.admission.window, running, deadline - now, self.admission.service_s,
                )
        rows = self._encode([p for p in plans if p.seq in admitted])
        renderer = self._require_renderer()
        for plan in plans:
            if plan.seq in admitted:
                deadline, ahead = admitted[plan.seq]
                task = asyncio.ensure_future(self._speak(renderer, plan, rows[plan.seq]))
                task.add_done_callback(functools.partial(self._render_done, now, ahead))
                self._slots.append(_Slot(plan, task, True, deadline, started_at=now, running_at_start=ahead))
            else:
                task = asyncio.ensure_future(renderer.idle_frame(plan.seq, plan.video_frame))
                self._slots.append(_Slot(plan, task, False, float("inf"), late=plan.speaking))

    async def _speak(
        self, renderer: Renderer, plan: SlotPlan, rows: list[asyncio.Future[None]]
    ) -> RenderedFrame:
        """A speaking slot: once the encoder calls holding its rows are done, its window
        f32[16, 512] and the render. A failed call fails the slot (sent idle, late)."""
        for call in rows:
            await asyncio.shield(call)  # shared with other slots: a cancelled slot leaves it running
        assert plan.segment is not None
        window = plan.segment.features.window(plan.local_slot)
        return await renderer.render_speaking(plan.seq, plan.video_frame, window)

    def _encode(self, plans: list[SlotPlan]) -> dict[int, list[asyncio.Future[None]]]:
        """Start the encoder calls the speaking plans need, one per segment for the rows no call
        has yet; return, by seq, the calls each plan waits for (its own and earlier ones)."""
        out: dict[int, list[asyncio.Future[None]]] = {}
        by_segment: dict[int, tuple[AudioSegment, list[SlotPlan]]] = {}
        for plan in plans:
            assert plan.segment is not None
            by_segment.setdefault(id(plan.segment), (plan.segment, []))[1].append(plan)
        for key, (segment, group) in by_segment.items():
            features = segment.features
            indices = sorted({i for p in group for i in features.missing(p.local_slot)} - {
                i for (k, i) in self._encoding if k == key})
            if indices:
                call = asyncio.ensure_future(
                    self._encode_rows(key, features, indices, features.mel_windows(indices))
                )
                call.add_done_callback(_retrieved)  # logged by _encode_rows; its slots may all be gone
                for i in indices:
                    self._encoding[(key, i)] = call
            for plan in group:
                calls = {self._encoding.get((key, i)) for i in window_feature_indices(plan.local_slot)}
                out[plan.seq] = [c for c in calls if c is not None]
        return out

    async def _encode_rows(
        self, key: int, features: SegmentFeatures, indices: list[int], mel: NDArray[np.float32]
    ) -> None:
        """One encoder call: rows `indices` of a segment from their mel windows f32[n, 80, 16]."""
        try:
            features.store(indices, await self._encoder.encode(mel))
        except Exception as exc:
            logger.warning("live: audio encoder failed for %d feature rows: %s", len(indices), exc)
            raise
        finally:
            for i in indices:
                self._encoding.pop((key, i), None)

    def _render_done(self, started: float, running: int, task: asyncio.Task[RenderedFrame]) -> None:
        """A speaking render ended: one done tells the admission its latency and the renders
        running when it started (a render done is in time: an overdue one is cancelled first);
        a failed or cancelled one says nothing."""
        if not task.cancelled() and task.exception() is None:
            self.admission.rendered(self._clock.now() - started, running)

    def _rendering(self) -> int:
        """Speaking renders of this session running now (the admission's in-flight count)."""
        return sum(1 for slot in self._slots if slot.speaking and not slot.task.done())

    def _deadline(self, plan: SlotPlan) -> float:
        """Clock time (s) after which a speaking slot's render is given up (module doc, 4)."""
        ready = plan.planned_at
        if plan.audio_at is not None:
            ready = min(ready, plan.audio_at + WINDOW_LOOKAHEAD_S)
        return max(ready, plan.due_at) + self.settings.render_timeout_s

    async def _finish(self, slot: _Slot) -> SlotFrame:
        """The head slot's frame: its render, or the idle frame (late) when that failed."""
        if slot.speaking and not self._render_ok(slot):  # done: it failed
            logger.warning("live: slot %d render failed, sent idle: %s", slot.plan.seq,
                           "cancelled" if slot.task.cancelled() else slot.task.exception())
            self._to_idle(slot, late=True)
        frame = await slot.task
        plan = slot.plan
        if plan.segment is not None:  # later slots need nothing before this one's window
            plan.segment.release_before(plan.local_slot + 1)
        return SlotFrame(
            seq=plan.seq, pts_s=plan.pts_s, frame=frame, speaking=slot.speaking,
            video_frame=plan.video_frame, error=plan.error, late=slot.late, audio_at=plan.audio_at,
        )

    def _to_idle(self, slot: _Slot, *, late: bool) -> None:
        """Replace a speaking slot's render with its idle frame (a running one is cancelled)."""
        slot.task.cancel()
        slot.task = asyncio.ensure_future(
            self._require_renderer().idle_frame(slot.plan.seq, slot.plan.video_frame)
        )
        slot.speaking, slot.late, slot.deadline = False, late, float("inf")

    def _require_renderer(self) -> Renderer:
        if self._renderer is None:
            raise RuntimeError("a slot was planned before the session had a renderer")
        return self._renderer


def _retrieved(call: asyncio.Future[None]) -> None:
    """Mark a finished encoder call's exception as seen: `_encode_rows` logged it, and asyncio
    would log it again ("Task exception was never retrieved") when every slot that waited for
    it had been given up first."""
    if not call.cancelled():
        call.exception()
