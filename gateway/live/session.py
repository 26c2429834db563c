"""`LiveSession`: drives a `SessionTimeline` with the clock, the audio encoder and a renderer.

The transport's reader calls the input methods (`start`, `push_pcm`, `flush`, `interrupt`,
`end_input`, `report`), waiting for `wait_accepts_audio` before reading more audio; its writer
iterates `frames()` and sends each item. Inside `frames()`:

1. the timeline plans the next slots (up to `max_in_flight` unsent at once);
2. the feature rows the speaking ones need are encoded in one `AudioEncoder.encode` call
   (Triton's dynamic batcher merges the calls of concurrent sessions);
3. each slot is rendered as its own task (`render_speaking`, or `idle_frame` without inference);
4. frames are yielded strictly in slot order. A speaking slot whose encoder call or render
   failed, or whose render is not done by its deadline (`max(planned_at, due_at) +
   render_timeout_s`), is sent as the idle frame of the same video frame, `late = True`;
5. `interrupt` turns every slot not yet yielded into an idle frame at once (not late).

No slot is ever skipped or repeated: `seq` runs 0, 1, 2, ... until the timeline closes.
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray

from gateway.errors import GatewayError
from gateway.live.clock import Clock
from gateway.live.features import AudioEncoder
from gateway.live.segment import AudioSegment
from gateway.live.settings import LiveSettings
from gateway.live.timeline import Closed, Notice, SessionTimeline, SlotPlan, Wait
from gateway.live.types import RenderedFrame, Renderer, SessionNotice, SlotFrame

logger = logging.getLogger(__name__)


@dataclass
class _Slot:
    """A planned slot not yet yielded: its render task and how to finish it."""

    plan: SlotPlan
    task: asyncio.Task[RenderedFrame]
    speaking: bool
    deadline: float  # clock time after which a speaking render is given up (s); inf for idle
    late: bool = False


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
        self._interrupts = 0  # interrupts so far: a batch planned before one is sent idle

    # ------------------------------------------------------------------------- input side
    def start(self, sample_rate_hz: int, renderer: Renderer) -> None:
        """`start` with the avatar already resolved to its renderer (errors: see the timeline)."""
        before = self.timeline.state
        self.timeline.start(sample_rate_hz, renderer.video_frames, self._clock.now())
        if self.timeline.state is not before:  # started now (a refused start keeps the first)
            self._renderer = renderer
        self._input.set()

    def report(self, error: GatewayError) -> None:
        """An error found by the transport (unknown avatar, bad message): told to this session."""
        self.timeline.report(error)
        self._input.set()

    def push_pcm(self, data: bytes) -> None:
        """16-bit LE mono PCM at the start's rate."""
        self.timeline.push_pcm(data, self._clock.now())
        self._input.set()

    def flush(self) -> None:
        """Render what has arrived, padding the lookahead with silence."""
        self.timeline.flush(self._clock.now())
        self._input.set()

    def interrupt(self) -> None:
        """Drop audio not yet rendered; every frame not yet sent becomes idle."""
        self.timeline.interrupt(self._clock.now())
        self._interrupts += 1
        if self._renderer is not None:
            for slot in self._slots:
                if slot.speaking:
                    self._to_idle(slot, late=False)
        self._input.set()

    def end_input(self) -> None:
        """End of input: frames for all audio received follow, then `frames()` ends."""
        self.timeline.end_input(self._clock.now())
        self._input.set()

    def accepts_audio(self) -> bool:
        """True when the transport may read more audio now (back-pressure)."""
        return self._clock.now() >= self.timeline.accepts_audio_at()

    async def wait_accepts_audio(self) -> None:
        """Return once more audio may be read (the timeline has played far enough)."""
        await self._clock.sleep_until(self.timeline.accepts_audio_at())

    # ------------------------------------------------------------------------- output side
    async def frames(self) -> AsyncIterator[SlotFrame | SessionNotice]:
        """The session's output, in order, until it closes (module doc)."""
        try:
            closed = False
            while True:
                now = self._clock.now()
                if self._slots and (self._slots[0].task.done() or now >= self._slots[0].deadline):
                    yield await self._finish(self._slots.popleft())
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
                    await self._launch(plans)
                    continue
                if closed and not self._slots:
                    return
                await self._wait(wait_until)
        finally:
            for slot in self._slots:
                slot.task.cancel()

    async def _wait(self, until: float | None) -> None:
        """Until new input, the head slot's render or deadline, or clock time `until`."""
        waiters: list[asyncio.Future[Any]] = [asyncio.ensure_future(self._input.wait())]
        times = [t for t in (until, self._slots[0].deadline if self._slots else None) if t is not None]
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

    async def _launch(self, plans: list[SlotPlan]) -> None:
        """Encode the rows the speaking plans need (one call), then start every slot's task."""
        interrupts = self._interrupts
        windows = await self._windows([p for p in plans if p.speaking])
        last: dict[int, tuple[AudioSegment, int]] = {}
        for plan in plans:  # later slots never need what the batch's slots were the last to use
            if plan.segment is not None:
                last[id(plan.segment)] = (plan.segment, plan.local_slot)
        for segment, local_slot in last.values():
            segment.release_before(local_slot)
        if self._interrupts != interrupts:  # interrupted while encoding: no speaking frame
            windows = {}
            plans = [replace(p, speaking=False) for p in plans]
        renderer = self._require_renderer()
        for plan in plans:
            window = windows.get(plan.seq)
            if plan.speaking and window is not None:
                deadline = max(plan.planned_at, plan.due_at) + self.settings.render_timeout_s
                task = asyncio.ensure_future(renderer.render_speaking(plan.seq, plan.video_frame, window))
                self._slots.append(_Slot(plan, task, True, deadline))
            else:
                task = asyncio.ensure_future(renderer.idle_frame(plan.seq, plan.video_frame))
                self._slots.append(_Slot(plan, task, False, float("inf"), late=plan.speaking))

    async def _windows(self, plans: list[SlotPlan]) -> dict[int, NDArray[np.float32]]:
        """Audio windows f32[16, 512] of speaking plans by seq, the missing feature rows of each
        segment encoded in one call; the plans of a segment whose encoding failed have none."""
        out: dict[int, NDArray[np.float32]] = {}
        by_segment: dict[int, tuple[AudioSegment, list[SlotPlan]]] = {}
        for plan in plans:
            assert plan.segment is not None
            by_segment.setdefault(id(plan.segment), (plan.segment, []))[1].append(plan)
        for segment, group in by_segment.values():
            features = segment.features
            indices = sorted({i for p in group for i in features.missing(p.local_slot)})
            try:
                if indices:
                    features.store(indices, await self._encoder.encode(features.mel_windows(indices)))
                for plan in group:
                    out[plan.seq] = features.window(plan.local_slot)
            except Exception as exc:  # noqa: BLE001 - any encoder failure makes the slots late
                logger.warning("live: audio encoder failed for slots %s: %s", [p.seq for p in group], exc)
        return out

    async def _finish(self, slot: _Slot) -> SlotFrame:
        """The head slot's frame: its render, or the idle frame (late) when that failed."""
        if slot.speaking and not (
            slot.task.done() and not slot.task.cancelled() and slot.task.exception() is None
        ):
            if not slot.task.done():
                logger.info("live: slot %d missed its render deadline, sent idle", slot.plan.seq)
            else:
                logger.warning("live: slot %d render failed, sent idle: %s", slot.plan.seq,
                               "cancelled" if slot.task.cancelled() else slot.task.exception())
            self._to_idle(slot, late=True)
        frame = await slot.task
        plan = slot.plan
        return SlotFrame(
            seq=plan.seq, pts_s=plan.pts_s, frame=frame, speaking=slot.speaking,
            video_frame=plan.video_frame, error=plan.error, late=slot.late, audio_at=plan.audio_at,
        )

    def _to_idle(self, slot: _Slot, *, late: bool) -> None:
        """Replace a speaking slot's render with its idle frame."""
        slot.task.cancel()
        slot.task = asyncio.ensure_future(
            self._require_renderer().idle_frame(slot.plan.seq, slot.plan.video_frame)
        )
        slot.speaking, slot.late, slot.deadline = False, late, float("inf")

    def _require_renderer(self) -> Renderer:
        if self._renderer is None:
            raise RuntimeError("a slot was planned before the session had a renderer")
        return self._renderer
