"""The async live session: simulated clock, in-process renderer, real speech, real encoder graph.

`gateway.live.session.LiveSession` is driven as a transport would drive it (input methods on
one side, `frames()` on the other) with `FakeClock` time; the renderer is an in-process fake
that records the windows it gets (the real renderer is the gateway's frame pipeline on
Triton, tested there). The audio encoder is the package builder's ONNX graph on ONNX Runtime.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray

from export.package_builder import encode_audio
from gateway.errors import UnknownAvatar
from gateway.live.features import AudioEncoder, samples_for_window
from gateway.live.session import LiveSession
from gateway.live.settings import LiveSettings
from gateway.live.types import SessionNotice, SlotFrame
from lipsync.frames import audio_window, pingpong_index
from tests.fixtures_live import (
    BatchingRenderer,
    FakeClock,
    FixedLatencyRenderer,
    OrtEncoder,
    RecordingRenderer,
    chunks,
    settle,
    speech_paths,
    speech_pcm16,
)


class Harness:
    """A session with its output collected by a consumer task."""

    def __init__(
        self, encoder: AudioEncoder, renderer: RecordingRenderer, settings: LiveSettings | None = None
    ) -> None:
        self.clock = FakeClock()
        self.renderer = renderer
        self.session = LiveSession(encoder, self.clock, settings)
        self.out: list[SlotFrame | SessionNotice] = []
        self.sent_at: dict[int, float] = {}  # seq -> clock time the frame came out
        self.done = False
        self.task = asyncio.ensure_future(self._consume())

    async def _consume(self) -> None:
        async for item in self.session.frames():
            self.out.append(item)
            if isinstance(item, SlotFrame):
                self.sent_at[item.seq] = self.clock.now()
        self.done = True

    @property
    def frames(self) -> list[SlotFrame]:
        return [f for f in self.out if isinstance(f, SlotFrame)]

    async def speak(self, pcm: bytes) -> None:
        """Stream 16 kHz PCM in 20 ms chunks in (simulated) real time, as a microphone does."""
        for piece in chunks(pcm, 640):
            self.session.push_pcm(piece)
            await self.run_for(0.02)

    def read_burst(self, pieces: list[bytes]) -> int:
        """Push ``pieces`` while the session accepts them, as a reader with a TTS burst queued
        in its transport does; how many were read."""
        read = 0
        while read < len(pieces) and self.session.accepts_audio():
            self.session.push_pcm(pieces[read])
            read += 1
        return read

    async def run_for(self, seconds: float, step: float = 0.01) -> None:
        for _ in range(round(seconds / step)):
            self.clock.advance(step)
            await settle()


class NumpyEncoder:
    """A cheap stand-in encoder for pacing tests (the real graph is used where features matter)."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.calls = 0

    async def encode(self, mel: NDArray[np.float32]) -> NDArray[np.float32]:
        self.calls += 1
        if self.fail:
            raise RuntimeError("triton_unavailable: audio_encoder")
        return np.repeat(mel.mean(axis=(1, 2))[:, None], 512, axis=1).astype(np.float32)


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(body(), 60))


def check_stream(frames: list[SlotFrame], n_video: int) -> None:
    assert [f.seq for f in frames] == list(range(len(frames)))
    for f in frames:
        assert f.pts_s == f.seq * 0.04
        assert f.video_frame == pingpong_index(f.seq, n_video)
        kind = b"speaking" if f.speaking else b"idle"
        assert f.frame.jpeg == kind + b":%d" % f.seq


@pytest.fixture(scope="module")
def speech_3s(speech_path: Path) -> NDArray[np.int16]:
    return speech_pcm16(speech_path)[: 3 * 16000]


def test_speech_in_real_time_then_silence_then_end(
    speech_3s: NDArray[np.int16], ort_encoder: OrtEncoder, audio_encoder_onnx: Path
) -> None:
    """3 s of speech in 20 ms chunks in real time, 2 s of nothing, end of input: slots 0.. with
    no gap, speaking frames while the speech plays, idle after, the stream ends; every speaking
    frame got the package's window for its slot."""
    async def body() -> None:
        h = Harness(ort_encoder, RecordingRenderer(video_frames=5))
        h.session.start(16000, h.renderer)
        await settle()
        await h.speak(speech_3s.astype("<i2").tobytes())
        await h.run_for(2.0)
        h.session.end_input()
        await h.run_for(0.5)
        assert h.done
        frames = h.frames
        check_stream(frames, 5)
        assert len(frames) >= 75 + 50 - 2
        speaking = [f for f in frames if f.speaking]
        assert len(speaking) > 50 and not any(f.late or f.error for f in frames)
        assert len(h.renderer.speaking_calls) == len(speaking)
        assert not any(f.speaking for f in frames[-30:])  # idle after the speech
        start = min(f.seq for f in frames if f.audio_at is not None)
        assert start <= 1  # the first chunk came at once: audio starts at slot 0 or 1
        reference = encode_audio(audio_encoder_onnx, speech_3s, progress=False)
        for f in speaking:
            k = f.seq - start
            if k + 7 < len(reference) - 8:  # rows where the clip ends are excepted
                assert np.max(np.abs(h.renderer.windows[f.seq] - audio_window(reference, k))) < 1e-4
        # each speaking frame went out as soon as its lookahead had arrived: 6600 samples
        # (412.5 ms) after its own audio at most, plus one 20 ms chunk and one 10 ms step
        # (the last slots, whose lookahead never comes, wait for the underrun flush: 0.3 s)
        def lag(f: SlotFrame) -> float:
            assert f.audio_at is not None
            return h.sent_at[f.seq] - f.audio_at

        inside = [f for f in speaking if samples_for_window(f.seq - start) <= len(speech_3s)]
        assert len(inside) > 40 and max(lag(f) for f in inside) <= 0.4125 + 0.02 + 0.01 + 1e-9
        assert max(lag(f) for f in speaking) <= 0.4125 + 0.3 + 0.01 + 1e-9

    run(body)


def test_silence_only_is_all_idle_without_any_render_or_encoding() -> None:
    async def body() -> None:
        encoder = NumpyEncoder()
        h = Harness(encoder, RecordingRenderer())
        h.session.start(48000, h.renderer)
        for _ in range(100):
            h.session.push_pcm(bytes(2 * 960))  # 20 ms at 48 kHz
            await h.run_for(0.02)
        await h.run_for(1.0)
        assert len(h.frames) in (75, 76) and not any(f.speaking for f in h.frames)
        assert encoder.calls == 0 and h.renderer.speaking_calls == []
        check_stream(h.frames, 5)

    run(body)


def test_idle_frames_in_real_time_before_any_audio() -> None:
    async def body() -> None:
        h = Harness(NumpyEncoder(), RecordingRenderer())
        h.session.start(16000, h.renderer)
        await h.run_for(1.0)
        assert len(h.frames) == 26  # slots 0 .. 25: pts 0 .. 1.0 s
        await h.run_for(1.0)
        assert len(h.frames) == 51

    run(body)


def test_failed_or_hung_renders_are_sent_idle_and_late(speech_3s: NDArray[np.int16]) -> None:
    """A failed render and a hung one (given up at its deadline, cancelled) are sent idle and
    late, the stream goes on. The miss halves the session's window of renders (8 -> 4), so of
    the burst of slots planned once the hung one is given up some are sent late too, but
    without a render: no render is started only to be thrown away."""
    async def body() -> None:
        renderer = RecordingRenderer(fail={20}, hang={21})
        h = Harness(NumpyEncoder(), renderer, LiveSettings(render_timeout_s=1.0))
        h.session.start(16000, renderer)
        h.session.push_pcm(speech_3s.astype("<i2").tobytes())
        h.session.end_input()
        await h.run_for(5.0)
        assert h.done
        frames = h.frames
        check_stream(frames, 5)
        by_seq = {f.seq: f for f in frames}
        late = {s for s, f in by_seq.items() if f.late}
        assert {20, 21} <= late and min(late) == 20
        assert not by_seq[20].speaking and not by_seq[21].speaking and by_seq[22].speaking
        assert renderer.cancelled == [21]
        assert not (late - {20, 21}) & {slot for slot, _ in renderer.speaking_calls}

    run(body)


def test_a_hung_render_holds_the_stream_only_until_its_deadline(speech_3s: NDArray[np.int16]) -> None:
    async def body() -> None:
        renderer = RecordingRenderer(hang=set(range(75)))  # Triton never answers
        h = Harness(NumpyEncoder(), renderer, LiveSettings(render_timeout_s=0.3, margin_s=0.5))
        h.session.start(16000, renderer)
        h.session.push_pcm(speech_3s.astype("<i2").tobytes())
        await settle()
        first = renderer.speaking_calls[0][0]
        assert [f.seq for f in h.frames] == list(range(first))  # idle slots before it went out
        deadline = first * 0.04 + 0.3  # its pts on the wall clock + render_timeout_s
        await h.run_for(deadline - 0.01)
        assert len(h.frames) == first  # nothing overtakes the slot being rendered
        await h.run_for(0.02)
        assert h.frames[first].late and not h.frames[first].speaking
        assert renderer.cancelled[0] == first
        await h.run_for(1.0)
        check_stream(h.frames, 5)  # the video goes on, late idle frames where renders hang
        assert h.frames[-1].seq >= 30 and not any(f.speaking for f in h.frames)

    run(body)


def test_encoder_failure_sends_the_speaking_slots_late(speech_3s: NDArray[np.int16]) -> None:
    async def body() -> None:
        h = Harness(NumpyEncoder(fail=True), RecordingRenderer())
        h.session.start(16000, h.renderer)
        h.session.push_pcm(speech_3s.astype("<i2").tobytes()[:64000])
        h.session.end_input()
        await h.run_for(3.0)
        assert h.done and len(h.frames) == 50
        check_stream(h.frames, 5)
        assert not any(f.speaking for f in h.frames) and sum(f.late for f in h.frames) > 30
        assert h.renderer.speaking_calls == []

    run(body)


def test_interrupt_makes_the_next_frame_idle(speech_3s: NDArray[np.int16]) -> None:
    async def body() -> None:
        renderer = RecordingRenderer(hang=set(range(10, 40)))  # renders in flight when it comes
        h = Harness(NumpyEncoder(), renderer, LiveSettings(margin_s=2.0, render_timeout_s=5.0))
        h.session.start(16000, renderer)
        h.session.push_pcm(speech_3s.astype("<i2").tobytes())
        await h.run_for(0.1)
        sent = len(h.frames)
        assert sent == 10 and all(f.speaking for f in h.frames[7:])  # the speech starts at 0.28 s
        h.session.interrupt()
        await h.run_for(0.1)
        after = h.frames[sent:]
        assert after and not any(f.speaking or f.late for f in after)
        assert set(renderer.cancelled) == set(range(10, 18))  # the 8 in flight
        h.session.end_input()
        await h.run_for(3.0)
        assert h.done
        check_stream(h.frames, 5)
        assert not any(f.speaking for f in h.frames[sent:])

    run(body)


def test_errors_before_and_after_start_reach_this_session_only(speech_3s: NDArray[np.int16]) -> None:
    async def body() -> None:
        good = Harness(NumpyEncoder(), RecordingRenderer())
        bad = Harness(NumpyEncoder(), RecordingRenderer())
        bad.session.push_pcm(b"\x00\x00")
        bad.session.report(UnknownAvatar("no avatar 'nobody'"))
        good.session.start(16000, good.renderer)
        await settle()
        assert [n.error.split(":")[0] for n in bad.out] == ["bad_request"]  # one notice, both errors
        assert "unknown_avatar: no avatar 'nobody'" in (bad.out[0].error or "")
        bad.session.start(16000, bad.renderer)
        bad.session.push_pcm(b"\x00\x00\x00")
        for piece in chunks(speech_3s.astype("<i2").tobytes(), 640):
            good.session.push_pcm(piece)
            bad.session.push_pcm(piece)
            await good.run_for(0.02)
            bad.clock.advance(0.02)
            await settle()
        assert not any(f.error for f in good.frames)
        assert "3 bytes refused" in bad.frames[0].error
        check_stream(good.frames, 5)
        check_stream(bad.frames, 5)

    run(body)


def test_audio_beyond_the_margin_is_held_and_reading_stops_at_max_held(speech_3s: NDArray[np.int16]) -> None:
    """A TTS burst (3 s in 20 ms chunks, at once): the timeline takes what the margin allows
    (0.5 s + 0.45 s of lookahead), the session holds the rest and accepts more until 1 s is
    held (`max_held_s`), then the reader must wait until the timeline has played that far;
    frames never run beyond the margin, and every slot of the burst is rendered."""
    async def body() -> None:
        h = Harness(NumpyEncoder(), RecordingRenderer(), LiveSettings(margin_s=0.5, max_held_s=1.0))
        h.session.start(16000, h.renderer)
        pieces = list(chunks(speech_3s.astype("<i2").tobytes(), 640))
        read = h.read_burst(pieces)
        assert read * 0.02 == pytest.approx(0.96 + 1.0)  # on the timeline (0.9525 s, whole chunks) + held
        assert h.session.held_s == pytest.approx(1.0)
        waiter = asyncio.ensure_future(h.session.wait_accepts_audio())
        await h.run_for(0.005, step=0.005)
        assert not waiter.done()
        await h.run_for(0.005, step=0.005)  # 0.96 s on the timeline - 0.9525 s: it takes one more
        assert waiter.done() and h.session.accepts_audio() and h.session.held_s == pytest.approx(0.98)
        for piece in pieces[read:]:
            while not h.session.accepts_audio():
                await h.run_for(0.01)
                assert h.frames[-1].pts_s <= h.clock.t - 100.0 + 0.5 + 1e-9  # never beyond the margin
            h.session.push_pcm(piece)
        h.session.end_input()
        await h.run_for(3.0)
        assert h.done
        check_stream(h.frames, 5)
        assert len(h.frames) >= 75 and sum(f.speaking for f in h.frames) > 50
        assert not any(f.late for f in h.frames)

    run(body)


def test_max_held_zero_reads_only_as_the_timeline_takes_audio(speech_3s: NDArray[np.int16]) -> None:
    """`max_held_s = 0`: nothing is read beyond the margin (the reader waits after each message
    the timeline could not take yet), and reading resumes as the timeline plays."""
    async def body() -> None:
        h = Harness(NumpyEncoder(), RecordingRenderer(), LiveSettings(margin_s=0.5, max_held_s=0.0))
        h.session.start(16000, h.renderer)
        read = h.read_burst(list(chunks(speech_3s.astype("<i2").tobytes(), 640)))
        assert read == 49 and h.session.held_s == pytest.approx(0.02)  # 48 taken, 1 held
        await h.run_for(0.03)
        assert h.session.accepts_audio() and h.session.held_s == 0.0

    run(body)


def test_interrupt_behind_a_tts_burst_takes_effect_at_once() -> None:
    """10 s of speech sent at once in 20 ms chunks, then `interrupt` 0.5 s later: the session
    read it at once (the audio was held, not left unread in the transport), the next frame is
    idle, and the held speech is dropped: nothing of it is rendered."""
    async def body() -> None:
        h = Harness(NumpyEncoder(), RecordingRenderer())
        h.session.start(16000, h.renderer)
        pieces = list(chunks(microphone(10.0, talk_s=10.0), 640))
        assert h.read_burst(pieces) == len(pieces)  # 10 s < max_held_s: everything is read at once
        assert h.session.held_s > 8.5
        await h.run_for(0.5)
        assert any(f.speaking for f in h.frames)
        sent = len(h.frames)
        h.session.interrupt()
        assert h.session.held_s == 0.0
        await h.run_for(2.0)
        after = h.frames[sent:]
        assert after and not any(f.speaking or f.late for f in after)
        h.session.end_input()
        await h.run_for(0.5)
        assert h.done and len(h.frames) < 75  # 2.5 s of idle slots, not 10 s of speech
        check_stream(h.frames, 5)

    run(body)


def test_a_long_session_keeps_a_bounded_state(speech_3s: NDArray[np.int16]) -> None:
    """20 s of a microphone (speech and pauses) in real time: what the session holds stays the
    size of the lookahead, not of the stream."""
    async def body() -> None:
        h = Harness(NumpyEncoder(), RecordingRenderer())
        h.session.start(16000, h.renderer)
        turn = np.concatenate([speech_3s, np.zeros(16000 * 2, np.int16)]).astype("<i2").tobytes()
        for _ in range(4):
            await h.speak(turn)
        segment = h.session.timeline._segments[0]  # one open segment: the microphone never paused
        assert segment.start_slot <= 1 and len(h.frames) > 450
        features = segment.features
        assert features._frames.shape[1] < 80 and len(features._rows) <= 17  # < 1 s of mel, one window
        assert len(segment._speaking) < 30  # decisions of the slots not yet planned
        with pytest.raises(IndexError):
            segment.readiness(10)
        check_stream(h.frames, 5)

    run(body)


def test_a_session_slower_than_real_time_catches_up_with_late_idle_frames(
    speech_3s: NDArray[np.int16],
) -> None:
    """Renders take 0.1 s each, one at a time (10 fps for 25 fps of speech): the frames do not
    lag further and further behind the wall clock; the slots that cannot make it are sent idle
    and late, most of them without any render."""
    async def body() -> None:
        settings = LiveSettings(render_timeout_s=0.5)
        h = Harness(NumpyEncoder(), RecordingRenderer(), settings)
        renderer = FixedLatencyRenderer(h.clock, 0.1)
        h.renderer = renderer
        h.session.start(16000, renderer)
        t0 = h.clock.t
        await h.speak(speech_3s.astype("<i2").tobytes())
        h.session.end_input()
        await h.run_for(3.0)
        assert h.done
        frames = h.frames
        assert [f.seq for f in frames] == list(range(len(frames)))
        late = [f for f in frames if f.late]
        speaking = [f for f in frames if f.speaking]
        # the renderer's pace (10 frames/s) is used: about 0.4 of the speech slots are speaking,
        # and few renders are started only to be thrown away
        assert len(speaking) >= 0.3 * (len(speaking) + len(late)) and len(late) > 10
        assert len(renderer.speaking_calls) <= len(speaking) + 15
        # each frame went out by its pts + lookahead + render timeout (+ one 10 ms step)
        worst = max(h.sent_at[f.seq] - (t0 + f.pts_s) for f in frames)
        assert worst <= 0.4525 + 0.5 + 0.1 + 0.01 + 1e-6, worst

    run(body)


def microphone(seconds: float, talk_s: float = 2.0, silence_s: float = 2.0) -> bytes:
    """A microphone in a conversation: LibriVox speech for `talk_s`, digital silence for
    `silence_s`, repeated for `seconds`; 16 kHz PCM."""
    speech = np.concatenate([speech_pcm16(p) for p in speech_paths()])
    n = int(seconds * 16000)
    talking = (np.arange(n) / 16000) % (talk_s + silence_s) < talk_s
    out = np.zeros(n, np.int16)
    out[talking] = np.resize(speech, int(talking.sum()))
    return out.astype("<i2").tobytes()


@pytest.mark.parametrize(("kind", "latency_s", "concurrency"), [
    ("fixed", 0.4, 1), ("fixed", 0.4, 4), ("batching", 0.1, 1), ("batching", 0.2, 1), ("batching", 0.4, 1),
])
def test_a_slow_renderer_shows_speaking_frames_up_to_its_capacity(
    kind: str, latency_s: float, concurrency: int
) -> None:
    """A microphone in real time (2 s talk, 2 s silence, 12 s) against a renderer slower than
    real time, default settings (1 s render deadline): the speaking share of the speech slots
    is near the renderer's capacity, `min(1, 40 ms / latency x concurrency)` (a batching
    renderer: one execution at a time, a batch of b costs b x latency, so concurrency 1), the
    rest go out idle and late, the stream never stalls, and the renderer does not compute
    more frames for nothing than it shows.

    The regression this pins: perf/results/live_load.md once had 0 speaking frames on the CPU
    Triton. The session kept 8 renders in flight, Triton ran them as one batch longer than the
    deadline, every one was given up while Triton computed it, and the session never learnt
    (its estimate only learnt from renders done in time). Before the fix this scenario gave
    2 % (batching, 0.4 s; capacity 10 %) and 8 % (0.2 s; capacity 20 %), with more frames
    thrown away than shown."""
    async def body() -> None:
        h = Harness(NumpyEncoder(), RecordingRenderer())
        renderer: FixedLatencyRenderer | BatchingRenderer = (
            FixedLatencyRenderer(h.clock, latency_s, concurrency)
            if kind == "fixed"
            else BatchingRenderer(h.clock, latency_s)
        )
        h.renderer = renderer
        h.session.start(16000, renderer)
        t0 = h.clock.t
        await h.speak(microphone(12.0))
        h.session.end_input()
        await h.run_for(3.0)
        assert h.done
        frames = h.frames
        check_stream(frames, 5)
        speaking = sum(f.speaking for f in frames)
        speech = speaking + sum(f.late for f in frames)
        capacity = min(1.0, 0.04 / latency_s * concurrency)
        assert speech > 150 and speaking >= 0.5 * capacity * speech, (speaking, speech)
        if isinstance(renderer, BatchingRenderer):
            assert renderer.thrown_away <= speaking + 4, (renderer.thrown_away, speaking)
        # the stream never stalls: each frame went out by its pts + lookahead + render deadline
        worst = max(h.sent_at[f.seq] - (t0 + f.pts_s) for f in frames)
        assert worst <= 0.4525 + 1.0 + 0.1 + 0.01 + 1e-6, worst

    run(body)
