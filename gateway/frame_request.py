"""`FrameRequest`: one frame asked for, whatever protocol it came in on.

The protocol adapters (`gateway.grpc_service`, the WebSocket handler and the frame route of
`gateway.http_app`) decode their wire format into this one type and hand it to
`gateway.pipeline.FramePipeline.render`, which looks the avatar up, validates, renders and
records the outcome. The words are those of docs/GLOSSARY.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from gateway.audio_features import LiveAudio

WireProtocol = Literal["grpc", "ws", "http", "live"]
"""The protocol a request came in on (the ``protocol`` label of the gateway's metrics); ``live``:
a speaking slot of a live session (`gateway.live_render`), over either of its transports."""

FrameOutput = Literal["composite", "face"]
"""What a rendered frame's JPEG shows: ``composite``, the whole video frame with the prediction
pasted back (docs/GLOSSARY.md); ``face``, the crop rectangle's pixels of that composite only
(`lipsync.frames.face_patch`), which a client draws into the rectangle over the video frame it
already shows (the original WebSocket clients and crop output, `gateway.ws_protocol`). Both are
made by `gateway.compositor.Compositor.composite`."""


@dataclass(frozen=True, slots=True)
class FrameRequest:
    """One output frame asked for.

    Attributes:
        avatar: the avatar name (``model_name`` in gRPC, ``name`` on the WebSocket).
        frame_id: the output frame, ``0 <= frame_id < M`` with the package's audio; with live
            audio any ``frame_id >= 0`` (it only picks the video frame, ping-pong).
        audio: the frame's live audio, or None to use the package's feature rows.
        output: what the JPEG shows (`FrameOutput`).
    """

    avatar: str
    frame_id: int
    audio: LiveAudio | None = None
    output: FrameOutput = "composite"
