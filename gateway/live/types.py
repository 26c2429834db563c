"""What a live session consumes and produces: the renderer interface and the output items."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Protocol

import numpy as np
from numpy.typing import NDArray

from lipsync.contract import SAMPLE_RATE, VIDEO_FPS

SLOT_MS: Final[int] = 1000 // VIDEO_FPS
"""Duration of one slot: 40 ms (25 fps)."""
SLOT_S: Final[float] = SLOT_MS / 1000
"""Duration of one slot in seconds (0.04); slot `k` has `pts_s = k * 0.04`."""
SLOT_SAMPLES: Final[int] = SAMPLE_RATE * SLOT_MS // 1000
"""16 kHz samples per slot: 640."""


@dataclass(frozen=True)
class RenderedFrame:
    """One finished frame.

    Attributes:
        jpeg: the full composited frame (speaking) or the avatar's own frame (idle), JPEG.
        bounds: crop rectangle x1, y1, x2, y2 of the face in that frame (px).
    """

    jpeg: bytes
    bounds: tuple[float, float, float, float]


class Renderer(Protocol):
    """Frames of one avatar (in the gateway: the frame pipeline and a per-frame idle-JPEG cache).

    Attributes:
        video_frames: N, the avatar's number of video frames (walked ping-pong, docs/REFERENCE.md
            s.2 step 9).
    """

    video_frames: int

    async def render_speaking(
        self, slot: int, video_frame: int, window: NDArray[np.float32]
    ) -> RenderedFrame:
        """Lip-sync `video_frame` (0..N-1) with the audio window f32[16, 512] (UNet + composite).

        Raises:
            Exception: any failure (Triton overloaded or down): the slot is sent idle, late.
        """
        ...

    async def idle_frame(self, slot: int, video_frame: int) -> RenderedFrame:
        """The avatar's own `video_frame`, no inference (expected to be a cache lookup)."""
        ...


@dataclass(frozen=True)
class SlotFrame:
    """The frame of one slot, as the transports send it (`lipsync.live.v1.LiveFrame`).

    Attributes:
        seq: slot index, 0, 1, 2, ... without gaps.
        pts_s: `seq * 0.04` (s).
        frame: the image and crop rectangle.
        speaking: True when the UNet rendered it; False for idle frames (no inference).
        video_frame: the avatar's video frame shown (ping-pong walk of the slot index).
        error: errors of this session since the previous frame ("code: message; ..."), or "".
        late: a speaking slot whose render failed or missed its deadline, sent idle.
        audio_at: clock time (s) when the slot's own 40 ms of audio had arrived; None for
            slots without audio (for the audio-to-frame latency metric).
    """

    seq: int
    pts_s: float
    frame: RenderedFrame
    speaking: bool
    video_frame: int
    error: str
    late: bool
    audio_at: float | None


@dataclass(frozen=True)
class SessionNotice:
    """An error before the session has started (no slot to carry it): "code: message"."""

    error: str
