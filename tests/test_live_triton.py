"""Live sessions end to end: the gateway against the real CPU tritonserver, real LibriVox
speech, both transports (the issue's "Done when" list).

The gateway here gives renders and audio encoding a long deadline (120 s): this 2-core CPU
renders ~10 UNet frames/s when idle and 1-3 frames/s under the load of the shared machine
(load average 6-12), slower than the 25 fps of speech, so 3 s of speech takes up to a minute
to render; the tests assert what the session does (slots, speaking frames, Triton calls), not
how fast. Pacing under overload (late slots, the render admission) is
`tests/test_live_session.py`'s and `perf/live_load.py`'s. "The stream closes within 2 s of the
end of input" is asserted as: within 2 s of the later of the end of input and the last speaking
frame (the CPU finishes rendering the speech after the input has ended).
"""
from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.live.session import LiveSession
from gateway.live.settings import LiveSettings
from lipsync.frames import pingpong_index
from lipsync.package import write_package
from perf.live_clients import Audio, Command, Pause, SessionRecord, Step, Transport, run_session
from tests.fixtures_gateway import RunningGateway, gateway_settings, make_packages_root
from tests.fixtures_live import speech_paths, speech_pcm16
from tests.fixtures_packages import synthetic_package_arrays, untrained_weights
from tests.triton_stats import settled_counts

pytestmark = pytest.mark.triton

UNET = "lipsync_demo"
OTHER = "other"
"""A second avatar: 10 synthetic video frames served by the demo's Triton model."""


@pytest.fixture(scope="module")
def live_gateway(
    triton_server: Any, demo_package: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    from lipsync.package import SourceMedia

    root = make_packages_root(Path(demo_package.root), tmp_path_factory.mktemp("live_packages"))
    arrays = synthetic_package_arrays()
    write_package(
        root / OTHER, name=OTHER, model_name=UNET, weights=untrained_weights(),
        source=SourceMedia(video="synthetic gradient", audio="LibriVox speech (1 s)", video_fps=25.0,
                           video_frames=10, video_width=64, video_height=48, audio_sample_rate=16000),
        **arrays,
    )
    running = RunningGateway(
        gateway_settings(
            triton_server.grpc_url, root, live=LiveSettings(render_timeout_s=120.0, encoder_timeout_s=120.0)
        )
    ).start()
    try:
        yield running
    finally:
        running.stop()


def address(gateway: RunningGateway, transport: str) -> str:
    return gateway.grpc_address if transport == "grpc" else gateway.http_url


def speech(seconds: float, rate: int = 16000) -> bytes:
    pcm = speech_pcm16(speech_paths()[1])[: int(16000 * seconds)]
    if rate != 16000:
        import soxr

        pcm = soxr.resample(pcm, 16000, rate)
    return pcm.astype("<i2").tobytes()


def check_slots(record: SessionRecord, video_frames: int) -> None:
    assert not record.error, record.error
    seqs = [f.seq for f in record.slots]
    assert seqs == list(range(len(seqs))), "slots numbered 0.. without gaps"
    for f in record.slots:
        assert f.pts_s == pytest.approx(f.seq * 0.04, abs=1e-9)
        assert f.video_frame == pingpong_index(f.seq, video_frames)
        assert f.frame.jpeg[:2] == b"\xff\xd8" and not f.late


def closes_promptly(record: SessionRecord) -> None:
    spoken = [r.at for r in record.frames if r.frame.speaking]
    assert record.closed_at - max([record.ended_at, *spoken]) < 2.0


def unet_count(triton: Any) -> int:
    """The UNet's inference count once no execution has ended for 2 s: an execution still
    running for an earlier test (the browser test stops mid-speech) ends after a quick read,
    and a UNet execution takes up to ~1 s on a loaded 2-core machine."""
    return settled_counts(triton.grpc_url, UNET, step_s=2.0)[0]


@pytest.mark.parametrize("transport", ["grpc", "ws"])
def test_speech_then_nothing_then_end(
    live_gateway: RunningGateway, triton_server: Any, transport: Transport
) -> None:
    """3 s of speech in 20 ms chunks (48 kHz over the WebSocket, as a browser sends), 2 s of
    nothing, end of input."""
    rate = 16000 if transport == "grpc" else 48000
    before = unet_count(triton_server)
    script: list[Step] = [Audio(speech(3.0, rate)), Pause(2.0)]
    record = asyncio.run(
        run_session(transport, address(live_gateway, transport), "demo", rate, script, chunk_ms=20)
    )
    check_slots(record, 100)
    slots = record.slots
    assert len(slots) >= 75 and not record.notices
    speaking = [f for f in slots if f.speaking]
    first, last = speaking[0].seq, speaking[-1].seq
    # the speech covers slots ~1..76 (its first words start ~0.2 s in); the VAD's onset (3 slots)
    # and hangover (8 slots) bound the speaking run
    assert first <= 15 and last >= 70 and len(speaking) >= 55, (first, last, len(speaking))
    assert not any(f.speaking for f in slots[last + 1 :]) and len(slots) - last > 30  # idle after
    closes_promptly(record)
    assert unet_count(triton_server) - before == len(speaking), "one UNet inference per speaking frame"


def test_digital_silence_is_all_idle_without_inference(
    live_gateway: RunningGateway, triton_server: Any
) -> None:
    before = unet_count(triton_server)
    record = asyncio.run(run_session("ws", live_gateway.http_url, "demo", 16000, [Audio(bytes(64000))]))
    check_slots(record, 100)
    assert len(record.slots) >= 50 and not any(f.speaking for f in record.slots)
    assert record.closed_at - record.ended_at < 2.0
    assert unet_count(triton_server) == before


def test_interrupt_during_speech(live_gateway: RunningGateway, monkeypatch: pytest.MonkeyPatch) -> None:
    read_at: list[int] = []  # frames sent when the server read the interrupt
    speaking_in_flight: list[int] = []  # speaking slots planned, not yet sent, at that moment

    original = LiveSession.interrupt

    def interrupt(self: LiveSession) -> None:
        read_at.append(self.sent)
        speaking_in_flight.append(self.speaking_in_flight)
        original(self)

    monkeypatch.setattr(LiveSession, "interrupt", interrupt)
    script: list[Step] = [Audio(speech(2.0)), Command("interrupt"), Pause(1.0)]
    record = asyncio.run(run_session("grpc", live_gateway.grpc_address, "demo", 16000, script))
    check_slots(record, 100)
    assert len(read_at) == 1
    assert speaking_in_flight[0] > 0 or any(f.speaking for f in record.slots[: read_at[0]]), (
        "it interrupted speech"
    )
    after = record.slots[read_at[0] :]
    assert after and not after[0].speaking, "the next frame after the server read the interrupt is idle"
    assert not any(f.speaking for f in after)


def test_two_avatars_at_once_and_a_bad_session_beside_a_good_one(live_gateway: RunningGateway) -> None:
    bad_script: list[Step] = [Audio(b"\x01\x02\x03", paced=False), Pause(0.5), Audio(speech(0.5)), Pause(0.3)]

    async def sessions() -> list[SessionRecord]:
        return list(await asyncio.gather(
            run_session("grpc", live_gateway.grpc_address, "demo", 16000, [Audio(speech(2.0)), Pause(0.5)]),
            run_session("ws", live_gateway.http_url, OTHER, 16000, [Audio(speech(2.0)), Pause(0.5)]),
            run_session("ws", live_gateway.http_url, "nobody", 16000, [Audio(speech(0.5))]),
            run_session("ws", live_gateway.http_url, "demo", 96000, bad_script),
            run_session("grpc", live_gateway.grpc_address, "demo", 16000, bad_script),
        ))

    demo, other, unknown, bad_rate, odd = asyncio.run(sessions())
    for good, n in ((demo, 100), (other, 10)):
        check_slots(good, n)
        assert not good.notices and not any(f.error for f in good.slots)
        assert len(good.slots) >= 60 and sum(f.speaking for f in good.slots) >= 30
    assert {f.frame.bounds for f in other.slots} != {f.frame.bounds for f in demo.slots}
    # the bad ones got their errors and no frames (never started) or their slots in order
    assert not unknown.slots and any("unknown_avatar" in n for n in unknown.notices)
    assert not bad_rate.slots and any("sample_rate_hz must be 8000..48000" in n for n in bad_rate.notices)
    check_slots(odd, 100)
    # the refusal rides on the first slot planned after the server read the 3 bytes: slot 0,
    # or a later one when slot 0 was planned first (a loaded machine); well before the speech
    errors = [(f.seq, f.error) for f in odd.slots if f.error]
    assert len(errors) == 1 and "3 bytes refused" in errors[0][1] and errors[0][0] < 12, errors
