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
4. The chunks of a request for frames ``s .. s+F-1`` (``s`` = ``start_frame_id``) are the
   audio of chunks ``max(0, s-8) .. s+F+6`` of the clip, i.e. ``P + F + 7`` chunks with
   ``P = min(s, 8)`` chunks of past (`chunks_for_frames`): 8 before frame ``s`` as a rule, and
   at the start of a clip (``s < 8``) the ``s`` chunks that exist. Frame ``s+k`` uses as its
   window the rows of chunks ``s+k-8 .. s+k+7``, the same centring as the package's rows
   ``i-8 .. i+7``; window positions before the clip's first chunk are zeros, as rows outside
   the feature array are in the offline window (docs/REFERENCE.md s.2 step 6). With
   ``s >= 8`` that is rows ``k .. k+15`` of the request's chunks.
5. A gRPC request may carry more chunks than that (the original server accepted any count
   ``>= P + F + 7``): the extra chunks at the end are ignored, unread and unchecked, so the
   frames are those of the request without them.

A request carries live audio in one of two forms (`LiveAudio`), both made here so the window's
shape holds by construction:

- `WindowChunks`: the 16 chunks of one frame's window (a WebSocket request, F = 1; for a
  ``frame_id`` below 8 also the start-of-clip form of step 4, ``frame_id + 8`` chunks); the
  pipeline turns them into a window with `AudioFeatureExtractor.window`, checking them first;
- `FeatureWindow`: a window already computed, from `AudioFeatureExtractor.batch_windows`
  (gRPC ``GenerateBatchWithAudio``: the encoder runs once per request, not per frame).
"""
from __future__ import annotations

import asyncio
from collections.abc import Sequence
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


def past_chunks(start_frame_id: int) -> int:
    """Chunks of past before frame ``start_frame_id`` a request carries: ``min(s, 8)`` (module
    doc, step 4); fewer than 8 only at the start of a clip."""
    return min(max(start_frame_id, 0), WINDOW_BEFORE)


def chunks_for_frames(frames: int, start_frame_id: int) -> int:
    """Chunks a request for frames ``s .. s+frames-1`` needs: ``min(s, 8) + frames + 7``."""
    return past_chunks(start_frame_id) + frames + WINDOW_AFTER


WINDOW_CHUNKS = chunks_for_frames(1, WINDOW_BEFORE)
"""Chunks behind one frame's whole window: 16."""
WINDOW_CHUNK_BYTES = WINDOW_CHUNKS * CHUNK_BYTES
"""PCM bytes behind one frame's whole window: 16 x 1280 = 20480 (a WebSocket live-audio request)."""


def check_chunks(chunks: Sequence[bytes], frames: int, start_frame_id: int) -> bytes:
    """Check the chunks of a request for frames ``s .. s+frames-1``; join the ones it uses.

    Args:
        chunks: the request's chunks, 1280 bytes each (module doc, steps 4-5).
        frames: F, the number of frames asked for.
        start_frame_id: s, the first frame asked for (``>= 0``).

    Returns:
        The PCM of the first ``chunks_for_frames(frames, s)`` chunks; extra chunks after them
        are ignored (not checked).

    Raises:
        BadRequest: ``frames < 1``, fewer chunks than needed (the message gives the count and
            the start-of-clip rule), or a used chunk that is not 1280 bytes.
    """
    if frames < 1:
        raise BadRequest(f"frame_count must be >= 1, got {frames}")
    past = past_chunks(start_frame_id)
    need = chunks_for_frames(frames, start_frame_id)
    if len(chunks) < need:
        raise BadRequest(
            f"expected {need} audio chunks for start_frame_id={start_frame_id}, "
            f"frame_count={frames}: {past} past + {frames} + {WINDOW_AFTER} lookahead, each "
            f"40 ms = {CHUNK_BYTES} bytes of 16 kHz mono int16 PCM (the past is the "
            f"{WINDOW_BEFORE} chunks before start_frame_id, or at the start of a clip, "
            f"start_frame_id < {WINDOW_BEFORE}, the start_frame_id chunks since it began); "
            f"got {len(chunks)}"
        )
    for idx, chunk in enumerate(chunks[:need]):
        if len(chunk) != CHUNK_BYTES:
            raise BadRequest(
                f"audio chunk {idx} has {len(chunk)} bytes; each chunk must be 40 ms of 16 kHz "
                f"mono int16 PCM = {CHUNK_BYTES} bytes"
            )
    return b"".join(chunks[:need])


def window_chunk_counts(frame_id: int) -> tuple[int, ...]:
    """Chunk counts a WebSocket live-audio request for ``frame_id`` may carry.

    16, the whole window (chunks ``frame_id-8 .. frame_id+7``), for any frame; at the start of
    a clip (``frame_id < 8``) also ``frame_id + 8``, the chunks since the clip began (its
    missing past is zeros, module doc step 4).
    """
    start_of_clip = chunks_for_frames(1, frame_id)
    return (WINDOW_CHUNKS,) if start_of_clip == WINDOW_CHUNKS else (start_of_clip, WINDOW_CHUNKS)


def is_window_length(n_bytes: int, frame_id: int) -> bool:
    """Whether ``n_bytes`` of PCM are a live-audio window for ``frame_id`` (`window_chunk_counts`)."""
    n, rest = divmod(n_bytes, CHUNK_BYTES)
    return rest == 0 and n in window_chunk_counts(frame_id)


def check_window_chunks(pcm: bytes, frame_id: int) -> int:
    """Check the audio of one frame's window (a WebSocket live-audio request).

    Returns:
        The number of chunks it carries, one of `window_chunk_counts` ``(frame_id)``.

    Raises:
        BadRequest: any other length, with the lengths accepted in the message.
    """
    if not is_window_length(len(pcm), frame_id):
        counts = window_chunk_counts(frame_id)
        start_of_clip = (
            f", or {counts[0] * CHUNK_BYTES} bytes at the start of a clip (frame_id < "
            f"{WINDOW_BEFORE}): the {counts[0]} chunks since it began"
            if len(counts) > 1 else ""
        )
        raise BadRequest(
            f"audio_len={len(pcm)}: live audio for frame_id={frame_id} must be "
            f"{WINDOW_CHUNK_BYTES} bytes, the frame's window of {WINDOW_CHUNKS} chunks of 40 ms "
            f"16 kHz mono int16 PCM ({CHUNK_BYTES} bytes each: {WINDOW_BEFORE} past + the "
            f"frame's own + {WINDOW_AFTER} lookahead){start_of_clip}; send audio_len=0 to use "
            "the avatar's own audio"
        )
    return len(pcm) // CHUNK_BYTES


def _windows(rows: NDArray[np.float32], start_frame_id: int, frames: int) -> list[NDArray[np.float32]]:
    """The ``frames`` windows over ``rows`` (the feature rows of the request's used chunks):
    zeros for the missing past at the start of a clip, then rows ``k .. k+15`` (module doc)."""
    missing = WINDOW_BEFORE - past_chunks(start_frame_id)
    if missing:
        rows = np.concatenate([np.zeros((missing, rows.shape[1]), np.float32), rows])
    return [rows[k : k + WINDOW_ROWS] for k in range(frames)]


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
    """The raw PCM of one frame's window, as a WebSocket request carries it (unchecked).

    Attributes:
        pcm: the chunks, int16 LE 16 kHz mono (`check_window_chunks` says what is accepted).
        frame_id: the frame whose window it is (below 8 a shorter, start-of-clip form is
            accepted).
    """

    pcm: bytes
    frame_id: int


@dataclass(frozen=True, slots=True)
class FeatureWindow:
    """A computed window: float32 ``[16, 512]`` feature rows (made by `batch_windows`)."""

    rows: NDArray[np.float32]


LiveAudio = WindowChunks | FeatureWindow
"""The live audio of one frame request (module doc)."""


class AudioFeatureExtractor:
    """Turns 40 ms PCM chunks into feature rows with the audio encoder.

    Args:
        inference: where the encoder runs (the gateway's `gateway.endpoint_pool.EndpointPool`).
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

    async def batch_windows(
        self, chunks: Sequence[bytes], frames: int, start_frame_id: int
    ) -> list[FeatureWindow]:
        """The windows of a request for frames ``s .. s+frames-1`` (module doc, steps 4-5):
        the encoder runs once over the chunks used.

        Raises:
            BadRequest: too few chunks or a used chunk of a wrong size (`check_chunks`).
            TritonUnavailable: the encoder model is not served.
        """
        pcm = check_chunks(chunks, frames, start_frame_id)
        rows = await self.features(pcm, len(pcm) // CHUNK_BYTES)
        return [FeatureWindow(w) for w in _windows(rows, start_frame_id, frames)]

    async def window(self, audio: LiveAudio) -> NDArray[np.float32]:
        """The float32 ``[16, 512]`` window of one frame's live audio.

        Raises:
            BadRequest: `WindowChunks` of a wrong length (`check_window_chunks`).
            TritonUnavailable: the encoder model is not served.
        """
        if isinstance(audio, FeatureWindow):
            return audio.rows
        n = check_window_chunks(audio.pcm, audio.frame_id)
        rows = await self.features(audio.pcm, n)
        start = audio.frame_id if n < WINDOW_CHUNKS else WINDOW_BEFORE
        return _windows(rows, start, 1)[0]
