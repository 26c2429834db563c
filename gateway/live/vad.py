"""Voice activity per 40 ms slot: `webrtcvad` on 16 kHz frames, then an onset/hangover gate.

`SlotVad` runs WebRTC's VAD (GMM on 6 sub-band energies, `webrtcvad-wheels`) on 10 or 20 ms
frames of 16 kHz int16 audio and calls a slot voiced when at least `min_voiced_frames` of its
frames are. `SpeechGate` turns those flags into speaking slots without flicker: speech starts
only at a run of `onset_slots` voiced slots (a click or a breath does not open the mouth) and
stays on for `hangover_slots` after the last voiced slot (the short pauses inside and between
words do not close it). The gate decides slot `j` once slot `j + onset_slots - 1` is known,
which never delays a slot: its feature window needs 11-12 slots of lookahead anyway.

The parameters, their defaults and why are in `VadParams`; `perf/live_vad.py` measures them on
the LibriVox recordings (`perf/results/live_vad.md`).
"""
from __future__ import annotations

from collections import deque
from typing import Literal

import numpy as np
import webrtcvad
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, model_validator

from gateway.live.types import SLOT_MS, SLOT_SAMPLES
from lipsync.audio import float_to_pcm16
from lipsync.contract import SAMPLE_RATE


class VadParams(BaseModel):
    """Voice-activity parameters (one place; measured in `perf/results/live_vad.md`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    aggressiveness: int = Field(
        default=2, ge=0, le=3,
        description="webrtcvad mode 0-3 (higher: noise more often called non-speech); with the "
        "gate, mode 2 marks 95.7 % of the audibly loud slots of LibriVox speech speaking "
        "(mode 3: 95.3 %); mode 1 lets -60 dBFS white noise through in 15 % of its slots",
    )
    frame_ms: Literal[10, 20] = Field(
        default=10, description="webrtcvad frame (ms); 10 and 20 divide the 40 ms slot (30 does not)"
    )
    min_voiced_frames: int = Field(
        default=2, ge=1, le=4,
        description="voiced frames a slot needs to be voiced (of 40 / frame_ms): 2 of 4, a "
        "word edge covering half the slot counts; 1-3 measure within 0.4 % of each other",
    )
    onset_slots: int = Field(
        default=3, ge=1, le=8,
        description="consecutive voiced slots that start speech (120 ms): with 1, -45 dBFS "
        "white noise opens the mouth in 3-13 % of its slots, with 3 in none",
    )
    hangover_slots: int = Field(
        default=8, ge=0, le=50,
        description="slots speech stays on after the last voiced one (320 ms): bridges the "
        "pauses inside and between words (LibriVox: 3.3 speaking runs per 10 s without it, "
        "2.3 with 5 or 8, the recordings' own utterances) and ends within 0.4 s of the speech",
    )

    @model_validator(mode="after")
    def _frames_fit_slot(self) -> VadParams:
        if self.min_voiced_frames > self.frames_per_slot:
            raise ValueError(
                f"min_voiced_frames={self.min_voiced_frames} exceeds the {self.frames_per_slot} "
                f"frames of {self.frame_ms} ms in a {SLOT_MS} ms slot"
            )
        return self

    @property
    def frames_per_slot(self) -> int:
        """VAD frames per 40 ms slot (4 or 2)."""
        return SLOT_MS // self.frame_ms


class SlotVad:
    """Voiced flags of consecutive 40 ms slots of one 16 kHz signal (module doc).

    Args:
        params: the VAD parameters.
    """

    def __init__(self, params: VadParams) -> None:
        self.params = params
        self._vad = webrtcvad.Vad(params.aggressiveness)
        self._frame_samples = SAMPLE_RATE * params.frame_ms // 1000
        self._pending = np.zeros(0, dtype=np.int16)

    def push(self, samples: NDArray[np.float32]) -> list[bool]:
        """Add audio, f32[n] 16 kHz in [-1, 1]; returns the flags of the slots it completed."""
        pcm = np.concatenate([self._pending, float_to_pcm16(samples)])
        whole = pcm.size // SLOT_SAMPLES
        self._pending = pcm[whole * SLOT_SAMPLES :]
        flags = []
        for s in range(whole):
            slot = pcm[s * SLOT_SAMPLES : (s + 1) * SLOT_SAMPLES]
            voiced = sum(
                self._vad.is_speech(frame.tobytes(), SAMPLE_RATE)
                for frame in slot.reshape(-1, self._frame_samples)
            )
            flags.append(voiced >= self.params.min_voiced_frames)
        return flags


class SpeechGate:
    """Onset/hangover smoothing of voiced flags into speaking decisions (module doc).

    States: silent, or speaking with `hang` slots of hangover left. Decisions come out in slot
    order, `onset_slots - 1` slots behind the flags.
    """

    def __init__(self, params: VadParams) -> None:
        self.params = params
        self._flags: deque[bool] = deque()
        self._speaking = False
        self._hang = 0

    def push(self, flags: list[bool]) -> list[bool]:
        """Add voiced flags of the next slots; returns the decisions that became known."""
        self._flags.extend(flags)
        out = []
        while len(self._flags) >= self.params.onset_slots:
            out.append(self._decide())
        return out

    def _decide(self) -> bool:
        voiced = self._flags.popleft()
        if self._speaking:
            if voiced:
                self._hang = self.params.hangover_slots
                return True
            if self._hang > 0:
                self._hang -= 1
                return True
            self._speaking = False
        if voiced and all(list(self._flags)[: self.params.onset_slots - 1]):
            self._speaking, self._hang = True, self.params.hangover_slots
        return self._speaking
