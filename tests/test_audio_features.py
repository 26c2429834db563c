"""Live-audio checks and windows of `gateway.audio_features`, with the fake Triton's encoder
(the mel side is checked against the reference rule in tests/test_grpc.py)."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
from numpy.typing import NDArray

from gateway.audio_features import (
    CHUNK_BYTES,
    WINDOW_CHUNK_BYTES,
    AudioFeatureExtractor,
    FeatureWindow,
    WindowChunks,
    check_chunks,
    check_window_chunks,
    chunks_for_frames,
    pcm_mel_windows,
)
from gateway.errors import BadRequest
from tests.fake_triton import fake_triton, slice_encoder


def speechlike(chunks: int, seed: int = 0) -> list[bytes]:
    pcm = (
        (np.random.default_rng(seed).standard_normal(chunks * CHUNK_BYTES // 2) * 3000)
        .astype("<i2")
        .tobytes()
    )
    return [pcm[i : i + CHUNK_BYTES] for i in range(0, len(pcm), CHUNK_BYTES)]


def test_sizes() -> None:
    assert (CHUNK_BYTES, WINDOW_CHUNK_BYTES) == (1280, 20480)
    assert [chunks_for_frames(f) for f in (1, 3, 256)] == [16, 18, 271]


@pytest.mark.parametrize(
    ("chunks", "frames", "message"),
    [
        ([bytes(CHUNK_BYTES)] * 18, 0, "frame_count must be >= 1, got 0"),
        ([bytes(CHUNK_BYTES)] * 17, 3, "expected 18 audio chunks for frame_count=3 .* got 17"),
        ([bytes(CHUNK_BYTES)] * 19, 3, "expected 18 audio chunks for frame_count=3 .* got 19"),
        (
            [bytes(CHUNK_BYTES)] * 5 + [bytes(1000)] + [bytes(CHUNK_BYTES)] * 12,
            3,
            "audio chunk 5 has 1000 bytes",
        ),
    ],
)
def test_check_chunks_refuses_wrong_counts_and_sizes(chunks: list[bytes], frames: int, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        check_chunks(chunks, frames)


def test_check_chunks_joins_once_and_window_chunks_length() -> None:
    chunks = speechlike(18)
    assert check_chunks(chunks, 3) == b"".join(chunks)
    check_window_chunks(bytes(WINDOW_CHUNK_BYTES))
    for n in (0, 1000, WINDOW_CHUNK_BYTES - 2, WINDOW_CHUNK_BYTES + 2):
        with pytest.raises(
            BadRequest, match=rf"audio_len={n}: live audio must be 16 chunks .* = 20480 bytes"
        ):
            check_window_chunks(bytes(n))


def test_batch_windows_run_the_encoder_once_and_slide_by_one_row() -> None:
    fake = fake_triton(loaded=("audio_encoder",))
    fake.models["audio_encoder"].max_batch_size = 64
    chunks = speechlike(8 + 3 + 7)

    async def body() -> list[FeatureWindow]:
        return await AudioFeatureExtractor(fake, "audio_encoder").batch_windows(chunks, 3)

    windows = asyncio.run(body())
    assert fake.count("infer", "audio_encoder") == 1
    rows = slice_encoder(pcm_mel_windows(b"".join(chunks), 18))
    assert [w.rows.shape for w in windows] == [(16, 512)] * 3
    for k, w in enumerate(windows):
        np.testing.assert_array_equal(w.rows, rows[k : k + 16])


def test_window_of_chunks_and_of_a_computed_window() -> None:
    fake = fake_triton(loaded=("audio_encoder",))
    fake.models["audio_encoder"].max_batch_size = 64
    extractor = AudioFeatureExtractor(fake, "audio_encoder")
    pcm = b"".join(speechlike(16, seed=3))
    rows = np.ones((16, 512), np.float32)

    async def body() -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        with pytest.raises(BadRequest, match="audio_len=20478"):
            await extractor.window(WindowChunks(pcm[:-2]))
        return await extractor.window(WindowChunks(pcm)), await extractor.window(FeatureWindow(rows))

    from_chunks, given = asyncio.run(body())
    np.testing.assert_array_equal(from_chunks, slice_encoder(pcm_mel_windows(pcm, 16)))
    assert given is rows and fake.count("infer") == 1
