"""Incremental live features equal the offline package's (issue 10), on real speech.

A LibriVox recording is sent as PCM in chunks of 1, 320, 999 and 16000 samples through a live
segment (PCM decode, streaming resampler, incremental mel, per-slot windows) and encoded with
the same ONNX audio encoder the package builder uses; every slot's feature row must equal row
`k` of what `export.package_builder.encode_audio` computes for the whole file (`aud_ave.npy`),
to 1e-4, except the last 8 slots, where the recording ends (the live side pads with silence,
the offline side shifts its last window back and repeats the last row).
"""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray

from export.package_builder import encode_audio
from gateway.live.features import (
    SegmentFeatures,
    samples_for_window,
    window_feature_indices,
)
from gateway.live.pcm import decode_pcm16
from gateway.live.segment import AudioSegment
from gateway.live.types import SLOT_SAMPLES
from gateway.live.vad import VadParams
from lipsync.contract import WINDOW_AFTER
from lipsync.frames import audio_window
from tests.fixtures_live import OrtEncoder, chunks, speech_pcm16

Reference = tuple[NDArray[np.int16], NDArray[np.float32]]
"""(i16[n] PCM, f32[M, 512] `aud_ave.npy`) of one recording."""
TOLERANCE = 1e-4
END_SLOTS_EXCEPTED = 8


@pytest.fixture(scope="module")
def reference(audio_encoder_onnx: Path, speech_path: Path) -> Reference:
    """(i16[n] PCM, f32[M, 512] `aud_ave.npy`) as the package builder computes them."""
    pcm = speech_pcm16(speech_path)
    return pcm, encode_audio(audio_encoder_onnx, pcm, progress=False)


def encode_all(features: SegmentFeatures, slots: int, encoder: OrtEncoder) -> NDArray[np.float32]:
    """Windows f32[slots, 16, 512] of every slot, rows encoded as the session does."""
    out = []
    for j in range(slots):
        missing = features.missing(j)
        if missing:
            features.store(missing, asyncio.run(encoder.encode(features.mel_windows(missing))))
        out.append(features.window(j))
    return np.stack(out)


@pytest.mark.parametrize("chunk_samples", [1, 320, 999, 16000])
def test_live_rows_equal_the_package_rows(
    chunk_samples: int, reference: Reference, ort_encoder: OrtEncoder
) -> None:
    pcm, aud_ave = reference
    segment = AudioSegment(0, 16000, VadParams(), now=0.0)
    started = time.perf_counter()
    for piece in chunks(pcm.astype("<i2").tobytes(), 2 * chunk_samples):
        segment.push(decode_pcm16(piece), now=0.0)
    segment.seal(now=0.0)
    feed_s = time.perf_counter() - started
    slots = segment.slot_limit
    assert slots == -(-len(pcm) // SLOT_SAMPLES)
    windows = encode_all(segment.features, slots, ort_encoder)

    m = len(aud_ave)
    compared = m - END_SLOTS_EXCEPTED
    assert slots >= m  # the live session covers every servable frame of the recording
    rows = windows[:compared, 8]  # row k of slot k's window is slot k's own feature row
    row_diff = float(np.max(np.abs(rows - aud_ave[:compared])))
    # whole windows (rows k-8 .. k+7, zeros before row 0) of the slots whose rows all compare
    full = compared - WINDOW_AFTER
    offline_windows = np.stack([audio_window(aud_ave, k) for k in range(full)])
    window_diff = float(np.max(np.abs(windows[:full] - offline_windows)))
    print(f"chunk {chunk_samples} samples: {compared} slots, max |row diff| {row_diff:.2e}, "
          f"max |window diff| {window_diff:.2e}, fed in {feed_s:.2f} s")
    assert row_diff < TOLERANCE
    assert window_diff < TOLERANCE
    assert np.abs(aud_ave).max() > 0.1  # the comparison is between real, non-zero features


def test_rows_are_encoded_once_and_forgotten_when_passed(
    reference: Reference, ort_encoder: OrtEncoder
) -> None:
    pcm, _ = reference
    features = SegmentFeatures()
    x = decode_pcm16(pcm.astype("<i2").tobytes())
    features.push(x[: samples_for_window(20) - 1])
    assert not features.window_ready(20) and features.window_ready(19)
    features.push(x[samples_for_window(20) - 1 : samples_for_window(20)])
    assert features.window_ready(20)
    # slot 20 needs f[11] .. f[26] (rows 12 .. 27); slot 21 one more
    assert features.missing(20) == window_feature_indices(20) == list(range(11, 27))
    features.store(
        features.missing(20), asyncio.run(ort_encoder.encode(features.mel_windows(features.missing(20))))
    )
    assert features.missing(20) == []
    features.push(x[samples_for_window(20) : samples_for_window(21)])
    assert features.missing(21) == [27]
    features.release_before(21)
    with pytest.raises(ValueError):
        features.mel_windows([11])  # released: slot 21 needs rows from 13 on, f[12] on
    assert features.missing(21) == [27]
