"""Live audio -> AVE feature rows, via Triton's ``audio_encoder`` (for ``GenerateBatchWithAudio``).

The client sends one chunk of audio per video frame: 40 ms of 16 kHz mono int16 little-endian
PCM, i.e. 640 samples = 1280 bytes. Mapping (documented contract of this gateway):

1. The C chunks are concatenated and converted to float in [-1, 1]
   (`lipsync.audio.pcm16_to_float`); the mel spectrogram is computed over the whole clip with
   exactly the REFERENCE.md s.4 parameters (`lipsync.audio.mel_spectrogram`) -> ``[80, T]``,
   80 mel frames per second.
2. Chunk ``c`` starts at ``c * 40 ms``, i.e. at mel frame ``start = int(80 * c / 25)`` (the
   REFERENCE.md s.4 rule for video frame ``c``); its mel window is ``mel[:, start:start+16]``,
   shifted back to end at the last mel frame when it would run past the end. For the chunks
   ``lipsync.audio.mel_windows`` covers this is exactly its window; the last few chunks of a
   clip (which that function does not emit) get the shifted-back window.
3. The ``C`` windows go through Triton's ``audio_encoder`` -> ``[C, 512]``: one feature row
   per chunk. There is no ``[first, ..., last]`` padding here: row ``c`` *is* chunk ``c``.
4. Frame ``k`` of the batch (k = 0 .. F-1, with C = 8 + F + 7) uses rows ``k .. k+15``: the 8
   chunks before its own chunk ``k+8`` as past context, its own chunk, and 7 chunks of
   lookahead, the same centring as the package's rows ``i-8 .. i+7`` (REFERENCE.md s.2 step 6).
"""
from __future__ import annotations

import asyncio

import numpy as np
from numpy.typing import NDArray

from gateway.errors import BadRequest
from gateway.triton import TritonClient
from lipsync import audio as lipsync_audio
from lipsync.audio import MEL_FRAMES_PER_SECOND
from lipsync.contract import MEL_WINDOW, SAMPLE_RATE, VIDEO_FPS, WINDOW_AFTER, WINDOW_BEFORE

CHUNK_MS = 1000 // VIDEO_FPS
"""One chunk per 25-fps video frame: 40 ms."""
CHUNK_SAMPLES = SAMPLE_RATE * CHUNK_MS // 1000
"""640 samples per chunk."""
CHUNK_BYTES = CHUNK_SAMPLES * 2
"""1280 bytes of int16 PCM per chunk."""


def expected_chunks(frame_count: int) -> int:
    """Chunks a batch of ``frame_count`` frames needs: ``8 + frame_count + 7``."""
    return WINDOW_BEFORE + frame_count + WINDOW_AFTER


def check_chunks(chunks: list[bytes], frame_count: int) -> bytes:
    """Validate the chunk count and sizes and concatenate them.

    Args:
        chunks: the request's ``audio_chunks``.
        frame_count: frames asked for (>= 1).

    Returns:
        The concatenated PCM (``len(chunks) * 1280`` bytes).

    Raises:
        BadRequest: frame_count < 1, wrong number of chunks (the message gives the expected
            count), or a chunk that is not 1280 bytes.
    """
    if frame_count < 1:
        raise BadRequest(f"frame_count must be >= 1, got {frame_count}")
    need = expected_chunks(frame_count)
    if len(chunks) != need:
        raise BadRequest(
            f"expected {need} audio chunks for frame_count={frame_count} "
            f"(8 past + {frame_count} + 7 lookahead, each 40 ms = {CHUNK_BYTES} bytes of "
            f"16 kHz mono int16 PCM), got {len(chunks)}"
        )
    for idx, chunk in enumerate(chunks):
        if len(chunk) != CHUNK_BYTES:
            raise BadRequest(
                f"audio chunk {idx} has {len(chunk)} bytes; each chunk must be 40 ms of 16 kHz "
                f"mono int16 PCM = {CHUNK_BYTES} bytes"
            )
    return b"".join(chunks)


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


class AudioFeatureExtractor:
    """Turns 40 ms PCM chunks into feature rows with Triton's audio encoder.

    Args:
        triton: the gateway's Triton client.
        model_name: the encoder's Triton model (``audio_encoder``).
    """

    def __init__(self, triton: TritonClient, model_name: str = "audio_encoder") -> None:
        self.triton = triton
        self.model_name = model_name

    def mel_windows_from_pcm(self, pcm: bytes, n_chunks: int) -> NDArray[np.float32]:
        """PCM int16 LE 16 kHz mono -> float32 ``[n_chunks, 80, 16]`` (CPU, no I/O)."""
        wav = lipsync_audio.pcm16_to_float(pcm)
        mel = lipsync_audio.mel_spectrogram(wav)
        return chunk_mel_windows(np.asarray(mel, dtype=np.float32), n_chunks)

    async def features_from_chunks(self, chunks: list[bytes], frame_count: int) -> NDArray[np.float32]:
        """Feature rows of a ``GenerateBatchWithAudio`` request, one per chunk.

        Returns:
            float32 ``[8 + frame_count + 7, 512]``; frame ``k`` uses rows ``k .. k+15``.

        Raises:
            BadRequest: wrong chunk count/size (see `check_chunks`).
            TritonUnavailable: the encoder model is not served.
        """
        pcm = check_chunks(chunks, frame_count)
        windows = await asyncio.to_thread(self.mel_windows_from_pcm, pcm, len(chunks))
        return await self.triton.infer_audio_encoder(self.model_name, windows)
