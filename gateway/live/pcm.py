"""Live audio input: 16-bit little-endian mono PCM at 8-48 kHz -> float32 16 kHz samples.

A session declares its sample rate once (`check_sample_rate`); every PCM message must hold
whole samples (`decode_pcm16`: a message with an odd number of bytes is refused whole, so a
bad message cannot shift every later sample by one byte); `PcmResampler` converts to 16 kHz
with soxr's streaming resampler (libsoxr "HQ": 20-bit precision, passband to 91 % of Nyquist),
so chunk boundaries leave no trace. At 16 kHz soxr passes samples through unchanged.
"""
from __future__ import annotations

from typing import Final

import numpy as np
import soxr
from numpy.typing import NDArray

from gateway.errors import BadRequest
from lipsync.audio import pcm16_to_float
from lipsync.contract import SAMPLE_RATE

MIN_SAMPLE_RATE_HZ: Final[int] = 8_000
"""Lowest accepted input rate (Hz): telephone audio."""
MAX_SAMPLE_RATE_HZ: Final[int] = 48_000
"""Highest accepted input rate (Hz): browsers' usual capture rate."""

_EMPTY: Final[NDArray[np.float32]] = np.zeros(0, dtype=np.float32)


def check_sample_rate(sample_rate_hz: int) -> int:
    """Validate a session's declared input rate.

    Args:
        sample_rate_hz: samples per second of the session's PCM (Hz).

    Returns:
        The rate, unchanged.

    Raises:
        BadRequest: the rate is outside 8000..48000 Hz.
    """
    if not MIN_SAMPLE_RATE_HZ <= sample_rate_hz <= MAX_SAMPLE_RATE_HZ:
        raise BadRequest(
            f"sample_rate_hz must be {MIN_SAMPLE_RATE_HZ}..{MAX_SAMPLE_RATE_HZ} Hz "
            f"(16-bit little-endian mono PCM), got {sample_rate_hz}"
        )
    return sample_rate_hz


def decode_pcm16(data: bytes) -> NDArray[np.float32]:
    """One PCM message -> float samples.

    Args:
        data: 16-bit little-endian mono PCM; any number of whole samples (0 included).

    Returns:
        f32[len(data) // 2] in [-1, 1) (`int16 / 32768`, as `lipsync.audio.pcm16_to_float`).

    Raises:
        BadRequest: `len(data)` is odd (the message is refused whole, nothing of it is used).
    """
    if len(data) % 2:
        raise BadRequest(
            f"PCM message of {len(data)} bytes refused: 16-bit PCM needs an even number of "
            "bytes (whole samples)"
        )
    return pcm16_to_float(data)


class PcmResampler:
    """Streaming conversion of one continuous signal to 16 kHz.

    Args:
        sample_rate_hz: input rate (Hz), already checked by `check_sample_rate`.

    The output lags the input by the filter delay (about 0.7 ms at 48 kHz) until `drain`
    flushes it; output sample `m` is at time `m / 16000` s of the input, whatever the chunking.
    """

    def __init__(self, sample_rate_hz: int) -> None:
        self.sample_rate_hz = sample_rate_hz
        self._stream = soxr.ResampleStream(sample_rate_hz, SAMPLE_RATE, 1, dtype="float32", quality="HQ")

    def push(self, samples: NDArray[np.float32]) -> NDArray[np.float32]:
        """Resample the next piece: f32[n] at the input rate -> f32[m] at 16 kHz (m may be 0)."""
        return np.asarray(self._stream.resample_chunk(samples), dtype=np.float32)

    def drain(self) -> NDArray[np.float32]:
        """End the signal: return the samples still inside the filter (f32[m], 16 kHz).

        The resampler is then ready for a new, independent signal.
        """
        tail = np.asarray(self._stream.resample_chunk(_EMPTY, last=True), dtype=np.float32)
        self._stream.clear()
        return tail
