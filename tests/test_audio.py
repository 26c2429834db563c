"""Audio features (lipsync/audio.py) against librosa on real speech (docs/REFERENCE.md s.4)."""

from __future__ import annotations

import wave
from pathlib import Path

import librosa
import numpy as np
import pytest
import soundfile
from numpy.typing import NDArray

from lipsync import audio
from lipsync.paths import SPEECH_DIR

SPEECH_FILES = sorted(SPEECH_DIR.glob("*.wav"))
pytestmark = pytest.mark.skipif(
    not SPEECH_FILES, reason=f"no speech WAVs in {SPEECH_DIR} (install pocketsphinx-testdata)"
)


def _librosa_mel(wav: NDArray[np.float32]) -> NDArray[np.float64]:
    """The reference computation with librosa (Wav2Lip / SyncTalk_2D `audio.py` parameters)."""
    emphasized = np.concatenate([wav[:1], wav[1:] - 0.97 * wav[:-1]])
    spec = np.abs(librosa.stft(y=emphasized, n_fft=800, hop_length=200, win_length=800))
    basis = librosa.filters.mel(
        sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600, htk=False, norm="slaney"
    )
    s_db = 20 * np.log10(np.maximum(1e-5, basis @ spec)) - 20
    return np.clip(8 * (s_db + 100) / 100 - 4, -4, 4)


@pytest.mark.slow  # imports librosa (numba JIT): ~20 s on 2 cores
def test_filterbank_matches_librosa_slaney() -> None:
    ref = librosa.filters.mel(
        sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600, htk=False, norm="slaney"
    )
    ours = audio.mel_filterbank()
    assert ours.shape == ref.shape == (80, 401)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("path", SPEECH_FILES[:2], ids=lambda p: p.name)
def test_mel_matches_librosa_on_real_speech(path: Path) -> None:
    wav, rate = soundfile.read(path, dtype="float32")
    assert rate == 16000 and wav.ndim == 1
    ours = audio.mel_spectrogram(wav)
    ref = _librosa_mel(wav)
    assert ours.dtype == np.float32
    assert ours.shape == ref.shape == (80, 1 + len(wav) // 200)
    assert np.abs(ours - ref).max() < 1e-3
    # real speech spans the normalised range: not a constant or clipped-flat output
    assert ours.min() < -3.0 and ours.max() > 0.0 and ours.std() > 0.5


def test_load_wav_matches_soundfile() -> None:
    path = SPEECH_FILES[0]
    ref, _ = soundfile.read(path, dtype="float32")
    np.testing.assert_array_equal(audio.load_wav_16k_mono(path), ref)


def test_load_wav_resamples_and_downmixes(tmp_path: Path) -> None:
    speech, _ = soundfile.read(SPEECH_FILES[0], dtype="float32")
    at_48k = librosa.resample(speech, orig_sr=16000, target_sr=48000)
    stereo = np.stack([at_48k, at_48k], axis=1)
    path = tmp_path / "stereo48k.wav"
    soundfile.write(path, stereo, 48000, subtype="PCM_16")
    back = audio.load_wav_16k_mono(path)
    assert abs(len(back) - len(speech)) <= 1
    n = min(len(back), len(speech))
    assert np.corrcoef(back[:n], speech[:n])[0, 1] > 0.99


def test_load_wav_errors(tmp_path: Path) -> None:
    with pytest.raises(audio.AudioError, match="not found"):
        audio.load_wav_16k_mono(tmp_path / "nope.wav")
    bogus = tmp_path / "bogus.wav"
    bogus.write_bytes(b"this is not a wav file at all")
    with pytest.raises(audio.AudioError, match="not a readable PCM WAV"):
        audio.load_wav_16k_mono(bogus)
    eight_bit = tmp_path / "u8.wav"
    with wave.open(str(eight_bit), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(1)
        w.setframerate(16000)
        w.writeframes(bytes(range(256)))
    with pytest.raises(audio.AudioError, match="expected 16-bit PCM, found 8-bit"):
        audio.load_wav_16k_mono(eight_bit)


def test_pcm16_to_float() -> None:
    data = np.array([0, 16384, -32768, 32767], dtype="<i2").tobytes()
    np.testing.assert_array_equal(
        audio.pcm16_to_float(data), np.array([0.0, 0.5, -1.0, 32767 / 32768], dtype=np.float32)
    )
    with pytest.raises(audio.AudioError, match="even number of bytes"):
        audio.pcm16_to_float(b"\x00\x01\x02")
    x = np.array([0.0, 0.5, -1.0, 1.5], dtype=np.float32)
    np.testing.assert_array_equal(audio.float_to_pcm16(x), np.array([0, 16384, -32768, 32767]))


def test_mel_windows_follow_reference_indexing() -> None:
    wav, _ = soundfile.read(SPEECH_FILES[0], dtype="float32")
    mel = audio.mel_spectrogram(wav)
    n_mel = mel.shape[1]
    windows = audio.mel_windows(mel)
    count = int((n_mel - 16) / 80.0 * 25) + 2
    assert windows.shape == (count, 80, 16) and windows.dtype == np.float32
    for i in (0, 1, 7, count // 2, count - 2, count - 1):
        start = int(80.0 * i / 25)
        expected = mel[:, start : start + 16] if start + 16 <= n_mel else mel[:, n_mel - 16 :]
        np.testing.assert_array_equal(windows[i], expected)
    # a window that would run past the end is shifted back to end at the last mel frame
    cut = next(
        t for t in range(n_mel, 16, -1) if int(80.0 * (int((t - 16) / 80 * 25) + 1) / 25) + 16 > t
    )
    short = mel[:, :cut]
    last = audio.mel_windows(short)[-1]
    assert int(80.0 * (len(audio.mel_windows(short)) - 1) / 25) + 16 > short.shape[1]
    np.testing.assert_array_equal(last, short[:, -16:])


def test_frame_count_formula_is_the_reference_float_expression() -> None:
    # 384 mel frames: (384 - 16) / 80 * 25 is 115 exactly but 114.999... in floating point;
    # the reference (and SyncTalk_2D) truncate the float, which gives 114 + 2.
    assert audio.video_frame_count(384) == 116
    assert audio.video_frame_count(16) == 2
    assert audio.mel_frame_count(16000) == 81
    assert audio.feature_rows_for_samples(16000 * 4) == int((321 - 16) / 80 * 25) + 4
    with pytest.raises(audio.AudioError, match="too short"):
        audio.mel_windows(np.zeros((80, 15), dtype=np.float32))


def test_pad_features_repeats_first_and_last_rows() -> None:
    feats = np.arange(3 * 512, dtype=np.float32).reshape(3, 512)
    padded = audio.pad_features(feats)
    assert padded.shape == (5, 512) and padded.dtype == np.float32
    np.testing.assert_array_equal(padded[0], feats[0])
    np.testing.assert_array_equal(padded[1:4], feats)
    np.testing.assert_array_equal(padded[4], feats[2])
    with pytest.raises(audio.AudioError):
        audio.pad_features(np.zeros((0, 512), dtype=np.float32))
