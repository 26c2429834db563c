"""The incremental mel spectrogram: audio in pieces of any size, mel frames as soon as complete.

Fed one signal in pieces, `IncrementalMel` produces exactly the frames
`lipsync.audio.mel_spectrogram` computes over the whole signal (docs/REFERENCE.md s.4), without
recomputing anything:

- pre-emphasis `y[n] = x[n] - 0.97 x[n-1]` carries `x[n-1]` across pieces (`y[0] = x[0]`);
- the STFT is centred: 400 zeros precede the signal, so frame `j` covers samples
  `200 j - 400 .. 200 j + 399`; it is emitted once sample `200 j + 399` has arrived;
- the offline spectrogram's last frames also pad 400 zeros *after* the signal. A live signal
  has no end: a session that flushes or ends appends silence instead (`gateway.live.segment`),
  so those frames differ from the offline ones only where the silence's pre-emphasis meets the
  last sample (the offline padding is added after pre-emphasis).

Only the last 600 pre-emphasised samples (the overlap of consecutive frames) are kept.
"""
from __future__ import annotations

from typing import Final

import numpy as np
from numpy.typing import NDArray

from lipsync.audio import HOP_LENGTH, N_FFT, log_mel_frames, preemphasis
from lipsync.contract import MEL_BANDS

CENTER_PAD: Final[int] = N_FFT // 2
"""Zeros before the first sample (the centred STFT's padding): 400 samples (25 ms)."""


def samples_for_frames(n_frames: int) -> int:
    """Samples (16 kHz) needed before mel frames `0 .. n_frames-1` are complete.

    Frame `j` ends at sample `200 j + 399`, so `200 (n_frames - 1) + 400` samples; 0 for none.
    """
    return 0 if n_frames <= 0 else HOP_LENGTH * (n_frames - 1) + N_FFT - CENTER_PAD


class IncrementalMel:
    """Mel frames of one signal, computed piece by piece (module doc)."""

    def __init__(self) -> None:
        self._previous = 0.0
        self._buffer: NDArray[np.float64] = np.zeros(CENTER_PAD, dtype=np.float64)
        self._frames = 0
        self._samples = 0

    @property
    def frames(self) -> int:
        """Mel frames emitted so far."""
        return self._frames

    @property
    def samples(self) -> int:
        """Samples (16 kHz) received so far."""
        return self._samples

    def push(self, samples: NDArray[np.float32]) -> NDArray[np.float32]:
        """Add the next piece of the signal.

        Args:
            samples: f32[n] mono 16 kHz in [-1, 1]; n may be 0.

        Returns:
            f32[80, t]: the t >= 0 frames completed by this piece, in order (frame indices
            `frames_before .. frames_before + t - 1`).
        """
        x = np.asarray(samples, dtype=np.float64)
        if x.size == 0:
            return np.zeros((MEL_BANDS, 0), dtype=np.float32)
        emphasized = preemphasis(x, self._previous)
        self._previous = float(x[-1])
        self._samples += x.size
        self._buffer = np.concatenate([self._buffer, emphasized])
        count = (self._buffer.size - N_FFT) // HOP_LENGTH + 1 if self._buffer.size >= N_FFT else 0
        if count == 0:
            return np.zeros((MEL_BANDS, 0), dtype=np.float32)
        windows = np.lib.stride_tricks.sliding_window_view(self._buffer, N_FFT)[::HOP_LENGTH][:count]
        out = log_mel_frames(windows)
        self._buffer = self._buffer[count * HOP_LENGTH :].copy()
        self._frames += count
        return out
