"""Soak test (issue 11): N streams for T minutes against the real UNet, watching for errors,
latency drift and memory growth. Writes `perf/results/soak.md` and `perf/results/soak.json`.

    python -m perf.soak                            # 4 streams, 10 min, CPU profile (the demo)
    python -m perf.soak --streams 2 --minutes 3 --target ws

It starts the local CPU `tritonserver` on the CPU model repository (the demo avatar's UNet, the
real network) and the gateway (`lipsync gateway`, subprocess) on free ports, each with its
defaults, then keeps N streams busy: every stream asks for ``--session-frames`` frames (25) over
one gRPC ``StreamInference`` call (or one WebSocket), then opens the next call, until T minutes
have passed, so connections come and go as they do in service. As fast as possible
(``--pace 0``, the default) each stream keeps one frame in flight: latency is the service time
under N concurrent requests, the CPU UNet's steady state; ``--pace 25`` asks for real time
(on a 2-core CPU that is more than the UNet gives, and latency grows without bound).

The first ``--warmup-s`` seconds run the same load unmeasured (the allocators, caches and
thread pools reach their working size). Then every ``--sample-s`` seconds it reads the resident
set size (``VmRSS``, ``/proc/<pid>/status``) of the gateway and of Triton with its child
processes (the Python-backend stubs), summed. Reported: per minute, frames, errors, frames/s,
latency p50/p95 and both RSS; overall, the errors and each RSS at the start (mean of the first
minute's samples), at the end (mean of the last minute's) and at its peak, with the growth
end vs start in percent.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from perf import report
from perf.clients import StreamAborted, StreamSpec, drive_stream
from perf.loadgen import LoadConfig, open_transport
from perf.procstat import descendants, parent_map
from perf.stats import FrameRecord, percentiles

log = logging.getLogger(__name__)

MiB = 1024 * 1024


def tree_rss_bytes(root: int, parents: Mapping[int, int]) -> int:
    """``VmRSS`` of ``root`` and all its descendants in ``parents`` (`perf.procstat.parent_map`),
    summed (bytes; 0 for a gone process).

    Shared pages count once per process, so the sum overstates the memory a tree holds; its
    change over time is what a soak watches.
    """
    total = 0
    for pid in descendants(root, parents):  # root first
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
    return total


@dataclass(frozen=True, slots=True)
class RssSample:
    """One reading: seconds since the measured start, gateway and Triton RSS (bytes)."""

    t_s: float
    gateway: int
    triton: int


@dataclass(frozen=True, slots=True)
class Minute:
    """One minute of the measured run (records by completion time, samples by reading time)."""

    minute: int
    frames_ok: int
    errors: int
    fps: float
    p50_ms: float
    p95_ms: float
    gateway_rss_mib: float
    triton_rss_mib: float


@dataclass(frozen=True, slots=True)
class Totals:
    """The measured run as a whole."""

    minutes: int
    streams: int
    frames_ok: int
    errors: int
    p95_ms: float
    error_samples: list[str]


@dataclass(frozen=True, slots=True)
class Growth:
    """RSS of one process tree over the measured run (MiB) and its growth end vs start (%)."""

    start_mib: float
    end_mib: float
    peak_mib: float
    growth_pct: float


def growth(values: Sequence[tuple[float, int]], minutes: int) -> Growth:
    """`Growth` from ``(t_s, bytes)`` samples: start = mean of minute 1, end = mean of the last."""
    first = [b for t, b in values if t < 60.0]
    last = [b for t, b in values if t >= 60.0 * (minutes - 1)]
    start, end = float(np.mean(first)) / MiB, float(np.mean(last)) / MiB
    peak = max(b for _, b in values) / MiB
    return Growth(start, end, peak, 100.0 * (end - start) / start)


def per_minute(records: Sequence[FrameRecord], samples: Sequence[RssSample], t0: float,
               minutes: int) -> list[Minute]:
    """The measured run cut into minutes (records completed after the last minute are left out)."""
    rows = []
    for m in range(minutes):
        lo, hi = t0 + 60.0 * m, t0 + 60.0 * (m + 1)
        recs = [r for r in records if lo <= r.done_s < hi]
        ok = [r.latency_ms for r in recs if r.ok]
        p50, p95 = percentiles(ok, (50, 95))
        mem = [s for s in samples if 60.0 * m <= s.t_s < 60.0 * (m + 1)]
        rows.append(Minute(
            minute=m + 1, frames_ok=len(ok), errors=sum(not r.ok for r in recs), fps=len(ok) / 60.0,
            p50_ms=p50, p95_ms=p95,
            gateway_rss_mib=float(np.mean([s.gateway for s in mem])) / MiB if mem else float("nan"),
            triton_rss_mib=float(np.mean([s.triton for s in mem])) / MiB if mem else float("nan"),
        ))
    return rows


async def soak(config: LoadConfig, *, warmup_s: float, minutes: int, sample_s: float,
               gateway_pid: int, triton_pid: int) -> tuple[list[FrameRecord], list[RssSample], float]:
    """Run the streams through warm-up and ``minutes`` measured minutes.

    Returns:
        The measured run's records (those completed after the warm-up), the RSS samples and
        the measured start (``time.perf_counter()``, s).
    """
    start = time.perf_counter()
    measured_from = start + warmup_s
    stop_at = measured_from + 60.0 * minutes
    records: list[FrameRecord] = []
    samples: list[RssSample] = []

    async def stream(index: int) -> None:
        session = 0
        while time.perf_counter() < stop_at:
            offset = (index * config.frame_range) // config.streams + session * config.frames
            spec = StreamSpec(
                stream=index, avatar=config.avatar,
                frame_ids=tuple((offset + k) % config.frame_range for k in range(config.frames)),
                pace_fps=config.pace_fps, window=config.effective_window, timeout_s=config.timeout_s,
            )
            try:
                transport = await open_transport(config)
            except StreamAborted as exc:
                now = time.perf_counter()
                records.append(FrameRecord(index, 0, spec.frame_ids[0], now, now, now, False, str(exc)))
                await asyncio.sleep(1.0)
                continue
            try:
                await drive_stream(spec, transport, records.append)
            finally:
                await transport.close()
            session += 1

    async def sampler() -> None:
        await asyncio.sleep(max(0.0, measured_from - time.perf_counter()))
        while time.perf_counter() < stop_at:
            parents = parent_map()
            gateway_rss, triton_rss = (tree_rss_bytes(pid, parents) for pid in (gateway_pid, triton_pid))
            samples.append(RssSample(time.perf_counter() - measured_from, gateway_rss, triton_rss))
            log.info("t=%.0f s: %d frames, gateway %.0f MiB, Triton %.0f MiB", samples[-1].t_s,
                     len(records), samples[-1].gateway / MiB, samples[-1].triton / MiB)
            await asyncio.sleep(sample_s)

    await asyncio.gather(sampler(), *(stream(i) for i in range(config.streams)))
    return [r for r in records if r.done_s >= measured_from], samples, measured_from


def write_soak(rows: Sequence[Minute], totals: Totals, gateway: Growth, triton: Growth,
               setup: Sequence[str], out_md: Path, argv: Sequence[str]) -> None:
    """`perf/results/soak.md` and its `.json`."""
    headers = ("minute", "frames ok", "errors", "frames/s", "p50 ms", "p95 ms", "gateway RSS MiB",
               "Triton RSS MiB")
    table = [[r.minute, r.frames_ok, r.errors, r.fps, r.p50_ms, r.p95_ms, r.gateway_rss_mib,
              r.triton_rss_mib] for r in rows]
    memory = [["gateway", gateway.start_mib, gateway.end_mib, gateway.peak_mib, gateway.growth_pct],
              ["Triton (+ Python-backend stubs)", triton.start_mib, triton.end_mib, triton.peak_mib,
               triton.growth_pct]]
    command = report.command_line(["perf/soak.py", *argv])
    lines = [
        *report.header("Soak: N streams for T minutes on the real UNet (CPU)", command=command),
        *setup,
        "",
        f"**{totals.frames_ok} frames, {totals.errors} errors** in {totals.minutes} measured minutes "
        f"(latency p95 {totals.p95_ms:.0f} ms); RSS growth end vs start: gateway "
        f"{gateway.growth_pct:+.1f} %, Triton {triton.growth_pct:+.1f} %.",
        "",
        "## Per minute",
        "",
        *report.markdown_table(headers, table),
        "",
        "## Memory (RSS, MiB; start = mean of minute 1, end = mean of the last minute)",
        "",
        *report.markdown_table(("process", "start", "end", "peak", "growth end vs start %"), memory),
    ]
    if totals.error_samples:
        lines += ["", "Errors seen: " + "; ".join(f"`{e}`" for e in totals.error_samples)]
    report.write_text(out_md, lines)
    report.write_json(out_md.with_suffix(".json"), {
        "command": command, "date": report.utc_now(), "machine": report.machine_line(),
        "totals": asdict(totals),
        "gateway_rss": asdict(gateway), "triton_rss": asdict(triton), "minutes": [asdict(r) for r in rows],
    })


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m perf.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=4, help="concurrent streams N (default 4)")
    p.add_argument("--minutes", type=int, default=10, help="measured minutes T (default 10)")
    p.add_argument("--target", choices=("grpc", "ws"), default="grpc")
    p.add_argument("--pace", type=float, default=0.0, help="fps per stream; 0 = as fast as possible")
    p.add_argument("--session-frames", type=int, default=25,
                   help="frames per call before reconnecting (the last call may end after T)")
    p.add_argument("--warmup-s", type=float, default=60.0, help="unmeasured load first (s)")
    p.add_argument("--sample-s", type=float, default=5.0, help="RSS sampling period (s)")
    p.add_argument("--timeout", type=float, default=60.0, help="reply deadline per frame (s)")
    p.add_argument("--package", type=Path, default=None, help="avatar package (default: the demo)")
    p.add_argument("--out", type=Path, default=report.RESULTS_DIR / "soak.md")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Start Triton and the gateway, soak, write the report; exit 1 on any error."""
    from export.demo import ensure_demo
    from lipsync.package import load_package
    from lipsync.paths import MODEL_REPOSITORY_CPU
    from lipsync.triton_local import TritonServer, free_ports
    from perf.servers import start_gateway

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    pkg = load_package(args.package or ensure_demo())
    load_start = os.getloadavg()
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lipsync-soak-")))
        http, grpc_port, metrics = free_ports(3)
        triton = TritonServer(MODEL_REPOSITORY_CPU, http_port=http, grpc_port=grpc_port, metrics_port=metrics,
                              load_models=(pkg.manifest.model_name,), log_file=work / "triton.log")
        triton.start(timeout_s=300)
        stack.callback(triton.stop)
        root = work / "packages"
        shutil.copytree(pkg.root, root / pkg.name)
        gateway = stack.enter_context(start_gateway(triton.grpc_url, root, work, args.timeout))
        assert triton.pid is not None
        config = LoadConfig(
            target=args.target,
            address=gateway.grpc_address if args.target == "grpc" else gateway.http_address,
            avatar=pkg.name, streams=args.streams, frames=args.session_frames, pace_fps=args.pace,
            frame_range=pkg.feature_rows, timeout_s=args.timeout,
        )
        records, samples, t0 = asyncio.run(soak(
            config, warmup_s=args.warmup_s, minutes=args.minutes, sample_s=args.sample_s,
            gateway_pid=gateway.pid, triton_pid=triton.pid))
    load_end = os.getloadavg()
    rows = per_minute(records, samples, t0, args.minutes)
    counted = [r for r in records if r.done_s < t0 + 60.0 * args.minutes]
    errors = [r.error for r in counted if not r.ok]
    totals = Totals(
        minutes=args.minutes, streams=args.streams, frames_ok=sum(r.ok for r in counted), errors=len(errors),
        p95_ms=percentiles([r.latency_ms for r in counted if r.ok], (95,))[0],
        error_samples=sorted(set(errors))[:5],
    )
    gw = growth([(s.t_s, s.gateway) for s in samples], args.minutes)
    tr = growth([(s.t_s, s.triton) for s in samples], args.minutes)
    setup = [
        f"- avatar: `{pkg.name}` ({pkg.manifest.width}x{pkg.manifest.height}, {pkg.feature_rows} frames, "
        f"weights trained: {pkg.manifest.weights.trained}); Triton model `{pkg.manifest.model_name}` on the "
        "CPU model repository (Python backend + ONNX Runtime, dynamic batching); gateway with its default "
        "settings",
        f"- load: {args.streams} {args.target} streams, "
        + ("as fast as possible, one frame in flight each" if args.pace == 0
           else f"paced at {args.pace:g} fps")
        + f", {args.session_frames} frames per call then a new call; {args.warmup_s:g} s of warm-up not "
        f"measured; RSS read every {args.sample_s:g} s (gateway process; Triton and its child processes "
        "summed)",
        f"- load average (1/5/15 min) at start {load_start[0]:.1f}/{load_start[1]:.1f}/{load_start[2]:.1f}, "
        f"at end {load_end[0]:.1f}/{load_end[1]:.1f}/{load_end[2]:.1f}: other work shares these cores",
    ]
    write_soak(rows, totals, gw, tr, setup, args.out, list(sys.argv[1:] if argv is None else argv))
    print(f"wrote {args.out}: {totals.frames_ok} frames, {totals.errors} errors, RSS growth gateway "
          f"{gw.growth_pct:+.1f} %, Triton {tr.growth_pct:+.1f} %")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
