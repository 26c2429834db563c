"""Feature rows and 16-row audio windows of one live segment, as the offline package has them.

The offline builder (`export.package_builder.encode_audio`, docs/REFERENCE.md s.4) computes, for a
whole 16 kHz recording: the mel spectrogram; per 25-fps frame `i` the mel window starting at
mel frame `int(80 i / 25)` (16 frames = 200 ms); the encoder's feature row `f[i]` per window;
and the padded rows `[f[0], f[0], f[1], ..., f[F-1], f[F-1]]` (`aud_ave.npy`). Frame `k` then
uses rows `k-8 .. k+7` (zeros outside), docs/REFERENCE.md s.2 step 6.

`SegmentFeatures` does the same for a signal that arrives in pieces: row `r` of the segment is
`f[max(r - 1, 0)]` (the leading `[first, ...]` padding), computed once the mel frames of its
window exist (`samples_for_row`). A live signal has no end, so there is no trailing padding and
no shifted-back last window: a segment that ends is padded with silence instead
(`gateway.live.segment`); only the rows whose windows reach the end differ from the offline
ones (the last few slots of a recording). Rows are encoded lazily, only for slots that need
a window (speaking slots), through the `AudioEncoder` interface; in the gateway that is
Triton's `audio_encoder`, whose dynamic batcher merges the calls of all sessions.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from gateway.live.mel import IncrementalMel, samples_for_frames
from lipsync.audio import MEL_FRAMES_PER_SECOND
from lipsync.contract import (
    FEATURE_DIM,
    MEL_BANDS,
    MEL_WINDOW,
    VIDEO_FPS,
    WINDOW_AFTER,
    WINDOW_BEFORE,
    WINDOW_ROWS,
)


class AudioEncoder(Protocol):
    """The AVE audio encoder (Triton's `audio_encoder`, or ONNX Runtime in tests)."""

    async def encode(self, mel: NDArray[np.float32]) -> NDArray[np.float32]:
        """Mel windows f32[N, 80, 16] -> feature rows f32[N, 512] (N >= 1).

        Raises:
            Exception: any failure (the session sends the slots concerned as late idle frames).
        """
        ...


def window_start(i: int) -> int:
    """First mel frame of feature `f[i]`'s window: `int(80 i / 25)` (docs/REFERENCE.md s.4)."""
    return (MEL_FRAMES_PER_SECOND * i) // VIDEO_FPS


def feature_index(row: int) -> int:
    """Encoder output behind padded row `row` >= 0: `f[max(row - 1, 0)]` (`[first, rows...]`)."""
    return max(row - 1, 0)


def samples_for_row(row: int) -> int:
    """16 kHz samples of the segment needed before row `row` >= 0 can be computed."""
    return samples_for_frames(window_start(feature_index(row)) + MEL_WINDOW)


def samples_for_window(slot: int) -> int:
    """Samples needed before slot `slot`'s 16-row window (rows `slot-8 .. slot+7`) exists.

    About `640 slot + 7240`: the 7 rows of lookahead (280 ms) plus the encoder's 200 ms mel
    window, less the one-row `[first, ...]` shift; 6600 samples (412.5 ms) after the slot's
    own 40 ms of audio at most.
    """
    return samples_for_row(slot + WINDOW_AFTER)


def window_feature_indices(slot: int) -> list[int]:
    """The distinct encoder outputs `f[i]` that slot `slot`'s window uses, ascending."""
    rows = range(max(slot - WINDOW_BEFORE, 0), slot + WINDOW_AFTER + 1)
    return sorted({feature_index(r) for r in rows})


class SegmentFeatures:
    """Mel frames and encoded feature rows of one continuous 16 kHz signal (module doc)."""

    def __init__(self) -> None:
        self._mel = IncrementalMel()
        self._frames = np.zeros((MEL_BANDS, 0), dtype=np.float32)
        self._first_frame = 0  # mel frame index of self._frames[:, 0]
        self._rows: dict[int, NDArray[np.float32]] = {}  # i -> f[i], f32[512]

    @property
    def samples(self) -> int:
        """16 kHz samples received so far (silence padding included)."""
        return self._mel.samples

    def push(self, samples: NDArray[np.float32]) -> None:
        """Add the next piece of the signal: f32[n] mono 16 kHz in [-1, 1]."""
        new = self._mel.push(samples)
        if new.shape[1]:
            self._frames = np.concatenate([self._frames, new], axis=1)

    def window_ready(self, slot: int) -> bool:
        """True when slot `slot`'s window can be computed (all its mel frames exist)."""
        return self.samples >= samples_for_window(slot)

    def missing(self, slot: int) -> list[int]:
        """Encoder outputs `f[i]` that slot `slot`'s window needs and that are not stored yet."""
        return [i for i in window_feature_indices(slot) if i not in self._rows]

    def mel_windows(self, indices: list[int]) -> NDArray[np.float32]:
        """The encoder inputs of `f[i]` for each `i` in `indices`: f32[len, 80, 16].

        Raises:
            ValueError: a window's mel frames are not all there (not arrived or released).
        """
        out = np.empty((len(indices), MEL_BANDS, MEL_WINDOW), dtype=np.float32)
        for n, i in enumerate(indices):
            lo = window_start(i) - self._first_frame
            if lo < 0 or lo + MEL_WINDOW > self._frames.shape[1]:
                raise ValueError(f"mel window of feature {i} is not available")
            out[n] = self._frames[:, lo : lo + MEL_WINDOW]
        return out

    def store(self, indices: list[int], features: NDArray[np.float32]) -> None:
        """Keep the encoder's outputs: `features` f32[len(indices), 512], row n is `f[indices[n]]`.

        Raises:
            ValueError: wrong shape.
        """
        if features.shape != (len(indices), FEATURE_DIM):
            raise ValueError(f"expected features [{len(indices)}, {FEATURE_DIM}], got {list(features.shape)}")
        for n, i in enumerate(indices):
            self._rows[i] = np.asarray(features[n], dtype=np.float32)

    def window(self, slot: int) -> NDArray[np.float32]:
        """Slot `slot`'s audio window: f32[16, 512], rows `slot-8 .. slot+7`, zeros before row 0.

        Raises:
            KeyError: a needed row was not stored (`missing(slot)` was not encoded).
        """
        out = np.zeros((WINDOW_ROWS, FEATURE_DIM), dtype=np.float32)
        for n in range(WINDOW_ROWS):
            row = slot - WINDOW_BEFORE + n
            if row >= 0:
                out[n] = self._rows[feature_index(row)]
        return out

    def release_before(self, slot: int) -> None:
        """Forget what no slot >= `slot` needs (rows before `slot - 8`, their mel frames)."""
        keep = feature_index(max(slot - WINDOW_BEFORE, 0))
        for i in [i for i in self._rows if i < keep]:
            del self._rows[i]
        drop = window_start(keep) - self._first_frame
        if drop > 0:
            self._frames = self._frames[:, drop:]
            self._first_frame += drop
