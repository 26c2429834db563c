"""Live audio: 40 ms PCM chunks -> feature rows via Triton's ``audio_encoder`` -> windows.

Clients send one chunk of audio per output frame: 40 ms of 16 kHz mono int16 little-endian PCM,
i.e. 640 samples = 1280 bytes. Mapping (the documented contract of this gateway):

1. The C chunks, one byte string, are converted to float in [-1, 1]
   (`lipsync.audio.pcm16_to_float`); the mel spectrogram is computed over the whole clip with
   exactly the docs/REFERENCE.md s.4 parameters (`lipsync.audio.mel_spectrogram`) -> ``[80, T]``,
   80 mel frames per second.
2. Chunk ``c`` starts at ``c * 40 ms``, i.e. at mel frame ``start = int(80 * c / 25)`` (the
   s.4 rule for video frame ``c``); its mel window is ``mel[:, start:start+16]``, shifted back
   to end at the last mel frame when it would run past the end. For the chunks
   ``lipsync.audio.mel_windows`` covers this is exactly its window; the last few chunks of a
   clip (which that function does not emit) get the shifted-back window.
3. The ``C`` mel windows go through Triton's ``audio_encoder`` -> ``[C, 512]``: one feature row
   per chunk. There is no ``[first, ..., last]`` padding here: row ``c`` *is* chunk ``c``.
4. Frame ``k`` of a request for F frames (k = 0 .. F-1, C = 8 + F + 7 chunks) uses rows
   ``k .. k+15`` as its window: the 8 chunks before its own chunk ``k+8`` as past context, its
   own chunk, and 7 chunks of lookahead, the same centring as the package's rows ``i-8 .. i+7``
   (docs/REFERENCE.md s.2 step 6).

A request carries live audio in one of two forms (`LiveAudio`), both made here so the window's
shape holds by construction:

- `WindowChunks`: the 16 chunks of one frame's window (a WebSocket request, F = 1); the
  pipeline turns them into a window with `AudioFeatureExtractor.window`, checking them first;
- `FeatureWindow`: a window already computed, from `AudioFeatureExtractor.batch_windows`
  (gRPC ``GenerateBatchWithAudio``: the encoder runs once per request, not per frame).
"""
from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from gateway.errors import BadRequest
from gateway.triton_client import InferenceClient
from lipsync import audio as lipsync_audio
from lipsync.audio import MEL_FRAMES_PER_SECOND
from lipsync.contract import MEL_WINDOW, SAMPLE_RATE, VIDEO_FPS, WINDOW_AFTER, WINDOW_BEFORE, WINDOW_ROWS

CHUNK_MS = 1000 // VIDEO_FPS
"""One chunk per 25-fps output frame: 40 ms."""
CHUNK_SAMPLES = SAMPLE_RATE * CHUNK_MS // 1000
"""640 samples per chunk."""
CHUNK_BYTES = CHUNK_SAMPLES * 2
"""1280 bytes of int16 PCM per chunk."""


def chunks_for_frames(frames: int) -> int:
    """Chunks a request for ``frames`` output frames needs: ``8 + frames + 7``."""
    return WINDOW_BEFORE + frames + WINDOW_AFTER


WINDOW_CHUNKS = chunks_for_frames(1)
"""Chunks behind one frame's window: 16."""
WINDOW_CHUNK_BYTES = WINDOW_CHUNKS * CHUNK_BYTES
"""PCM bytes behind one frame's window: 16 x 1280 = 20480 (a WebSocket live-audio request)."""


def check_chunks(chunks: list[bytes], frames: int) -> bytes:
    """Check the chunk count and sizes of a request for ``frames`` frames; join the chunks.

    Returns:
        The PCM of all chunks (``len(chunks) * 1280`` bytes).

    Raises:
        BadRequest: ``frames < 1``, a wrong number of chunks (the message gives the expected
            count), or a chunk that is not 1280 bytes.
    """
    if frames < 1:
        raise BadRequest(f"frame_count must be >= 1, got {frames}")
    need = chunks_for_frames(frames)
    if len(chunks) != need:
        raise BadRequest(
            f"expected {need} audio chunks for frame_count={frames} "
            f"(8 past + {frames} + 7 lookahead, each 40 ms = {CHUNK_BYTES} bytes of "
            f"16 kHz mono int16 PCM), got {len(chunks)}"
        )
    for idx, chunk in enumerate(chunks):
        if len(chunk) != CHUNK_BYTES:
            raise BadRequest(
                f"audio chunk {idx} has {len(chunk)} bytes; each chunk must be 40 ms of 16 kHz "
                f"mono int16 PCM = {CHUNK_BYTES} bytes"
            )
    return b"".join(chunks)


def check_window_chunks(pcm: bytes) -> None:
    """Check the audio of one frame's window (a WebSocket live-audio request).

    It must be ``8 + 1 + 7 = 16`` chunks of 40 ms, 20480 bytes in all: 8 chunks before the
    frame's own chunk, the chunk itself, 7 chunks of lookahead (docs/REFERENCE.md s.2 step 6,
    s.4; the mapping of `chunks_for_frames` with one frame).

    Raises:
        BadRequest: any other length, with the expected one in the message.
    """
    if len(pcm) != WINDOW_CHUNK_BYTES:
        raise BadRequest(
            f"audio_len={len(pcm)}: live audio must be {WINDOW_CHUNKS} chunks of 40 ms "
            f"16 kHz mono int16 PCM ({CHUNK_BYTES} bytes each) = {WINDOW_CHUNK_BYTES} bytes "
            "(8 past + the frame's own + 7 lookahead); send audio_len=0 to use the avatar's "
            "own audio"
        )


def chunk_mel_windows(mel: NDArray[np.float32], n_chunks: int) -> NDArray[np.float32]:
    """One mel window per 40 ms chunk (module doc, step 2).

    Args:
        mel: float32 ``[80, T]`` with ``T >= 16``.
        n_chunks: number of chunks C.

    Returns:
        float32 ``[C, 80, 16]``.

    Raises:
        BadRequest: fewer than 16 mel frames (audio shorter than ~0.2 s).
    """
    n_mel = mel.shape[1]
    if n_mel < MEL_WINDOW:
        raise BadRequest(f"audio too short: {n_mel} mel frames, need at least {MEL_WINDOW}")
    out = np.empty((n_chunks, mel.shape[0], MEL_WINDOW), dtype=np.float32)
    for c in range(n_chunks):
        start = min(int(MEL_FRAMES_PER_SECOND * c / VIDEO_FPS), n_mel - MEL_WINDOW)
        out[c] = mel[:, start : start + MEL_WINDOW]
    return out


def pcm_mel_windows(pcm: bytes, n_chunks: int) -> NDArray[np.float32]:
    """PCM int16 LE 16 kHz mono of ``n_chunks`` chunks -> float32 ``[n_chunks, 80, 16]`` (CPU).

    Raises:
        BadRequest: as `chunk_mel_windows`.
    """
    mel = lipsync_audio.mel_spectrogram(lipsync_audio.pcm16_to_float(pcm))
    return chunk_mel_windows(np.asarray(mel, dtype=np.float32), n_chunks)


@dataclass(frozen=True, slots=True)
class WindowChunks:
    """The raw PCM of one frame's window, as a WebSocket request carries it (unchecked)."""

    pcm: bytes


@dataclass(frozen=True, slots=True)
class FeatureWindow:
    """A computed window: float32 ``[16, 512]`` feature rows (made by `batch_windows`)."""

    rows: NDArray[np.float32]


LiveAudio = WindowChunks | FeatureWindow
"""The live audio of one frame request (module doc)."""


class AudioFeatureExtractor:
    """Turns 40 ms PCM chunks into feature rows with the audio encoder.

    Args:
        inference: where the encoder runs (the gateway's `gateway.inference.GuardedInference`).
        model: the encoder's Triton model name (``audio_encoder``).
        executor: where the mel spectrograms are computed (the gateway's bounded pool for work
            beside frame rendering, `gateway.limits.AuxiliaryWork`); None: the loop's default.
    """

    def __init__(self, inference: InferenceClient, model: str, executor: Executor | None = None) -> None:
        self.inference = inference
        self.model = model
        self.executor = executor

    async def features(self, pcm: bytes, n_chunks: int) -> NDArray[np.float32]:
        """Feature rows of ``n_chunks`` chunks of checked PCM: float32 ``[n_chunks, 512]``.

        Raises:
            BadRequest: audio too short for one mel window.
            TritonUnavailable: the encoder model is not served.
        """
        loop = asyncio.get_running_loop()
        mel = await loop.run_in_executor(self.executor, pcm_mel_windows, pcm, n_chunks)
        return await self.inference.infer_audio_encoder(self.model, mel)

    async def batch_windows(self, chunks: list[bytes], frames: int) -> list[FeatureWindow]:
        """The windows of a request for ``frames`` frames: frame ``k`` gets rows ``k .. k+15``.

        Raises:
            BadRequest: wrong chunk count or size (`check_chunks`).
            TritonUnavailable: the encoder model is not served.
        """
        rows = await self.features(check_chunks(chunks, frames), len(chunks))
        return [FeatureWindow(rows[k : k + WINDOW_ROWS]) for k in range(frames)]

    async def window(self, audio: LiveAudio) -> NDArray[np.float32]:
        """The float32 ``[16, 512]`` window of one frame's live audio.

        Raises:
            BadRequest: `WindowChunks` of a wrong length (`check_window_chunks`).
            TritonUnavailable: the encoder model is not served.
        """
        if isinstance(audio, FeatureWindow):
            return audio.rows
        check_window_chunks(audio.pcm)
        return await self.features(audio.pcm, WINDOW_CHUNKS)
