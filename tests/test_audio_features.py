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
    window_chunk_counts,
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


def chunks_of(n: int) -> list[bytes]:
    return [bytes(CHUNK_BYTES)] * n


def test_sizes() -> None:
    assert (CHUNK_BYTES, WINDOW_CHUNK_BYTES) == (1280, 20480)
    assert [chunks_for_frames(f, 8) for f in (1, 3, 256)] == [16, 18, 271]
    assert [chunks_for_frames(10, s) for s in (0, 3, 7, 8, 100)] == [17, 20, 24, 25, 25]
    assert [window_chunk_counts(f) for f in (0, 5, 7, 8, 1000)] == [(8, 16), (13, 16), (15, 16), (16,), (16,)]


@pytest.mark.parametrize(
    ("chunks", "frames", "start", "message"),
    [
        (chunks_of(18), 0, 8, "frame_count must be >= 1, got 0"),
        (chunks_of(17), 3, 8, "expected 18 audio chunks for start_frame_id=8, frame_count=3: 8 past .*17"),
        (chunks_of(9), 3, 0, "expected 10 audio chunks for start_frame_id=0, frame_count=3: 0 past .* got 9"),
        (chunks_of(12), 3, 3, r"expected 13 audio chunks .*: 3 past \+ 3 \+ 7 lookahead.*start_frame_id < 8"),
        ([*chunks_of(5), bytes(1000), *chunks_of(12)], 3, 8, "audio chunk 5 has 1000 bytes"),
    ],
)
def test_check_chunks_refuses_too_few_and_wrong_sizes(
    chunks: list[bytes], frames: int, start: int, message: str
) -> None:
    with pytest.raises(BadRequest, match=message):
        check_chunks(chunks, frames, start)


def test_check_chunks_uses_the_first_chunks_and_ignores_extras() -> None:
    chunks = speechlike(18)
    assert check_chunks(chunks, 3, 8) == b"".join(chunks)
    assert check_chunks([*chunks, b"x", bytes(7)], 3, 8) == b"".join(chunks), "extras: not read, not checked"
    assert check_chunks(chunks, 3, 2) == b"".join(chunks[:12])


def test_window_chunks_lengths() -> None:
    assert check_window_chunks(bytes(WINDOW_CHUNK_BYTES), 9) == 16
    assert check_window_chunks(bytes(WINDOW_CHUNK_BYTES), 0) == 16
    assert check_window_chunks(bytes(8 * CHUNK_BYTES), 0) == 8
    assert check_window_chunks(bytes(13 * CHUNK_BYTES), 5) == 13
    for n in (0, 1000, WINDOW_CHUNK_BYTES - 2, WINDOW_CHUNK_BYTES + 2, 8 * CHUNK_BYTES):
        with pytest.raises(BadRequest, match=rf"audio_len={n}: live audio for frame_id=9 must be 20480 "):
            check_window_chunks(bytes(n), 9)
    with pytest.raises(BadRequest, match=r"must be 20480 bytes.*, or 12800 bytes at the start of a clip"):
        check_window_chunks(bytes(9 * CHUNK_BYTES), 2)


def extract(chunks: list[bytes], frames: int, start: int, max_batch: int = 64) -> list[FeatureWindow]:
    fake = fake_triton(loaded=("audio_encoder",))
    fake.models["audio_encoder"].max_batch_size = max_batch

    async def body() -> list[FeatureWindow]:
        return await AudioFeatureExtractor(fake, "audio_encoder").batch_windows(chunks, frames, start)

    windows = asyncio.run(body())
    assert fake.count("infer", "audio_encoder") == 1, "the encoder runs once per request"
    return windows


def test_batch_windows_slide_by_one_row() -> None:
    chunks = speechlike(8 + 3 + 7)
    windows = extract(chunks, 3, 8)
    rows = slice_encoder(pcm_mel_windows(b"".join(chunks), 18))
    assert [w.rows.shape for w in windows] == [(16, 512)] * 3
    for k, w in enumerate(windows):
        np.testing.assert_array_equal(w.rows, rows[k : k + 16])
    extra = extract(chunks + speechlike(2, seed=5), 3, 8)
    for a, b in zip(windows, extra, strict=True):
        np.testing.assert_array_equal(a.rows, b.rows)


@pytest.mark.parametrize("start", [0, 3, 7])
def test_batch_windows_at_the_start_of_a_clip_have_zeros_before_it(start: int) -> None:
    """Frame start+k's window: zeros for the positions before chunk 0, then the rows of the
    chunks since the clip began (REFERENCE.md s.2 step 6, as the offline window)."""
    frames = 10
    chunks = speechlike(start + frames + 7)
    rows = slice_encoder(pcm_mel_windows(b"".join(chunks), len(chunks)))
    windows = extract(chunks, frames, start)
    for k, w in enumerate(windows):
        i = start + k  # the frame, and the chunk that is its own
        expected = np.zeros((16, 512), np.float32)
        for j in range(16):
            if i - 8 + j >= 0:
                expected[j] = rows[i - 8 + j]
        np.testing.assert_array_equal(w.rows, expected)


def test_window_of_chunks_and_of_a_computed_window() -> None:
    fake = fake_triton(loaded=("audio_encoder",))
    fake.models["audio_encoder"].max_batch_size = 64
    extractor = AudioFeatureExtractor(fake, "audio_encoder")
    pcm = b"".join(speechlike(16, seed=3))
    rows = np.ones((16, 512), np.float32)

    async def body() -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.float32]]:
        with pytest.raises(BadRequest, match="audio_len=20478"):
            await extractor.window(WindowChunks(pcm[:-2], 20))
        start_of_clip = await extractor.window(WindowChunks(pcm[: 11 * CHUNK_BYTES], 3))
        return (await extractor.window(WindowChunks(pcm, 20)), start_of_clip,
                await extractor.window(FeatureWindow(rows)))

    from_chunks, start_of_clip, given = asyncio.run(body())
    np.testing.assert_array_equal(from_chunks, slice_encoder(pcm_mel_windows(pcm, 16)))
    np.testing.assert_array_equal(start_of_clip[:5], np.zeros((5, 512), np.float32))
    since_start = slice_encoder(pcm_mel_windows(pcm[: 11 * CHUNK_BYTES], 11))
    np.testing.assert_array_equal(start_of_clip[5:], since_start)
    assert given is rows and fake.count("infer") == 2
