"""Audio features of the "ave" audio branch: 16 kHz mono PCM -> mel spectrogram -> mel windows.

Everything here follows docs/REFERENCE.md section 4 (the SyncTalk_2D / Wav2Lip audio front end) and
runs on numpy alone, so the gateway can compute features from live audio without librosa.
Resampling (only needed for WAVs that are not already 16 kHz) imports scipy lazily.

Pipeline (docs/REFERENCE.md s.4):

1. pre-emphasis `y[n] = x[n] - 0.97 x[n-1]` (`y[0] = x[0]`, what `lfilter([1, -0.97], [1], x)`
   computes);
2. STFT magnitude: n_fft 800, hop 200 (12.5 ms, so 80 mel frames per second), periodic Hann
   window of 800 samples, centred frames with `n_fft // 2` zeros padded at both ends (librosa's
   `stft(center=True)` default, `pad_mode="constant"` since librosa 0.10), giving
   `T = 1 + n // 200` frames for `n` samples;
3. 80 Slaney mel filters, 55..7600 Hz, Slaney area normalisation (`librosa.filters.mel(...,
   htk=False, norm="slaney")`, see `mel_filterbank`);
4. `S = 20 * log10(max(1e-5, mel)) - 20` (dB, minus the 20 dB reference level);
5. `clip(8 * (S + 100) / 100 - 4, -4, 4)` (symmetric normalisation to [-4, 4]).
"""

from __future__ import annotations

import logging
import wave
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from lipsync.contract import FEATURE_DIM, MEL_BANDS, MEL_WINDOW, SAMPLE_RATE, VIDEO_FPS

logger = logging.getLogger(__name__)

PREEMPHASIS: float = 0.97
N_FFT: int = 800
HOP_LENGTH: int = 200
WIN_LENGTH: int = 800
FMIN_HZ: float = 55.0
FMAX_HZ: float = 7600.0
MIN_LEVEL_DB: float = -100.0
REF_LEVEL_DB: float = 20.0
MAX_ABS_VALUE: float = 4.0
MEL_FRAMES_PER_SECOND: int = SAMPLE_RATE // HOP_LENGTH
"""80 mel frames per second (hop 200 samples at 16 kHz)."""


class AudioError(ValueError):
    """Audio that cannot be turned into features (wrong format, too short, empty)."""


def pcm16_to_float(data: bytes) -> NDArray[np.float32]:
    """Convert little-endian signed 16-bit PCM bytes to float32 samples.

    Args:
        data: raw PCM, 2 bytes per sample (mono, 16 kHz for the model).

    Returns:
        f32[n] in [-1, 1) (`int16 / 32768`, the scaling librosa/soundfile use).

    Raises:
        AudioError: when `len(data)` is odd (not whole 16-bit samples).
    """
    if len(data) % 2:
        raise AudioError(f"PCM16 data must have an even number of bytes, got {len(data)}")
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def float_to_pcm16(wav: ArrayLike) -> NDArray[np.int16]:
    """Convert float samples in [-1, 1] to int16 (clipped, rounded): i16[n]."""
    samples = np.round(np.asarray(wav, dtype=np.float64) * 32768.0)
    clipped: NDArray[np.float64] = np.clip(samples, -32768, 32767)
    return clipped.astype(np.int16)


def to_mono_16k(samples: ArrayLike, sample_rate: int) -> NDArray[np.float32]:
    """Down-mix to mono and resample to 16 kHz.

    Args:
        samples: f32[n] or f32[n, channels], floats in [-1, 1].
        sample_rate: rate of `samples` in Hz.

    Returns:
        f32[m] mono at `SAMPLE_RATE`; resampled with `scipy.signal.resample_poly` (polyphase
        FIR, Kaiser window) when `sample_rate != 16000`.

    Raises:
        AudioError: on an empty signal or a non-positive rate.
    """
    x = np.asarray(samples, dtype=np.float32)
    if x.ndim == 2:
        x = x.mean(axis=1, dtype=np.float32)
    if x.ndim != 1 or x.size == 0:
        raise AudioError(f"expected a non-empty mono or [n, channels] signal, got shape {x.shape}")
    if sample_rate <= 0:
        raise AudioError(f"sample rate must be positive, got {sample_rate}")
    if sample_rate == SAMPLE_RATE:
        return x
    from math import gcd

    from scipy.signal import resample_poly  # lazy: only the offline side resamples

    g = gcd(int(sample_rate), SAMPLE_RATE)
    y: NDArray[np.float64] = resample_poly(x, SAMPLE_RATE // g, int(sample_rate) // g)
    return y.astype(np.float32)


def load_wav_16k_mono(path: Path | str) -> NDArray[np.float32]:
    """Read a 16-bit PCM WAV file as 16 kHz mono float32.

    Uses the standard-library `wave` reader (no extra dependency); other rates are resampled
    (`to_mono_16k`), several channels are averaged.

    Returns:
        f32[n] in [-1, 1).

    Raises:
        AudioError: missing file, not a WAV, not 16-bit PCM, or no samples.
    """
    path = Path(path)
    try:
        with wave.open(str(path), "rb") as w:
            channels, width, rate, n = (
                w.getnchannels(),
                w.getsampwidth(),
                w.getframerate(),
                w.getnframes(),
            )
            raw = w.readframes(n)
    except FileNotFoundError:
        raise AudioError(f"audio file not found: {path}") from None
    except (wave.Error, EOFError) as exc:
        raise AudioError(f"{path} is not a readable PCM WAV file: {exc}") from None
    if width != 2:
        raise AudioError(f"{path}: expected 16-bit PCM, found {8 * width}-bit samples")
    if n == 0:
        raise AudioError(f"{path}: the WAV file holds no samples")
    x = pcm16_to_float(raw).reshape(-1, channels)
    return to_mono_16k(x if channels > 1 else x[:, 0], rate)


def _hz_to_mel_slaney(hz: ArrayLike) -> NDArray[np.float64]:
    """Slaney's Auditory Toolbox mel scale: linear below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    f_sp = 200.0 / 3.0  # 66.67 Hz per mel on the linear part
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, np.log(6.4) / 27.0
    mel = hz / f_sp
    log_part = hz >= min_log_hz
    mel[log_part] = min_log_mel + np.log(hz[log_part] / min_log_hz) / logstep
    return mel


def _mel_to_hz_slaney(mel: ArrayLike) -> NDArray[np.float64]:
    """Inverse of `_hz_to_mel_slaney`."""
    mel = np.asarray(mel, dtype=np.float64)
    f_sp = 200.0 / 3.0
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, np.log(6.4) / 27.0
    hz = f_sp * mel
    log_part = mel >= min_log_mel
    hz[log_part] = min_log_hz * np.exp(logstep * (mel[log_part] - min_log_mel))
    return hz


def mel_filterbank(
    sample_rate: int = SAMPLE_RATE,
    n_fft: int = N_FFT,
    n_mels: int = MEL_BANDS,
    fmin: float = FMIN_HZ,
    fmax: float = FMAX_HZ,
) -> NDArray[np.float64]:
    """Slaney-style mel filterbank (what `librosa.filters.mel(htk=False, norm="slaney")` builds).

    `n_mels + 2` points equally spaced on Slaney's mel scale between `fmin` and `fmax` give
    triangles `max(0, min((f - f[i]) / (f[i+1] - f[i]), (f[i+2] - f) / (f[i+2] - f[i+1])))` over
    the FFT bin frequencies `f = k * sample_rate / n_fft`; each triangle is scaled by
    `2 / (f[i+2] - f[i])` so that all filters have the same area (Slaney normalisation).

    Returns:
        f64[n_mels, 1 + n_fft // 2].
    """
    fft_hz = np.linspace(0.0, sample_rate / 2.0, 1 + n_fft // 2)
    mel_pts = np.linspace(
        _hz_to_mel_slaney(np.array([fmin]))[0], _hz_to_mel_slaney(np.array([fmax]))[0], n_mels + 2
    )
    hz_pts = _mel_to_hz_slaney(mel_pts)
    fdiff = np.diff(hz_pts)
    ramps = hz_pts[:, None] - fft_hz[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights: NDArray[np.float64] = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (hz_pts[2:] - hz_pts[:-2]))[:, None]
    return weights


_MEL_BASIS = mel_filterbank()
_WINDOW = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(WIN_LENGTH) / WIN_LENGTH)  # periodic Hann


def preemphasis(x: ArrayLike, previous: float = 0.0) -> NDArray[np.float64]:
    """Pre-emphasis `y[n] = x[n] - 0.97 x[n-1]` (docs/REFERENCE.md s.4 step 1).

    Args:
        x: f32/f64[n] samples.
        previous: the sample before `x[0]` (0 at the start of a signal, so `y[0] = x[0]` as
            `lfilter([1, -0.97], [1], x)` computes; the last sample of the previous chunk when a
            signal arrives in pieces).

    Returns:
        f64[n].
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.empty_like(x)
    if x.size:
        y[0] = x[0] - PREEMPHASIS * previous
        np.subtract(x[1:], PREEMPHASIS * x[:-1], out=y[1:])
    return y


def centered_frames(y: ArrayLike) -> NDArray[np.float64]:
    """The STFT frames of a whole signal: `n_fft // 2` zeros padded at both ends, hop 200.

    Args:
        y: f64[n] pre-emphasised signal.

    Returns:
        f64[1 + n // 200, 800], a read-only view: frame j is samples `200 j - 400 .. 200 j + 399`
        of `y` (zeros outside), i.e. librosa's `stft(center=True, pad_mode="constant")` framing.
    """
    padded = np.pad(np.asarray(y, dtype=np.float64), N_FFT // 2, mode="constant")
    return np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP_LENGTH]


def log_mel_frames(frames: ArrayLike) -> NDArray[np.float32]:
    """Steps 2-5 of docs/REFERENCE.md s.4 on STFT frames already cut from the pre-emphasised signal.

    Each frame is multiplied by the periodic Hann window, its |rfft| (401 bins) is mapped onto
    the 80 Slaney mel filters, converted to dB minus the 20 dB reference, normalised and
    clipped to [-4, 4]. Frames are independent, so a signal's spectrogram can be computed a few
    frames at a time (`gateway.live.mel.IncrementalMel`) with the same result.

    Args:
        frames: f64[t, 800] (see `centered_frames`).

    Returns:
        f32[80, t] in [-4, 4].
    """
    magnitude = np.abs(np.fft.rfft(np.asarray(frames, dtype=np.float64) * _WINDOW, axis=1)).T
    mel = _MEL_BASIS @ magnitude
    s_db = 20.0 * np.log10(np.maximum(1e-5, mel)) - REF_LEVEL_DB
    norm = 2 * MAX_ABS_VALUE * (s_db - MIN_LEVEL_DB) / (-MIN_LEVEL_DB) - MAX_ABS_VALUE
    clipped: NDArray[np.float64] = np.clip(norm, -MAX_ABS_VALUE, MAX_ABS_VALUE)
    return clipped.astype(np.float32)


def mel_spectrogram(wav: ArrayLike) -> NDArray[np.float32]:
    """Normalised log-mel spectrogram exactly as docs/REFERENCE.md s.4.

    Args:
        wav: f32[n] mono 16 kHz samples in [-1, 1].

    Returns:
        f32[80, T] in [-4, 4], T = 1 + n // 200 (80 frames per second).

    Raises:
        AudioError: when `wav` is not 1-D or empty.
    """
    x = np.asarray(wav, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise AudioError(f"expected a non-empty 1-D signal, got shape {x.shape}")
    return log_mel_frames(centered_frames(preemphasis(x)))


def mel_frame_count(n_samples: int) -> int:
    """Number of mel frames for `n_samples` at 16 kHz: `1 + n // 200` (centred STFT)."""
    return 1 + int(n_samples) // HOP_LENGTH


def video_frame_count(n_mel: int) -> int:
    """Number of 25-fps windows for `n_mel` mel frames: `int((n_mel - 16) / 80 * 25) + 2`.

    Computed in floating point exactly as the reference writes it (docs/REFERENCE.md s.4), so the
    count equals SyncTalk_2D's even where the exact quotient is an integer and the float
    expression lands just below it.

    Raises:
        AudioError: when `n_mel < 16` (shorter than one window, about 0.19 s of audio).
    """
    if n_mel < MEL_WINDOW:
        raise AudioError(
            f"audio too short: {n_mel} mel frames, at least {MEL_WINDOW} are needed (about 0.2 s)"
        )
    return int((n_mel - MEL_WINDOW) / MEL_FRAMES_PER_SECOND * VIDEO_FPS) + 2


def feature_rows_for_samples(n_samples: int) -> int:
    """Rows of `aud_ave.npy` for `n_samples` of 16 kHz audio: `video_frame_count(...) + 2`."""
    return video_frame_count(mel_frame_count(n_samples)) + 2


def mel_windows(mel: NDArray[np.float32]) -> NDArray[np.float32]:
    """Cut one 80 x 16 mel window per 25-fps video frame (docs/REFERENCE.md s.4).

    Window i starts at mel frame `int(80 * i / 25)`; a window running past the end is shifted
    back to end at the last mel frame.

    Args:
        mel: f32[80, T], T >= 16.

    Returns:
        f32[F, 80, 16], F = `video_frame_count(T)`.

    Raises:
        AudioError: wrong shape or T < 16.
    """
    if mel.ndim != 2 or mel.shape[0] != MEL_BANDS:
        raise AudioError(f"expected a mel spectrogram of shape [80, T], got {mel.shape}")
    n_mel = mel.shape[1]
    count = video_frame_count(n_mel)
    starts = np.minimum((16 * np.arange(count)) // 5, n_mel - MEL_WINDOW)  # int(80 * i / 25)
    idx = starts[:, None] + np.arange(MEL_WINDOW)[None, :]
    return np.ascontiguousarray(mel[:, idx].transpose(1, 0, 2), dtype=np.float32)


def pad_features(feats: NDArray[Any]) -> NDArray[np.float32]:
    """Pad encoder features at both ends by repeating the first and last rows (docs/REFERENCE.md s.4).

    Args:
        feats: f32[F, 512], F >= 1.

    Returns:
        f32[F + 2, 512] = `[feats[0], feats..., feats[-1]]` (what `aud_ave.npy` holds).

    Raises:
        AudioError: wrong shape or no rows.
    """
    if feats.ndim != 2 or feats.shape[0] == 0:
        raise AudioError(f"expected features of shape [F>=1, {FEATURE_DIM}], got {feats.shape}")
    padded: NDArray[Any] = np.concatenate([feats[:1], feats, feats[-1:]], axis=0)
    return padded.astype(np.float32)
