"""The live sessions' edges in the gateway: Triton's audio encoder, the frame pipeline, idle JPEGs.

`gateway.live` is pure (no Triton, no sockets); it asks two interfaces for what it cannot compute:

- `gateway.live.features.AudioEncoder`: `TritonAudioEncoder`, Triton's ``audio_encoder`` through
  the gateway's `gateway.endpoint_pool.EndpointPool` (so a Triton outage fails at once; sessions
  keep no state in Triton, so any endpoint with the encoder ready serves any session), each call
  bounded by `LiveSettings.encoder_timeout_s`: a failed or slow call makes its slots late idle
  frames, it never stalls the stream. Concurrent sessions' calls meet in Triton's dynamic batcher.
- `gateway.live.types.Renderer`: `AvatarRenderer`, one avatar. Speaking slots go through
  `FramePipeline.render_window` (admission, UNet, composite, JPEG; metrics label ``live``);
  idle slots are the avatar's own video frames from `IdleFrames`, no Triton call.

`IdleFrames` holds the JPEG of each video frame of each avatar, encoded once, lazily (the first
time a slot shows that frame), at the serving JPEG quality (the pipeline's encoder, in its
thread pool); a reloaded avatar (a new `Avatar` object under the same name) starts afresh.
Memory: N JPEGs per avatar (100 x ~8 KB for the 176 x 144 demo; ~250 x 100 KB for a 10 s
720p avatar).
"""
from __future__ import annotations

import asyncio

import numpy as np
from numpy.typing import NDArray

from gateway.frame_request import WireProtocol
from gateway.live.types import RenderedFrame
from gateway.pipeline import FramePipeline
from gateway.store import Avatar
from gateway.triton_client import InferenceClient

PROTOCOL: WireProtocol = "live"
"""The pipeline's metrics label of speaking slots (either transport)."""


class TritonAudioEncoder:
    """`AudioEncoder` on Triton's ``audio_encoder`` (module doc).

    Args:
        inference: the gateway's Triton endpoints (lifecycle-aware `InferenceClient`).
        model: the encoder's Triton model name (``GatewaySettings.audio_encoder_model``).
        timeout_s: deadline of one call (s).
    """

    def __init__(self, inference: InferenceClient, model: str, timeout_s: float) -> None:
        self.inference = inference
        self.model = model
        self.timeout_s = timeout_s

    async def encode(self, mel: NDArray[np.float32]) -> NDArray[np.float32]:
        """Mel windows float32 ``[N, 80, 16]`` -> feature rows float32 ``[N, 512]``.

        Raises:
            TritonUnavailable: Triton down or the model not ready.
            TimeoutError: no answer within ``timeout_s``.
        """
        return await asyncio.wait_for(self.inference.infer_audio_encoder(self.model, mel), self.timeout_s)


class IdleFrames:
    """JPEGs of the avatars' own video frames, each encoded once (module doc).

    Args:
        pipeline: whose JPEG encoder (quality, subsampling) and thread pool are used.
    """

    def __init__(self, pipeline: FramePipeline) -> None:
        self._pipeline = pipeline
        self._cache: dict[str, tuple[Avatar, list[asyncio.Future[bytes] | None]]] = {}

    async def jpeg(self, avatar: Avatar, video_index: int) -> bytes:
        """The JPEG of ``avatar``'s video frame ``video_index`` (0..N-1), unchanged pixels.

        Concurrent calls for the same frame share one encoding.

        Raises:
            IndexError: ``video_index`` outside 0..N-1.
            ValueError: the encoder refused the frame (not uint8 [H, W, 3]).
        """
        entry = self._cache.get(avatar.name)
        if entry is None or entry[0] is not avatar:
            entry = (avatar, [None] * avatar.video_frames)
            self._cache[avatar.name] = entry
        futures = entry[1]
        if not 0 <= video_index < len(futures):
            raise IndexError(
                f"video frame {video_index} outside 0..{len(futures) - 1} of avatar {avatar.name!r}"
            )
        future = futures[video_index]
        if future is None or (future.done() and (future.cancelled() or future.exception() is not None)):
            future = asyncio.ensure_future(self._pipeline.encode(avatar.frames[video_index]))
            futures[video_index] = future
        return await asyncio.shield(future)  # a cancelled caller leaves the encoding to the others

    def cached(self, avatar: str) -> int:
        """How many of ``avatar``'s video frames have their JPEG (for tests and stats)."""
        entry = self._cache.get(avatar)
        return sum(1 for f in entry[1] if f is not None and f.done()) if entry else 0


class AvatarRenderer:
    """`gateway.live.types.Renderer` for one avatar (module doc).

    Args:
        avatar: the avatar, as the store had it when the session started.
        pipeline: renders speaking slots.
        idle: the idle-frame JPEGs.

    Attributes:
        video_frames: N.
    """

    def __init__(self, avatar: Avatar, pipeline: FramePipeline, idle: IdleFrames) -> None:
        self.avatar = avatar
        self.video_frames = avatar.video_frames
        self._pipeline = pipeline
        self._idle = idle

    async def render_speaking(
        self, slot: int, video_frame: int, window: NDArray[np.float32]
    ) -> RenderedFrame:
        """Video frame ``video_frame`` lip-synced with ``window`` float32 ``[16, 512]``.

        Raises:
            Overloaded, TritonUnavailable: from the pipeline (the slot goes out idle, late).
        """
        frame = await self._pipeline.render_window(self.avatar, video_frame, window, protocol=PROTOCOL)
        return RenderedFrame(frame.jpeg, frame.rect)

    async def idle_frame(self, slot: int, video_frame: int) -> RenderedFrame:
        """The avatar's own video frame ``video_frame`` (cached JPEG, no inference)."""
        return RenderedFrame(await self._idle.jpeg(self.avatar, video_frame), self.avatar.rect(video_frame))
