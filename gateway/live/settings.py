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
        "its audio at once is rendered this far ahead, the rest is held (max_held_s) and given "
        "to the timeline as it plays. "
        "Frames already sent cannot be recalled, so this also bounds how long an interrupted "
        "avatar keeps talking in the client's buffer",
    )
    max_held_s: float = Field(
        default=30.0, ge=0.0, le=600.0,
        description="audio read beyond the margin and held until the timeline takes it (s): the "
        "session keeps reading its input until this much is held, so an interrupt behind a TTS "
        "burst is read at once; then it stops reading (back-pressure through the transport's "
        "flow control). Memory: 2 bytes per sample at the client's rate (30 s at 48 kHz: "
        "2.9 MB per session)",
    )
    underrun_s: float = Field(
        default=0.3, gt=0.0, le=10.0,
        description="no audio for this long while a slot waits for its lookahead (s): the "
        "segment is flushed as if the client had asked (a TTS that forgot to flush, a network "
        "stall); a microphone streaming in real time sends every 10-100 ms and never trips it",
    )
    render_timeout_s: float = Field(
        default=1.0, gt=0.0, le=300.0,
        description="a speaking slot not rendered this long after it was ready (its lookahead "
        "arrived and it could be planned), or after its own pts on the wall clock if that is "
        "later (s), is sent as an idle frame marked late; no render is started that is "
        "expected to take longer than what is left of it (gateway/live/admission.py)",
    )
    encoder_timeout_s: float = Field(
        default=1.0, gt=0.0, le=300.0,
        description="deadline of one call to the audio encoder (s): a session encodes a few "
        "feature rows at a time (about 6 ms each on an idle 2-core CPU, but 0.5 s and more "
        "while the CPU UNet runs beside it); a call past it fails, and the slots waiting for "
        "those rows are sent as idle frames marked late (idle slots keep flowing meanwhile)",
    )
    max_in_flight: int = Field(
        default=8, ge=1, le=64,
        description="slots of one session planned and not yet sent, and the most renders of one "
        "session in flight (the ceiling of its render window, gateway/live/admission.py)",
    )
    vad: VadParams = Field(default=VadParams(), description="voice-activity parameters")
