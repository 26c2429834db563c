"""Live audio input on real speech: PCM validation, streaming resampling, incremental mel, VAD.

No server, no model: `gateway.live.pcm`, `gateway.live.mel`, `gateway.live.vad` on LibriVox
recordings, compared with the offline functions of `lipsync.audio` on the whole signal.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soxr
from numpy.typing import NDArray
from scipy.signal import resample_poly

from gateway.errors import BadRequest
from gateway.live.mel import IncrementalMel, samples_for_frames
from gateway.live.pcm import PcmResampler, check_sample_rate, decode_pcm16
from gateway.live.types import SLOT_SAMPLES
from gateway.live.vad import SlotVad, SpeechGate, VadParams
from lipsync.audio import load_wav_16k_mono, mel_spectrogram, pcm16_to_float
from tests.fixtures_live import speech_paths, speech_pcm16


def pieces(x: NDArray[np.float32], size: int) -> list[NDArray[np.float32]]:
    return [x[i : i + size] for i in range(0, len(x), size)]


# ----------------------------------------------------------------------------- PCM input
@pytest.mark.parametrize("rate", [8000, 11025, 16000, 22050, 44100, 48000])
def test_accepted_sample_rates(rate: int) -> None:
    assert check_sample_rate(rate) == rate


@pytest.mark.parametrize("rate", [0, 7999, 48001, 96000])
def test_refused_sample_rates_name_the_range(rate: int) -> None:
    with pytest.raises(BadRequest, match=r"8000\.\.48000 Hz") as info:
        check_sample_rate(rate)
    assert str(info.value).startswith("bad_request: ")


def test_odd_byte_count_is_refused_whole() -> None:
    assert decode_pcm16(b"").size == 0
    assert decode_pcm16(np.array([-32768, 0, 32767], "<i2").tobytes()).tolist() == [-1.0, 0.0, 32767 / 32768]
    with pytest.raises(BadRequest, match=r"odd|even number of bytes"):
        decode_pcm16(b"\x00\x01\x02")


def test_16k_input_passes_through_unchanged(speech_path: Path) -> None:
    pcm = speech_pcm16(speech_path)
    x = pcm16_to_float(pcm.tobytes())
    r = PcmResampler(16000)
    out = np.concatenate([r.push(p) for p in pieces(x, 999)] + [r.drain()])
    assert np.array_equal(out, x)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_resampled_speech_matches_the_16k_original(rate: int, speech_path: Path) -> None:
    """A client at another rate: the 16 kHz LibriVox speech, converted to `rate` (scipy), streamed
    in odd-sized chunks, comes back as the original (within the resamplers' passbands)."""
    original = pcm16_to_float(speech_pcm16(speech_path).tobytes()).astype(np.float64)
    from math import gcd

    g = gcd(rate, 16000)
    at_rate = resample_poly(original, rate // g, 16000 // g).astype(np.float32)
    r = PcmResampler(rate)
    out = np.concatenate([r.push(p) for p in pieces(at_rate, 777)] + [r.drain()])
    whole = soxr.resample(at_rate, rate, 16000, quality="HQ")
    assert abs(len(out) - len(original)) <= 1
    n = min(len(out), len(whole))
    assert np.max(np.abs(out[:n] - whole[:n])) < 1e-6  # chunking leaves no trace
    n = min(len(out), len(original))
    err = out[:n] - original[:n]
    # 8 kHz keeps only 0-4 kHz of the speech; above that the round trip is near-transparent
    limit_db = -10.0 if rate == 8000 else -30.0
    assert 10 * np.log10(np.mean(err**2) / np.mean(original**2)) < limit_db


def test_drain_restarts_the_stream() -> None:
    x = np.random.default_rng(0).uniform(-0.5, 0.5, 4800).astype(np.float32)
    r = PcmResampler(48000)
    first = np.concatenate([r.push(x), r.drain()])
    second = np.concatenate([r.push(x), r.drain()])
    assert len(first) == 1600 and np.array_equal(first, second)


# ----------------------------------------------------------------------------- mel
@pytest.mark.parametrize("size", [1, 320, 999, 16000])
def test_incremental_mel_equals_the_whole_signal_spectrogram(size: int, speech_path: Path) -> None:
    x = pcm16_to_float(speech_pcm16(speech_path).tobytes())
    offline = mel_spectrogram(x)  # [80, 1 + n // 200]
    mel = IncrementalMel()
    parts = []
    for p in pieces(x, size):
        new = mel.push(p)
        parts.append(new)
        # a frame is emitted exactly when its last sample has arrived, never before
        assert samples_for_frames(mel.frames) <= mel.samples < samples_for_frames(mel.frames + 1)
    live = np.concatenate(parts, axis=1)
    # every frame whose window lies inside the signal; the last 2 need the end padding
    assert live.shape[1] == offline.shape[1] - 2 == len(x) // 200 - 1
    assert np.max(np.abs(live - offline[:, : live.shape[1]])) < 1e-5


def test_mel_of_appended_silence_differs_only_at_the_end(speech_path: Path) -> None:
    """A flushed segment pads with silence: the frames touching the end differ from the
    offline end padding, the others are the same."""
    x = pcm16_to_float(speech_pcm16(speech_path).tobytes())
    offline = mel_spectrogram(x)
    mel = IncrementalMel()
    live = np.concatenate([mel.push(x), mel.push(np.zeros(800, np.float32))], axis=1)
    diff = np.max(np.abs(live[:, : offline.shape[1]] - offline), axis=0)
    assert np.all(diff[:-3] < 1e-5)


# ----------------------------------------------------------------------------- VAD
def run_vad(x: NDArray[np.float32], params: VadParams | None = None) -> tuple[list[bool], list[bool]]:
    """Voiced flags and gate decisions for the whole signal (the gate's tail closed with
    unvoiced slots, as the silence padding of a flush does)."""
    params = params or VadParams()
    flags = SlotVad(params).push(x.astype(np.float32))
    decisions = SpeechGate(params).push(flags + [False] * (params.onset_slots - 1))
    assert len(decisions) == len(flags) == len(x) // SLOT_SAMPLES
    return flags, decisions


def test_vad_marks_librivox_speech_speaking() -> None:
    for path in speech_paths():
        _, speaking = run_vad(load_wav_16k_mono(path))
        share = np.mean(speaking)
        assert share > 0.85, f"{path.name}: only {share:.0%} of the speech marked speaking"


def test_vad_keeps_digital_silence_idle() -> None:
    flags, speaking = run_vad(np.zeros(16000 * 2, np.float32))
    assert not any(flags) and not any(speaking)


def test_vad_stops_after_speech_within_the_hangover(speech_path: Path) -> None:
    speech = load_wav_16k_mono(speech_path)
    flags, speaking = run_vad(np.concatenate([speech, np.zeros(32000, np.float32)]))
    speech_slots = len(speech) // SLOT_SAMPLES
    assert np.mean(speaking[:speech_slots]) > 0.85
    last_voiced = max(i for i, f in enumerate(flags) if f)
    assert last_voiced < speech_slots + 1
    hang = VadParams().hangover_slots
    assert all(speaking[last_voiced : last_voiced + hang + 1])  # held through the hangover
    assert not any(speaking[last_voiced + hang + 1 :])  # then idle: 2 s of silence stay idle


def _slots(pattern: str) -> list[bool]:
    """One flag per slot: ``x`` voiced / speaking, ``.`` not (``"x.."`` -> [True, False, False])."""
    return [c == "x" for c in pattern]


def test_gate_needs_an_onset_run_and_holds_the_hangover() -> None:
    params = VadParams(onset_slots=3, hangover_slots=2)
    flags = _slots("xx..") + _slots("xxx.x...") + _slots("x...")
    out = SpeechGate(params).push(flags)
    assert len(out) == len(flags) - 2  # decisions trail the flags by onset_slots - 1
    assert out == (
        _slots("....")  # a 2-slot burst does not start speech
        + _slots("xxxxxxx.")  # a 3-slot run does; the gap within the hangover is bridged
        + _slots("..")  # a lone voiced slot after the hangover ran out does not restart it
    )
