"""One segment: a continuous piece of a session's audio, placed on the timeline at a slot.

A session's audio is cut into segments at its breaks: the start, `flush`, `interrupt`, end of
input, and an underrun (no audio for `underrun_s` while a slot waits for its lookahead). The
first audio after a break opens a new segment at the first slot not yet planned, so a client
that pauses resumes at "now". Within a segment the signal is continuous: resampled as one
stream (`PcmResampler`), one incremental mel spectrogram and one set of feature rows
(`SegmentFeatures`, row 0 at the segment's first slot, as a recording's row 0 in a package),
one VAD (`SlotVad` + `SpeechGate`).

Local slot `j` of a segment (timeline slot `start_slot + j`) holds 16 kHz samples
`640 j .. 640 j + 639`. It is *ready* when its speaking decision is known and, if speaking, its
16-row feature window can be computed. Sealing a segment (`seal`) drains the resampler and
appends silence until its last slot is ready: the "padding the lookahead with silence" of
`flush` and end of input. `cut` ends it at a slot without rendering the rest (`interrupt`).
"""
from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from gateway.live.features import SegmentFeatures, samples_for_window
from gateway.live.pcm import PcmResampler
from gateway.live.types import SLOT_SAMPLES
from gateway.live.vad import SlotVad, SpeechGate, VadParams


class AudioSegment:
    """One continuous piece of audio on the timeline (module doc).

    Args:
        start_slot: timeline slot of the segment's local slot 0.
        sample_rate_hz: input rate of the PCM pushed (Hz), already validated.
        vad: voice-activity parameters.
        now: clock time of creation (s).
    """

    def __init__(self, start_slot: int, sample_rate_hz: int, vad: VadParams, now: float) -> None:
        self.start_slot = start_slot
        self.features = SegmentFeatures()
        self.audio_samples = 0
        """16 kHz samples of received audio (not the silence added by `seal`)."""
        self.last_audio_at = now
        """Clock time (s) audio last arrived (creation counts)."""
        self._resampler = PcmResampler(sample_rate_hz)
        self._vad = SlotVad(vad)
        self._gate = SpeechGate(vad)
        self._onset_slots = vad.onset_slots
        self._speaking: list[bool] = []  # decision of local slot self._first + n
        self._audio_at: list[float] = []  # arrival of local slot self._first + n's audio
        self._first = 0  # local slots before this were released
        self._limit: int | None = None

    @property
    def sealed(self) -> bool:
        """True once no more audio can join (sealed or cut)."""
        return self._limit is not None

    @property
    def slot_limit(self) -> int | None:
        """Local slots the segment will emit once sealed (its audio, rounded up), else None."""
        return self._limit

    @property
    def end_sample(self) -> int:
        """Timeline position (16 kHz samples from slot 0) just after the segment's audio."""
        local = (
            self.audio_samples if self._limit is None else min(self.audio_samples, self._limit * SLOT_SAMPLES)
        )
        return self.start_slot * SLOT_SAMPLES + local

    def push(self, samples: NDArray[np.float32], now: float) -> None:
        """Add received audio: f32[n] at the input rate, [-1, 1].

        Raises:
            RuntimeError: the segment is sealed (a session bug, not a client error).
        """
        if self.sealed:
            raise RuntimeError("audio pushed into a sealed segment")
        self._add(self._resampler.push(samples), now, received=True)
        self.last_audio_at = now

    def seal(self, now: float) -> None:
        """No more audio: drain the resampler and append silence until every slot is ready."""
        if self.sealed:
            return
        self._add(self._resampler.drain(), now, received=True)
        slots = -(-self.audio_samples // SLOT_SAMPLES)
        if slots:
            if self._first + len(self._audio_at) < slots:
                self._audio_at.append(now)  # the last, partial slot: complete as of now
            need = max(samples_for_window(slots - 1), (slots - 1 + self._onset_slots) * SLOT_SAMPLES)
            self._add(np.zeros(max(0, need - self.features.samples), np.float32), now, received=False)
        self._limit = slots

    def cut(self, local_slot: int) -> None:
        """End the segment before local slot `local_slot` (nothing from there on is emitted)."""
        self._limit = max(0, min(local_slot, self._limit if self._limit is not None else local_slot))

    def finished(self, local_slot: int) -> bool:
        """True when local slot `local_slot` is past the segment's last slot."""
        return self._limit is not None and local_slot >= self._limit

    def readiness(self, local_slot: int) -> bool | None:
        """None while local slot `local_slot` is not ready; else whether it is speaking.

        Raises:
            IndexError: the slot was released.
        """
        n = self._index(local_slot)
        if n >= len(self._speaking):
            return None
        speaking = self._speaking[n]
        if speaking and not self.features.window_ready(local_slot):
            return None
        return speaking

    def audio_at(self, local_slot: int) -> float | None:
        """Clock time (s) when local slot `local_slot`'s own audio was complete, if known."""
        n = self._index(local_slot)
        return self._audio_at[n] if n < len(self._audio_at) else None

    def release_before(self, local_slot: int) -> None:
        """Forget what only slots before `local_slot` need (their decisions, mel frames, rows),
        so a session streaming for hours keeps a bounded state."""
        drop = self._index(local_slot)
        if drop > 0:
            del self._speaking[:drop], self._audio_at[:drop]
            self._first += drop
        self.features.release_before(local_slot)

    def _index(self, local_slot: int) -> int:
        if local_slot < self._first:
            raise IndexError(f"local slot {local_slot} was released (first kept: {self._first})")
        return local_slot - self._first

    def _add(self, samples: NDArray[np.float32], now: float, *, received: bool) -> None:
        if samples.size == 0:
            return
        self.features.push(samples)
        self._speaking.extend(self._gate.push(self._vad.push(samples)))
        if received:
            self.audio_samples += samples.size
            complete = self.audio_samples // SLOT_SAMPLES
            self._audio_at.extend([now] * (complete - self._first - len(self._audio_at)))
