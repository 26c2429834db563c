"""The live session timeline as a pure state machine: simulated time, real speech, no server.

Every test drives `gateway.live.timeline.SessionTimeline` with explicit clock times and checks
what a client relies on: one slot per 40 ms in order, idle slots in real time, speaking slots
as soon as their lookahead arrived (or at once on flush / end), the margin ahead of the wall
clock, interrupt, errors on the session's own next frame.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from gateway.live.features import samples_for_window
from gateway.live.settings import LiveSettings
from gateway.live.timeline import (
    TRANSITIONS,
    WINDOW_LOOKAHEAD_S,
    Closed,
    Event,
    Notice,
    SessionTimeline,
    SlotPlan,
    State,
    Wait,
)
from gateway.live.types import SLOT_SAMPLES
from lipsync.frames import pingpong_index
from tests.fixtures_live import chunks, speech_paths, speech_pcm16

T0 = 100.0
N_VIDEO = 7
FAR = LiveSettings(margin_s=10.0)  # pacing out of the way where a test is about readiness


def started(settings: LiveSettings | None = None, rate: int = 16000) -> SessionTimeline:
    tl = SessionTimeline(settings or LiveSettings())
    tl.start(rate, N_VIDEO, T0)
    assert tl.state is State.STREAMING
    return tl


def drain(tl: SessionTimeline, now: float) -> tuple[list[SlotPlan], Wait | Notice | Closed]:
    """Every slot plannable at `now`, and what came after them."""
    plans = []
    while isinstance(item := tl.poll(now), SlotPlan):
        plans.append(item)
    return plans, item


@pytest.fixture(scope="module")
def speech() -> bytes:
    """3 s of LibriVox speech, 16 kHz int16 LE."""
    return speech_pcm16(speech_paths()[1]).astype("<i2").tobytes()[: 3 * 32000]


def check_order(plans: list[SlotPlan], first: int = 0) -> None:
    assert [p.seq for p in plans] == list(range(first, first + len(plans)))
    for p in plans:
        assert p.pts_s == p.seq * 0.04
        assert p.video_frame == pingpong_index(p.seq, N_VIDEO)


# ----------------------------------------------------------------------------- idle pacing
def test_idle_slots_follow_the_wall_clock_and_catch_up() -> None:
    tl = started()
    plans, after = drain(tl, T0)
    assert [p.seq for p in plans] == [0] and after == Wait(T0 + 0.04)
    assert drain(tl, T0 + 0.039)[0] == []
    plans, after = drain(tl, T0 + 1.0)  # a second later: slots 1..25, no more
    check_order(plans, first=1)
    assert len(plans) == 25 and not any(p.speaking or p.segment for p in plans)
    assert after == Wait(T0 + 26 * 0.04)


def test_audio_after_a_pause_starts_at_the_first_slot_not_yet_planned(speech: bytes) -> None:
    tl = started(FAR)
    idle, _ = drain(tl, T0 + 2.0)
    assert len(idle) == 51
    tl.push_pcm(speech, T0 + 2.0)
    plans, _ = drain(tl, T0 + 2.0)
    assert plans and plans[0].seq == 51 and plans[0].segment is not None
    assert plans[0].segment.start_slot == 51 and plans[0].local_slot == 0


# ----------------------------------------------------------------------------- readiness
def test_speaking_slots_go_out_as_soon_as_their_lookahead_arrived(speech: bytes) -> None:
    tl = started(FAR)
    planned: list[tuple[SlotPlan, int]] = []
    received = 0
    for piece in chunks(speech, 2 * 320):
        tl.push_pcm(piece, T0)
        received += len(piece) // 2
        planned += [(p, received) for p in drain(tl, T0)[0]]
    check_order([p for p, _ in planned])
    speaking = [(p, n) for p, n in planned if p.speaking]
    assert len(speaking) > 40
    for p, n in speaking:  # never before the window's audio is there, and right when it is
        assert samples_for_window(p.local_slot) <= n < samples_for_window(p.local_slot) + 320
    # without flush, the last slots wait for lookahead that has not come
    assert len(planned) < len(speech) // 2 // SLOT_SAMPLES


def test_flush_plans_every_slot_of_the_audio_at_once(speech: bytes) -> None:
    tl = started(FAR)
    one_second = speech[:32000]
    tl.push_pcm(one_second, T0)
    before, _ = drain(tl, T0)
    assert len(before) < 25
    tl.flush(T0)
    after, wait = drain(tl, T0)
    plans = before + after
    check_order(plans)
    assert len(plans) == 25 and all(p.segment is not None for p in plans)
    assert sum(p.speaking for p in plans) > 15
    assert isinstance(wait, Wait)  # then idle slots in real time
    nxt, _ = drain(tl, T0 + 25 * 0.04)
    assert nxt[0].seq == 25 and nxt[0].segment is None and not nxt[0].speaking


def test_audio_after_a_flush_continues_after_the_flushed_slots(speech: bytes) -> None:
    tl = started(FAR)
    tl.push_pcm(speech[:32000], T0)
    tl.flush(T0)
    tl.push_pcm(speech[32000:64000], T0)  # the flushed segment is not planned yet
    tl.flush(T0)
    plans, _ = drain(tl, T0)
    check_order(plans)
    assert len(plans) == 50 and plans[25].segment is not plans[24].segment
    assert plans[25].segment is not None
    assert plans[25].segment.start_slot == 25 and plans[25].local_slot == 0


def test_a_client_that_stops_sending_is_flushed_after_the_underrun_time(speech: bytes) -> None:
    settings = LiveSettings(margin_s=10.0, underrun_s=0.3)
    tl = started(settings)
    tl.push_pcm(speech[:32000], T0)
    plans, wait = drain(tl, T0)
    assert wait == Wait(T0 + 0.3)
    more, _ = drain(tl, T0 + 0.299)
    assert more == []
    more, _ = drain(tl, T0 + 0.3)
    assert len(plans + more) == 25


def test_digital_silence_is_all_idle_without_any_window() -> None:
    tl = started()
    silence = np.zeros(320, "<i2").tobytes()
    plans = []
    for i in range(100):  # 2 s in 20 ms chunks, in real time
        tl.push_pcm(silence, T0 + 0.02 * i)
        plans += drain(tl, T0 + 0.02 * i)[0]
    tl.end_input(T0 + 2.0)
    rest, end = drain(tl, T0 + 2.0)
    plans += rest
    check_order(plans)
    assert end == Closed() and len(plans) == 50
    assert not any(p.speaking for p in plans)


def test_speech_then_silence_speaks_then_goes_idle(speech: bytes) -> None:
    tl = started(FAR)
    tl.push_pcm(speech + bytes(2 * 32000), T0)
    tl.end_input(T0)
    plans, end = drain(tl, T0)
    assert end == Closed() and len(plans) == 125
    speaking = [p.speaking for p in plans]
    assert np.mean(speaking[:75]) > 0.85 and not any(speaking[90:])


# ----------------------------------------------------------------------------- margin, back-pressure
def test_audio_sent_at_once_is_rendered_at_most_the_margin_ahead() -> None:
    long_speech = b"".join(speech_pcm16(p).astype("<i2").tobytes() for p in speech_paths())
    seconds = len(long_speech) / 32000
    tl = started(LiveSettings(margin_s=0.5))
    assert tl.accepts_audio_at() == float("-inf")
    tl.push_pcm(long_speech, T0)
    plans, wait = drain(tl, T0)
    assert len(plans) == 13 and wait == Wait(T0 + 13 * 0.04 - 0.5)  # pts 0 .. 0.48 s
    plans, _ = drain(tl, T0 + 1.0)
    assert plans[-1].seq == 37  # pts 1.48 s = now + margin
    # back-pressure: more audio is read once the buffer ends within margin + lookahead of now
    assert tl.accepts_audio_at() == pytest.approx(T0 + seconds - 0.5 - WINDOW_LOOKAHEAD_S)


# ----------------------------------------------------------------------------- interrupt, end
def test_interrupt_drops_pending_audio_and_the_next_slot_is_idle(speech: bytes) -> None:
    tl = started(FAR)
    tl.push_pcm(speech, T0)
    plans, _ = drain(tl, T0)
    assert plans[-1].speaking
    k = plans[-1].seq + 1
    tl.interrupt(T0)
    tl.push_pcm(speech, T0)  # the user's new turn, at once
    after, wait = drain(tl, T0)
    assert after == [] and wait == Wait(T0 + k * 0.04)  # slot k waits for its real time, idle
    after, _ = drain(tl, T0 + k * 0.04)
    check_order(plans + after)
    assert not after[0].speaking and after[0].segment is None
    assert after[1].segment is not None and after[1].segment.start_slot == k + 1


def test_end_of_input_plans_all_audio_then_closes(speech: bytes) -> None:
    tl = started(FAR)
    for piece in chunks(speech[:40000], 999 * 2):
        tl.push_pcm(piece, T0)
    tl.end_input(T0)
    assert tl.state is State.DRAINING
    plans, end = drain(tl, T0)
    check_order(plans)
    assert end == Closed() and tl.state is State.CLOSED
    assert len(plans) == -(-20000 // SLOT_SAMPLES)
    assert tl.poll(T0 + 10) == Closed()


def test_end_before_any_audio_closes_without_frames() -> None:
    tl = started()
    tl.end_input(T0)
    assert drain(tl, T0 + 5) == ([], Closed())


# ----------------------------------------------------------------------------- errors
def test_start_with_a_bad_rate_is_refused_and_a_good_one_then_works() -> None:
    tl = SessionTimeline(LiveSettings())
    tl.start(96000, N_VIDEO, T0)
    assert tl.state is State.AWAITING_START
    notice = tl.poll(T0)
    assert isinstance(notice, Notice) and "8000..48000" in notice.error
    assert tl.poll(T0) == Wait(None)
    tl.start(44100, N_VIDEO, T0 + 1)
    plans, _ = drain(tl, T0 + 1)
    assert [p.seq for p in plans] == [0] and plans[0].error == ""


def test_audio_before_start_is_a_notice() -> None:
    tl = SessionTimeline(LiveSettings())
    tl.push_pcm(b"\x00\x00", T0)
    tl.flush(T0)
    notice = tl.poll(T0)
    assert isinstance(notice, Notice)
    assert notice.error.startswith("bad_request: pcm refused: the session has not started")
    assert "flush refused" in notice.error


def test_errors_ride_on_the_next_slot_and_keep_the_order(speech: bytes) -> None:
    """A second start and an odd-sized PCM message are reported on the next frame; the odd
    message is dropped whole, so the rest of the audio plays exactly as without it."""
    def run(with_errors: bool) -> list[SlotPlan]:
        tl = started(FAR)
        plans = []
        for i, piece in enumerate(chunks(speech, 640)):
            if with_errors and i == 30:
                tl.start(16000, N_VIDEO, T0)
                tl.push_pcm(b"\x01\x02\x03", T0)
            tl.push_pcm(piece, T0)
            plans += drain(tl, T0)[0]
        tl.end_input(T0)
        return plans + drain(tl, T0)[0]

    clean, bad = run(False), run(True)
    check_order(bad)
    errors = [p for p in bad if p.error]
    assert len(errors) == 1
    assert errors[0].error == (
        "bad_request: start refused: the session has already started; "
        "bad_request: PCM message of 3 bytes refused: "
        "16-bit PCM needs an even number of bytes (whole samples)"
    )
    assert [(p.seq, p.speaking, p.local_slot) for p in clean] == [
        (p.seq, p.speaking, p.local_slot) for p in bad
    ]


@pytest.mark.parametrize("state", [State.AWAITING_START, State.STREAMING, State.DRAINING])
def test_every_refused_event_is_reported(state: State, speech: bytes) -> None:
    calls: dict[Event, Callable[[SessionTimeline], object]] = {
        Event.START: lambda tl: tl.start(16000, N_VIDEO, T0),
        Event.PCM: lambda tl: tl.push_pcm(b"\x00\x00", T0),
        Event.FLUSH: lambda tl: tl.flush(T0),
        Event.INTERRUPT: lambda tl: tl.interrupt(T0),
        Event.END: lambda tl: tl.end_input(T0),
    }
    for event, call in calls.items():
        tl = SessionTimeline(FAR)
        if state is not State.AWAITING_START:
            tl.start(16000, N_VIDEO, T0)
            tl.push_pcm(speech, T0)
        if state is State.DRAINING:
            tl.end_input(T0)
        assert tl.state is state
        call(tl)
        allowed = (state, event) in TRANSITIONS
        assert tl.state is (TRANSITIONS[(state, event)] if allowed else state)
        item = tl.poll(T0)
        error = item.error if isinstance(item, (Notice, SlotPlan)) else ""
        assert (f"{event.value} refused" in error) != allowed, (state, event, error)


def test_end_after_a_lag_still_sends_the_idle_slots_due_before_it(speech: bytes) -> None:
    """Rendering lagged (nothing planned for 3 s), then end of input: the slots of the audio and
    the idle slots due before the end all come, the same stream a fast server would send."""
    tl = started()
    tl.push_pcm(speech[: 2 * 16000], T0)  # 1 s of audio at once
    tl.end_input(T0 + 3.0)
    plans, end = drain(tl, T0 + 3.0)
    check_order(plans)
    assert end == Closed() and len(plans) == 75  # slots due at T0 .. T0 + 2.96
