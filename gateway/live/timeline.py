"""The session timeline: an explicit state machine over 40 ms slots, pure and clock-driven.

Slot `k` has `pts_s = k * 0.04` and is due on the wall clock at `t0 + k * 0.04`, `t0` being the
clock time of `start`. `poll(now)` says what happens next: plan slot `k` (the next one, in
order, exactly once), report an error before start, wait, or close. Nothing here does I/O or
awaits: the caller (`gateway.live.session.LiveSession`) passes the clock's time in, encodes the
features and renders the frames.

States and events (`TRANSITIONS` is the whole table; any other pair is refused with an error
to this session and changes nothing):

    awaiting_start --start--> streaming     (t0 = now; a bad sample rate is refused, no change)
    awaiting_start --end----> closed        (no frames)
    streaming ------pcm-----> streaming     (joins the open segment, or opens one at the
                                             first slot not yet planned)
    streaming ------flush---> streaming     (seals the open segment: silence pads its lookahead)
    streaming ------interrupt-> streaming   (drops audio not yet planned; the next slot is idle)
    streaming ------end-----> draining      (seals the open segment)
    draining -------interrupt-> draining    (drops audio not yet planned, closes sooner)
    draining -------drained-> closed        (every slot of the received audio is planned, and
                                             every slot due before the end of input: the idle time
                                             before the end is sent even when rendering lagged)

Slot `k` is planned, in this order of precedence:

- inside a segment (audio covers it): once ready (`AudioSegment.readiness`: the speaking
  decision, and for a speaking slot its feature window: about 450 ms of audio after the slot's
  start) and `now >= due(k) - margin_s`; speaking or idle as the VAD says. An open segment that
  got no audio for `underrun_s` while its next slot is not ready is sealed (implicit flush);
- otherwise idle, at `now >= due(k)`: 25 idle slots per second of wall clock; a timeline that
  fell behind (rendering lagged) catches up at once.

Errors (`push_pcm` with an odd byte count, a second `start`, ...) are attached to the next
planned slot, so the slot order never breaks; before start they come out as notices.
"""
from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

from gateway.errors import BadRequest, GatewayError
from gateway.live.features import samples_for_window
from gateway.live.pcm import check_sample_rate, decode_pcm16
from gateway.live.segment import AudioSegment
from gateway.live.settings import LiveSettings
from gateway.live.types import SLOT_S, SLOT_SAMPLES
from lipsync.contract import SAMPLE_RATE
from lipsync.frames import pingpong_index

logger = logging.getLogger(__name__)

WINDOW_LOOKAHEAD_S: float = max(samples_for_window(j) - SLOT_SAMPLES * j for j in range(5)) / SAMPLE_RATE
"""Audio a speaking slot needs after its own start (s): 0.4525 (7240 samples); the window
starts repeat every 5 slots (`int(80 i / 25)`), so the maximum over 5 slots is the maximum."""


class State(enum.Enum):
    """Where a session is in its life."""

    AWAITING_START = "awaiting_start"
    STREAMING = "streaming"
    DRAINING = "draining"
    CLOSED = "closed"


class Event(enum.Enum):
    """What can happen to a session."""

    START = "start"
    PCM = "pcm"
    FLUSH = "flush"
    INTERRUPT = "interrupt"
    END = "end"
    DRAINED = "drained"


TRANSITIONS: dict[tuple[State, Event], State] = {
    (State.AWAITING_START, Event.START): State.STREAMING,
    (State.AWAITING_START, Event.END): State.CLOSED,
    (State.STREAMING, Event.PCM): State.STREAMING,
    (State.STREAMING, Event.FLUSH): State.STREAMING,
    (State.STREAMING, Event.INTERRUPT): State.STREAMING,
    (State.STREAMING, Event.END): State.DRAINING,
    (State.DRAINING, Event.INTERRUPT): State.DRAINING,
    (State.DRAINING, Event.DRAINED): State.CLOSED,
}
"""The session's state machine: (state, event) -> next state; other pairs are refused."""

_WHY_REFUSED: dict[State, str] = {
    State.AWAITING_START: "the session has not started: send start (avatar, sample_rate_hz) first",
    State.STREAMING: "the session has already started",
    State.DRAINING: "input has ended",
    State.CLOSED: "the session is closed",
}


@dataclass(frozen=True)
class SlotPlan:
    """Slot `seq` is to be rendered now (speaking) or shown idle.

    Attributes:
        seq: slot index; `pts_s = seq * 0.04`.
        video_frame: the avatar's video frame (ping-pong walk of `seq`).
        speaking: render with the UNet (needs `segment`'s window of `local_slot`).
        segment: the segment holding the slot's audio, None for a slot without audio.
        local_slot: the slot's index inside `segment` (0 when there is none).
        planned_at: clock time of planning (s).
        due_at: clock time at which the slot plays in real time, `t0 + seq * 0.04` (s).
        audio_at: clock time when the slot's own audio had arrived (s), None without audio.
        error: errors of this session since the previous slot, "" when none.
    """

    seq: int
    video_frame: int
    speaking: bool
    segment: AudioSegment | None
    local_slot: int
    planned_at: float
    due_at: float
    audio_at: float | None
    error: str

    @property
    def pts_s(self) -> float:
        """Presentation time of the slot: `seq * 0.04` (s)."""
        return self.seq * SLOT_S


@dataclass(frozen=True)
class Notice:
    """An error to report while there is no slot yet (before start): "code: message"."""

    error: str


@dataclass(frozen=True)
class Wait:
    """Nothing to plan before clock time `until` (s), or before new input when None."""

    until: float | None


@dataclass(frozen=True)
class Closed:
    """The session is over: every slot has been planned."""


Poll = SlotPlan | Notice | Wait | Closed


class SessionTimeline:
    """The slots of one live session (module doc).

    Args:
        settings: pacing and voice-activity settings.
    """

    def __init__(self, settings: LiveSettings) -> None:
        self.settings = settings
        self._state = State.AWAITING_START
        self._t0 = 0.0
        self._rate = 0
        self._video_frames = 1
        self._next = 0  # first slot not yet planned
        self._first_free = 0  # first slot a new segment may start at (interrupt: next + 1)
        self._segments: list[AudioSegment] = []  # in timeline order; only the last may be open
        self._errors: list[str] = []
        self._ended_at = float("-inf")  # clock time of end of input

    @property
    def state(self) -> State:
        """The current state."""
        return self._state

    @property
    def next_slot(self) -> int:
        """The first slot not yet planned."""
        return self._next

    # ------------------------------------------------------------------------- events
    def start(self, sample_rate_hz: int, video_frames: int, now: float) -> None:
        """Start the session: slot 0 is due now.

        Args:
            sample_rate_hz: rate of the PCM to come (Hz), 8000..48000.
            video_frames: N, the avatar's video frames (>= 1).
            now: clock time (s).

        A bad rate, or a start in any state but awaiting_start, is reported to the session
        (notice or next frame) and changes nothing.
        """
        if not self._allowed(Event.START):
            return
        try:
            self._rate = check_sample_rate(sample_rate_hz)
        except GatewayError as exc:
            self.report(exc)
            return
        if video_frames < 1:
            raise ValueError(f"an avatar needs at least one video frame, got {video_frames}")
        self._video_frames = video_frames
        self._t0 = now
        self._fire(Event.START)

    def push_pcm(self, data: bytes, now: float) -> None:
        """Audio: 16-bit LE mono PCM at the start's rate (an odd byte count is refused whole)."""
        if not self._allowed(Event.PCM):
            return
        try:
            samples = decode_pcm16(data)
        except GatewayError as exc:
            self.report(exc)
            return
        if samples.size == 0:
            return
        segment = self._segments[-1] if self._segments and not self._segments[-1].sealed else None
        if segment is None:
            start = max(
                self._next, self._first_free, *(s.start_slot + (s.slot_limit or 0) for s in self._segments)
            )
            segment = AudioSegment(start, self._rate, self.settings.vad, now)
            self._segments.append(segment)
        segment.push(samples, now)
        self._fire(Event.PCM)

    def flush(self, now: float) -> None:
        """Render what has arrived now: seal the open segment (silence pads its lookahead)."""
        if self._allowed(Event.FLUSH):
            self._seal_open(now)
            self._fire(Event.FLUSH)

    def interrupt(self, now: float) -> None:
        """Drop all audio not yet planned; the next slot is idle (a user barges in)."""
        if not self._allowed(Event.INTERRUPT):
            return
        for segment in self._segments:
            segment.cut(self._next - segment.start_slot)
        self._segments = []
        self._first_free = self._next + 1
        self._fire(Event.INTERRUPT)

    def end_input(self, now: float) -> None:
        """End of input: the slots of all audio received are still planned, then `Closed`."""
        if self._allowed(Event.END):
            self._seal_open(now)
            self._ended_at = now
            self._fire(Event.END)

    def report(self, error: GatewayError) -> None:
        """Tell this session about an error: on the next slot, or as a notice before start."""
        if self._state is State.CLOSED:
            logger.info("live session closed, error dropped: %s", error)
            return
        self._errors.append(str(error))

    # ------------------------------------------------------------------------- pacing
    def accepts_audio_at(self) -> float:
        """Clock time (s) from which more audio may be read (back-pressure).

        Audio is read while what is buffered ends less than `margin_s + WINDOW_LOOKAHEAD_S`
        ahead of the wall clock: enough for every slot the margin allows to be ready, no more.
        Before start, after end and with nothing buffered: at once (`-inf`).
        """
        if self._state is not State.STREAMING or not self._segments:
            return float("-inf")
        end_s = max(s.end_sample for s in self._segments) / SAMPLE_RATE
        return self._t0 + end_s - self.settings.margin_s - WINDOW_LOOKAHEAD_S

    def poll(self, now: float) -> Poll:
        """What happens next at clock time `now` (s): see the module doc."""
        if self._state is State.AWAITING_START:
            return Notice(self._take_errors()) if self._errors else Wait(None)
        if self._state is State.CLOSED:
            return Closed()
        segment = self._head_segment()
        k = self._next
        due = self._t0 + k * SLOT_S
        if segment is None:
            if self._state is State.DRAINING:
                if self._errors or due < self._ended_at:  # errors after end still get a frame
                    return self._plan(None, 0, False, now)
                self._fire(Event.DRAINED)
                return Closed()
            return self._plan(None, 0, False, now) if now >= due else Wait(due)
        local = k - segment.start_slot
        if local < 0:  # interrupt reserved slot k as idle; the new segment starts after it
            return self._plan(None, 0, False, now) if now >= due else Wait(due)
        speaking = segment.readiness(local)
        if speaking is None:
            underrun_at = segment.last_audio_at + self.settings.underrun_s
            if now < underrun_at:
                return Wait(underrun_at)
            segment.seal(now)  # implicit flush: the client stopped sending mid-lookahead
            return self.poll(now)
        if now < due - self.settings.margin_s:
            return Wait(due - self.settings.margin_s)
        return self._plan(segment, local, speaking, now)

    # ------------------------------------------------------------------------- internals
    def _allowed(self, event: Event) -> bool:
        if (self._state, event) in TRANSITIONS:
            return True
        self.report(BadRequest(f"{event.value} refused: {_WHY_REFUSED[self._state]}"))
        return False

    def _fire(self, event: Event) -> None:
        self._state = TRANSITIONS[(self._state, event)]

    def _seal_open(self, now: float) -> None:
        if self._segments:
            self._segments[-1].seal(now)

    def _head_segment(self) -> AudioSegment | None:
        while self._segments and self._segments[0].finished(self._next - self._segments[0].start_slot):
            self._segments.pop(0)
        return self._segments[0] if self._segments else None

    def _take_errors(self) -> str:
        text = "; ".join(self._errors)
        self._errors.clear()
        return text

    def _plan(self, segment: AudioSegment | None, local: int, speaking: bool, now: float) -> SlotPlan:
        k = self._next
        self._next += 1
        return SlotPlan(
            seq=k,
            video_frame=pingpong_index(k, self._video_frames),
            speaking=speaking,
            segment=segment,
            local_slot=local,
            planned_at=now,
            due_at=self._t0 + k * SLOT_S,
            audio_at=segment.audio_at(local) if segment is not None else None,
            error=self._take_errors(),
        )
