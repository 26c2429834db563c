"""Voice-activity parameters of live sessions, measured on real speech (and the CPU cost of
the live audio front end per second of audio).

    python -m perf.live_vad

For each parameter set (`gateway.live.vad.VadParams`: webrtcvad aggressiveness, voiced
10 ms frames a 40 ms slot needs, onset slots, hangover slots) over the five LibriVox
recordings (`lipsync.paths.SPEECH_DIR`, continuous read speech):

- speaking %: slots marked speaking;
- energetic recall %: of the slots within 35 dB of the recording's loudest slot (a crude
  "somebody is audibly talking" reference), those marked speaking;
- runs / 10 s: speaking runs started per 10 s (mouth flicker; the recordings hold 2-3
  utterances per 10 s);
- after end: slots still speaking after the speech of one recording ends, followed by 2 s of
  digital silence (bounded by the hangover);
- noise -60 / -45 dBFS %: slots speaking in 3 s of white noise at that RMS level (seeded);
- silence: speaking slots in 2 s of digital silence.

Then the CPU time of the per-session audio work (`PcmResampler` 48 kHz -> 16 kHz, `SlotVad`,
`IncrementalMel`) per second of audio fed in 20 ms chunks. Writes
`perf/results/live_vad.md` and `.json`.
"""
from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from gateway.live.mel import IncrementalMel
from gateway.live.pcm import PcmResampler
from gateway.live.types import SLOT_SAMPLES
from gateway.live.vad import SlotVad, SpeechGate, VadParams
from lipsync.audio import load_wav_16k_mono
from lipsync.contract import SAMPLE_RATE
from lipsync.paths import SPEECH_DIR
from perf import report

ENERGETIC_DB = 35.0
"""A slot within this many dB of the recording's loudest slot counts as audibly speaking."""


@dataclass(frozen=True)
class VadRow:
    """Measurements of one parameter set (see the module doc)."""

    aggressiveness: int
    min_voiced_frames: int
    onset_slots: int
    hangover_slots: int
    speaking_pct: float
    energetic_recall_pct: float
    runs_per_10s: float
    after_end_slots: int
    noise_60_pct: float
    noise_45_pct: float
    silence_slots: int


def decisions(params: VadParams, x: NDArray[np.float32]) -> NDArray[np.bool_]:
    """Speaking decision per whole slot of `x` (16 kHz), the gate closed by unvoiced slots."""
    flags = SlotVad(params).push(x)
    return np.array(SpeechGate(params).push(flags + [False] * (params.onset_slots - 1)), dtype=bool)


def energetic(x: NDArray[np.float32]) -> NDArray[np.bool_]:
    """Slots within `ENERGETIC_DB` of the loudest slot of `x`."""
    n = len(x) // SLOT_SAMPLES
    power = (x[: n * SLOT_SAMPLES].astype(np.float64).reshape(n, -1) ** 2).mean(axis=1)
    db = 10 * np.log10(power + 1e-12)
    return np.asarray(db > db.max() - ENERGETIC_DB)


def runs(d: NDArray[np.bool_]) -> int:
    """Number of runs of True in `d`."""
    return int(np.sum(np.diff(np.concatenate([[0], d.astype(int), [0]])) == 1))


def measure(params: VadParams, speech: list[NDArray[np.float32]]) -> VadRow:
    """All the module doc's measurements for one parameter set."""
    share, recall, flicker = [], [], []
    for x in speech:
        d = decisions(params, x)
        share.append(d.mean())
        recall.append(d[energetic(x)[: len(d)]].mean())
        flicker.append(runs(d) / (len(d) / 25) * 10)
    tail = decisions(params, np.concatenate([speech[1], np.zeros(32000, np.float32)]))
    rng = np.random.default_rng(0)
    noise = {lvl: decisions(params, (rng.standard_normal(48000) * 10 ** (lvl / 20)).astype(np.float32)).mean()
             for lvl in (-60, -45)}
    return VadRow(
        params.aggressiveness,
        params.min_voiced_frames,
        params.onset_slots,
        params.hangover_slots,
        100 * float(np.mean(share)),
        100 * float(np.mean(recall)),
        float(np.mean(flicker)),
        int(tail[-(-len(speech[1]) // SLOT_SAMPLES) :].sum()),
        100 * float(noise[-60]),
        100 * float(noise[-45]),
        int(decisions(params, np.zeros(32000, np.float32)).sum()),
    )


def front_end_cost(speech: NDArray[np.float32], repeats: int = 3) -> dict[str, float]:
    """CPU ms per second of audio of each per-session stage, fed in 20 ms chunks."""
    import soxr

    at48 = soxr.resample(speech, SAMPLE_RATE, 48000).astype(np.float32)
    seconds = len(speech) / SAMPLE_RATE
    stages: dict[str, tuple[Callable[[], _Stage], NDArray[np.float32], int]] = {
        "resample 48 -> 16 kHz": (lambda: PcmResampler(48000), at48, 960),
        "VAD (webrtcvad + gate)": (lambda: _VadStage(VadParams()), speech, 320),
        "incremental mel": (IncrementalMel, speech, 320),
    }
    out = {}
    for name, (make, signal, chunk) in stages.items():
        best = float("inf")
        for _ in range(repeats):
            stage = make()
            started = time.process_time()
            for i in range(0, len(signal), chunk):
                stage.push(signal[i : i + chunk])
            best = min(best, time.process_time() - started)
        out[name] = 1000 * best / seconds
    return out


class _Stage(Protocol):
    """One per-session stage of the live audio front end, fed chunk by chunk."""

    def push(self, samples: NDArray[np.float32], /) -> object: ...


class _VadStage:
    def __init__(self, params: VadParams) -> None:
        self.vad, self.gate = SlotVad(params), SpeechGate(params)

    def push(self, x: NDArray[np.float32]) -> None:
        self.gate.push(self.vad.push(x))


def write(rows: list[VadRow], cost: dict[str, float], out: Path, argv: Sequence[str] | None) -> None:
    """The markdown report and its JSON twin."""
    default = VadParams()
    lines = report.header("Live sessions: voice-activity parameters on LibriVox speech", argv)
    n_wavs = len(list(SPEECH_DIR.glob("*.wav")))
    intro = f"Speech: the {n_wavs} LibriVox recordings in `{SPEECH_DIR}`; 10 ms webrtcvad frames. "
    lines += [intro + "**bold**: the defaults of `VadParams`.", ""]
    table = []
    for r in rows:
        is_default = (r.aggressiveness, r.min_voiced_frames, r.onset_slots, r.hangover_slots) == (
            default.aggressiveness, default.min_voiced_frames, default.onset_slots, default.hangover_slots)
        mark = (lambda s: f"**{s}**") if is_default else str
        table.append(
            [mark(str(v)) for v in (r.aggressiveness, r.min_voiced_frames, r.onset_slots, r.hangover_slots)]
            + [
                report.fmt(r.speaking_pct),
                report.fmt(r.energetic_recall_pct),
                report.fmt(r.runs_per_10s),
                r.after_end_slots,
                report.fmt(r.noise_60_pct),
                report.fmt(r.noise_45_pct),
                r.silence_slots,
            ]
        )
    lines += report.markdown_table(
        [
            "mode",
            "voiced frames/slot",
            "onset slots",
            "hangover slots",
            "speaking %",
            "energetic recall %",
            "runs / 10 s",
            "after end (slots)",
            "noise -60 dBFS %",
            "noise -45 dBFS %",
            "silence (slots)",
        ],
        table,
    )
    lines += ["", "CPU per second of audio, one session, 20 ms chunks (best of 3):", ""]
    lines += report.markdown_table(
        ["stage", "CPU ms / s of audio"], [[k, report.fmt(v, 2)] for k, v in cost.items()]
    )
    report.write_text(out, lines)
    report.write_json(out.with_suffix(".json"), {
        "machine": report.machine_line(), "command": report.command_line(argv), "date": report.utc_now(),
        "rows": [asdict(r) for r in rows], "cpu_ms_per_audio_s": cost,
    })


def main(argv: Sequence[str] | None = None) -> int:
    """Measure the grid and the front-end cost, write the report."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=report.RESULTS_DIR / "live_vad.md")
    args = p.parse_args(argv)
    speech = [load_wav_16k_mono(w) for w in sorted(SPEECH_DIR.glob("*.wav"))]
    rows = [
        measure(VadParams(aggressiveness=a, min_voiced_frames=m, onset_slots=o, hangover_slots=h), speech)
        for a, m, o, h in itertools.product([1, 2, 3], [1, 2, 3], [1, 3], [0, 8])
    ]
    rows.append(measure(VadParams(hangover_slots=5), speech))
    write(rows, front_end_cost(np.concatenate(speech)), args.out, argv)
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
