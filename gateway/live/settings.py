"""`LiveSettings`: the tunables of live sessions, with their units and why they are what they are.

A pydantic model held by the gateway's `GatewaySettings` as its field ``live`` (environment
``LIPSYNC_LIVE__MARGIN_S=1.0``, ``LIPSYNC_LIVE__VAD__HANGOVER_SLOTS=5``, ...).
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from gateway.live.vad import VadParams


class LiveSettings(BaseModel):
    """Pacing, deadlines and voice activity of a live session (times in seconds)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    margin_s: float = Field(
        default=0.5, ge=0.0, le=10.0,
        description="how far the timeline may run ahead of the wall clock (s): a TTS that sends "
        "its audio at once is rendered this far ahead and then read only as fast as it plays. "
        "Frames already sent cannot be recalled, so this also bounds how long an interrupted "
        "avatar keeps talking in the client's buffer",
    )
    underrun_s: float = Field(
        default=0.3, gt=0.0, le=10.0,
        description="no audio for this long while a slot waits for its lookahead (s): the "
        "segment is flushed as if the client had asked (a TTS that forgot to flush, a network "
        "stall); a microphone streaming in real time sends every 10-100 ms and never trips it",
    )
    render_timeout_s: float = Field(
        default=1.0, gt=0.0, le=60.0,
        description="a speaking slot not rendered this long after it was planned, or after its "
        "own pts on the wall clock if that is later (s), is sent as an idle frame marked late",
    )
    encoder_timeout_s: float = Field(
        default=1.0, gt=0.0, le=60.0,
        description="deadline of one call to the audio encoder (s): a session encodes a few "
        "feature rows at a time (about 6 ms each on an idle 2-core CPU, but 0.5 s and more "
        "while the CPU UNet runs beside it); a call past it fails, and the slots waiting for "
        "those rows are sent as idle frames marked late. The session sends nothing while it "
        "waits for the encoder, so this bounds that pause too",
    )
    max_in_flight: int = Field(
        default=8, ge=1, le=64, description="slots of one session being rendered at once"
    )
    vad: VadParams = Field(default=VadParams(), description="voice-activity parameters")
