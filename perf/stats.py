"""Per-frame records of a load run and their summary (frames/s, latency percentiles, late
frames, errors). Pure computation, no I/O.

Timing model (see `perf/README.md`): every frame k of a stream has a *due* time. Paced at
`fps` frames/s it is ``t0 + k / fps`` (frame k is sent then, whatever happened before); as
fast as possible it is the moment the frame was actually sent. A frame's latency is
``received - due`` (ms); it is *late* when that exceeds one frame slot ``1000 / fps`` ms
(40 ms at 25 fps), i.e. it would miss its display slot in a player that shows frame k at its
due time plus one slot.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

SLOT_MS_25FPS = 40.0
"""One display slot at 25 fps (ms)."""


@dataclass(frozen=True, slots=True)
class FrameRecord:
    """One request of one stream.

    Attributes:
        stream: stream index, 0 .. N-1.
        seq: position of the frame in its stream, 0 .. F-1.
        frame_id: the avatar frame requested.
        due_s: when the frame was due (monotonic clock, s); see the module docstring.
        sent_s: when the request was written (monotonic, s).
        done_s: when the reply arrived, or the error was seen (monotonic, s).
        ok: True for a success reply.
        error: the error text for a failed frame ("" when ok).
        server_ms: processing time the server reported (ms), NaN if none.
        jpeg_bytes: size of the returned JPEG (bytes), 0 on error.
        sample: the returned JPEG, kept on sampled frames for verification (else None).
    """

    stream: int
    seq: int
    frame_id: int
    due_s: float
    sent_s: float
    done_s: float
    ok: bool
    error: str = ""
    server_ms: float = float("nan")
    jpeg_bytes: int = 0
    sample: bytes | None = None

    @property
    def latency_ms(self) -> float:
        """Reply time minus due time (ms)."""
        return (self.done_s - self.due_s) * 1000.0


@dataclass(frozen=True, slots=True)
class RunSummary:
    """What one load run measured (all times in ms, rates in frames/s).

    Attributes:
        label: what was measured (e.g. "ours grpc" or "baseline grpc").
        streams: concurrent streams N.
        frames_per_stream: frames each stream asked for.
        pace_fps: 25 for paced streams, 0 for as fast as possible.
        frames_ok: successful frames.
        errors: failed frames (error replies, transport errors, timeouts).
        wall_s: first due time to last reply (s).
        fps: successful frames per second over `wall_s`.
        p50_ms, p95_ms, p99_ms, mean_ms, max_ms: latency of successful frames.
        late: successful frames whose latency exceeded one slot (`slot_ms`).
        late_pct: `late` as a percentage of successful frames.
        slot_ms: the slot used for `late` (ms).
        server_p50_ms: median server-reported processing time (ms), NaN if none reported.
        mean_jpeg_kb: mean JPEG size (KiB).
        error_samples: up to 5 distinct error texts.
        verified: sampled replies whose JPEG was decoded and checked (see
            `perf.loadgen.verify_records`); a failed check is counted in `errors`.
    """

    label: str
    streams: int
    frames_per_stream: int
    pace_fps: float
    frames_ok: int
    errors: int
    wall_s: float
    fps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    late: int
    late_pct: float
    slot_ms: float
    server_p50_ms: float
    mean_jpeg_kb: float
    error_samples: list[str] = field(default_factory=list)
    verified: int = 0

    def to_dict(self) -> dict[str, object]:
        """A JSON-serialisable dict (NaN stays NaN; `json.dumps` writes it as NaN)."""
        return asdict(self)


def percentiles(values_ms: Sequence[float], qs: Sequence[float]) -> list[float]:
    """Percentiles (linear interpolation, numpy's default) of `values_ms`; NaN for none.

    Args:
        values_ms: latencies (ms).
        qs: percentiles in 0..100.
    """
    if len(values_ms) == 0:
        return [float("nan")] * len(qs)
    arr = np.asarray(values_ms, dtype=np.float64)
    return [float(v) for v in np.percentile(arr, list(qs))]


def summarize(
    records: Iterable[FrameRecord],
    *,
    label: str,
    streams: int,
    frames_per_stream: int,
    pace_fps: float,
    slot_ms: float = SLOT_MS_25FPS,
    verified: int = 0,
) -> RunSummary:
    """Summarise a run's frame records.

    Args:
        records: every frame of every stream (successes and failures).
        label, streams, frames_per_stream, pace_fps, verified: copied into the summary.
        slot_ms: the display slot for counting late frames (ms); 40 at 25 fps.

    Raises:
        ValueError: no records at all (nothing was sent).
    """
    recs = list(records)
    if not recs:
        raise ValueError(f"{label}: no frame records to summarise (nothing was sent)")
    ok = [r for r in recs if r.ok]
    failed = [r for r in recs if not r.ok]
    start = min(r.due_s for r in recs)
    end = max(r.done_s for r in recs)
    wall_s = max(end - start, 1e-9)
    lat = [r.latency_ms for r in ok]
    p50, p95, p99 = percentiles(lat, (50, 95, 99))
    late = sum(1 for v in lat if v > slot_ms)
    server = [r.server_ms for r in ok if not np.isnan(r.server_ms)]
    samples: list[str] = []
    for r in failed:
        if r.error not in samples:
            samples.append(r.error)
        if len(samples) == 5:
            break
    return RunSummary(
        label=label,
        streams=streams,
        frames_per_stream=frames_per_stream,
        pace_fps=pace_fps,
        frames_ok=len(ok),
        errors=len(failed),
        wall_s=wall_s,
        fps=len(ok) / wall_s,
        p50_ms=p50,
        p95_ms=p95,
        p99_ms=p99,
        mean_ms=float(np.mean(lat)) if lat else float("nan"),
        max_ms=float(np.max(lat)) if lat else float("nan"),
        late=late,
        late_pct=100.0 * late / len(ok) if ok else float("nan"),
        slot_ms=slot_ms,
        server_p50_ms=float(np.median(server)) if server else float("nan"),
        mean_jpeg_kb=float(np.mean([r.jpeg_bytes for r in ok])) / 1024.0 if ok else 0.0,
        error_samples=samples,
        verified=verified,
    )


def ratio(ours: float, baseline: float) -> float:
    """``ours / baseline``, NaN when either is NaN or the baseline is 0."""
    if np.isnan(ours) or np.isnan(baseline) or baseline == 0:
        return float("nan")
    return ours / baseline
