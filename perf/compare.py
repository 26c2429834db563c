"""Side by side, in one run: our stack (CPU Triton + gateway) against the seed-architecture
baseline (`perf/baseline_server.py`), driven by the same load generator over the same gRPC
`StreamInference`, at 1, 4 and 8 concurrent streams. Writes `perf/results/compare.md` and
`perf/results/compare.json`.

    python -m perf.compare                      # starts everything it needs, ~5-8 min on 2 cores
    python -m perf.compare --streams 1 4 8 --frames 40 --pace 0

By default it starts the local CPU `tritonserver` on the CPU model repository, our gateway
(`lipsync gateway`, subprocess) and the baseline (subprocess), each on free ports, runs the
streams against one server at a time (the other idles), and stops them all. Pass
`--gateway-address`/`--baseline-address` (and `--triton-metrics-url`) to measure servers that
are already running, e.g. on a GPU host.

As fast as possible (`--pace 0`, the default here) every stream keeps one frame in flight, so
N streams are N concurrent requests: frames/s is the capacity of each server at that
concurrency and latency is pure service time. `--pace 25` measures real-time streams instead.
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
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from perf import report
from perf.loadgen import LoadConfig, run_load
from perf.procstat import CLOCK_TICKS_PER_S, PROC, parse_stat
from perf.servers import child_process, start_gateway
from perf.stats import RunSummary, ratio

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BatchStats:
    """Triton's counters for one model over a run (from its Prometheus metrics).

    Attributes:
        inferences: frames inferred (``nv_inference_count`` delta).
        executions: model executions (``nv_inference_exec_count`` delta); fewer than
            `inferences` means Triton batched.
    """

    inferences: float
    executions: float

    @property
    def mean_batch(self) -> float:
        """Frames per execution (NaN when nothing ran)."""
        return self.inferences / self.executions if self.executions else float("nan")


def read_triton_counters(metrics_url: str, model: str) -> tuple[float, float]:
    """``(nv_inference_count, nv_inference_exec_count)`` of `model` from Triton's metrics.

    Raises:
        OSError: the metrics endpoint cannot be read.
    """
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics_url, timeout=5) as resp:
        text = resp.read().decode()
    counts = {"nv_inference_count": 0.0, "nv_inference_exec_count": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            # the parser names a counter's samples `<family>_total`
            name = sample.name.removesuffix("_total")
            if name in counts and sample.labels.get("model") == model:
                counts[name] += sample.value
    return counts["nv_inference_count"], counts["nv_inference_exec_count"]


def process_cpu_s(pid: int) -> float:
    """CPU time (user + system, all threads) a process has used so far (s), from /proc.

    Raises:
        OSError: no such process (or no /proc).
    """
    return parse_stat((PROC / str(pid) / "stat").read_text()).cpu_ticks / CLOCK_TICKS_PER_S


@dataclass(frozen=True, slots=True)
class Row:
    """One concurrency level: our summary, the baseline's, Triton's batching and the CPU
    time per frame of each server process (ms; NaN when the process is not ours to watch)."""

    streams: int
    ours: RunSummary
    baseline: RunSummary
    batch: BatchStats | None
    ours_cpu_ms: float = float("nan")
    baseline_cpu_ms: float = float("nan")


COMPARE_HEADERS = (
    "streams", "ours frames/s", "baseline frames/s", "throughput ratio (ours/baseline)",
    "ours p50 / p95 / p99 ms", "baseline p50 / p95 / p99 ms", "p95 ratio (ours/baseline)",
    "late ours / baseline", "errors ours / baseline", "Triton mean batch",
    "gateway CPU ms/frame", "baseline CPU ms/frame",
)


def compare_rows(rows: Sequence[Row]) -> list[list[object]]:
    """Table rows (columns `COMPARE_HEADERS`) with the ratios computed from the summaries."""
    out: list[list[object]] = []
    for r in rows:
        o, b = r.ours, r.baseline
        out.append([
            r.streams, o.fps, b.fps, f"{ratio(o.fps, b.fps):.2f}x",
            f"{report.fmt(o.p50_ms, 0)} / {report.fmt(o.p95_ms, 0)} / {report.fmt(o.p99_ms, 0)}",
            f"{report.fmt(b.p50_ms, 0)} / {report.fmt(b.p95_ms, 0)} / {report.fmt(b.p99_ms, 0)}",
            f"{ratio(o.p95_ms, b.p95_ms):.2f}",
            f"{o.late} / {b.late}", f"{o.errors} / {b.errors}",
            report.fmt(r.batch.mean_batch, 2) if r.batch else "n/a",
            report.fmt(r.ours_cpu_ms, 2), report.fmt(r.baseline_cpu_ms, 1),
        ])
    return out


def write_compare(rows: Sequence[Row], out_md: Path, out_json: Path, setup: Sequence[str],
                  argv: Sequence[str] | None = None) -> None:
    """Write the comparison table (markdown) and every summary (JSON)."""
    lines = report.header("Our stack vs the seed-architecture baseline", argv)
    lines += [*setup, ""]
    lines += report.markdown_table(COMPARE_HEADERS, compare_rows(rows))
    last = max(rows, key=lambda r: r.streams)
    lines += [
        "",
        f"At {last.streams} streams: throughput ratio "
        f"**{ratio(last.ours.fps, last.baseline.fps):.2f}x**, p95 latency ratio "
        f"**{ratio(last.ours.p95_ms, last.baseline.p95_ms):.2f}** (ours / baseline; below 1 = ours faster).",
    ]
    errors = [e for r in rows for s in (r.ours, r.baseline) for e in s.error_samples]
    if errors:
        lines += ["", "Errors seen:", *sorted({f"- `{e}`" for e in errors})]
    report.write_text(out_md, lines)
    report.write_json(out_json, {
        "machine": report.machine_line(), "command": report.command_line(argv),
        "date": report.utc_now(),
        "rows": [
            {"streams": r.streams, "ours": r.ours.to_dict(), "baseline": r.baseline.to_dict(),
             "triton_batch": None if r.batch is None else {
                 "inferences": r.batch.inferences, "executions": r.batch.executions},
             "gateway_cpu_ms_per_frame": r.ours_cpu_ms,
             "baseline_cpu_ms_per_frame": r.baseline_cpu_ms}
            for r in rows
        ],
    })


# ----------------------------------------------------------------------------- processes


@contextlib.contextmanager
def start_baseline(package: Path, workdir: Path) -> Iterator[tuple[str, int]]:
    """The baseline server on a free port; yields its gRPC address and pid."""
    ready = workdir / "baseline.port"
    log_path = workdir / "baseline.log"
    cmd = [sys.executable, "-m", "perf.baseline_server", "--package", str(package), "--port", "0",
           "--ready-file", str(ready)]
    with child_process(cmd, os.environ, log_path) as proc:
        deadline = time.monotonic() + 300
        while not ready.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"baseline exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"baseline not ready in 300 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield f"127.0.0.1:{int(ready.read_text())}", proc.pid


# ----------------------------------------------------------------------------- the run


async def _measure(address: str, label: str, args: argparse.Namespace, streams: int, frames: int,
                   frame_range: int, console: Console) -> RunSummary:
    config = LoadConfig(target="grpc", address=address, avatar=args.avatar, streams=streams,
                        frames=frames, pace_fps=args.pace, frame_range=frame_range,
                        timeout_s=args.timeout, label=label)
    summary, _ = await run_load(config, progress=not args.no_progress, console=console)
    return summary


def _cpu_ms_per_frame(pid: int | None, before: float | None, frames: int) -> float:
    if pid is None or before is None or frames == 0:
        return float("nan")
    return (process_cpu_s(pid) - before) * 1000.0 / frames


def run_compare(args: argparse.Namespace, ours: str, baseline: str, metrics_url: str | None,
                model: str, frame_range: int, console: Console,
                ours_pid: int | None = None, baseline_pid: int | None = None) -> list[Row]:
    """Warm both servers up, then for each N: ours, then the baseline."""
    for address, name in ((ours, "ours"), (baseline, "baseline")):
        asyncio.run(_measure(address, f"warm-up {name}", args, 1, args.warmup, frame_range, console))
    rows = []
    for n in args.streams:
        before = read_triton_counters(metrics_url, model) if metrics_url else None
        cpu0 = process_cpu_s(ours_pid) if ours_pid else None
        mine = asyncio.run(_measure(ours, f"ours x{n}", args, n, args.frames, frame_range, console))
        ours_cpu = _cpu_ms_per_frame(ours_pid, cpu0, mine.frames_ok)
        batch = None
        if metrics_url and before is not None:
            after = read_triton_counters(metrics_url, model)
            batch = BatchStats(after[0] - before[0], after[1] - before[1])
        cpu0 = process_cpu_s(baseline_pid) if baseline_pid else None
        base = asyncio.run(_measure(baseline, f"baseline x{n}", args, n, args.frames, frame_range, console))
        base_cpu = _cpu_ms_per_frame(baseline_pid, cpu0, base.frames_ok)
        rows.append(Row(n, mine, base, batch, ours_cpu, base_cpu))
        console.print(f"N={n}: ours {mine.fps:.1f} frames/s p95 {mine.p95_ms:.0f} ms | "
                      f"baseline {base.fps:.1f} frames/s p95 {base.p95_ms:.0f} ms")
    return rows


def build_parser() -> argparse.ArgumentParser:
    """The `python -m perf.compare` argument parser."""
    from lipsync.paths import PACKAGES_DIR

    p = argparse.ArgumentParser(prog="python -m perf.compare",
                                description="Our stack vs the seed-architecture baseline, side by side.")
    p.add_argument("--package", type=Path, default=PACKAGES_DIR / "demo", help="avatar package")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8], help="concurrency levels")
    p.add_argument("--frames", type=int, default=40, help="frames per stream per run")
    p.add_argument("--warmup", type=int, default=4, help="warm-up frames per server (1 stream)")
    p.add_argument("--pace", type=float, default=0.0, help="0 = as fast as possible, 25 = real time")
    p.add_argument("--timeout", type=float, default=120.0, help="per-reply timeout of the load generator (s)")
    p.add_argument("--triton-url", default=None, help="use this running Triton (gRPC host:port)")
    p.add_argument("--triton-metrics-url", default=None, help="its metrics URL (for the batch column)")
    p.add_argument("--gateway-address", default=None, help="use this running gateway (gRPC host:port)")
    p.add_argument("--baseline-address", default=None, help="use this running baseline (gRPC host:port)")
    p.add_argument("--gateway-env", action="append", default=[], metavar="LIPSYNC_X=VALUE",
                   help="a gateway setting for the gateway started here (repeat), e.g. the settings "
                        "of perf.capacity's issue9 'old' variant to measure the gateway before issue 9")
    p.add_argument("--out", type=Path, default=report.RESULTS_DIR / "compare.md")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Start what is missing, compare, write the report; exit 1 if any frame failed."""
    from lipsync.package import load_package
    from lipsync.paths import MODEL_REPOSITORY_CPU
    from lipsync.triton_local import TritonServer, free_ports

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    console = Console()
    pkg = load_package(args.package)
    args.avatar = pkg.name
    model = pkg.manifest.model_name
    frame_range = pkg.feature_rows
    gateway_env = dict(item.split("=", 1) for item in args.gateway_env)
    if any(not k.startswith("LIPSYNC_") for k in gateway_env):
        parser.error("--gateway-env takes LIPSYNC_*=VALUE")
    load_start = os.getloadavg()
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lipsync-compare-")))
        metrics_url = args.triton_metrics_url
        triton_url = args.triton_url
        if args.gateway_address is None and triton_url is None:
            http, grpc_port, metrics = free_ports(3)
            server = TritonServer(MODEL_REPOSITORY_CPU, http_port=http, grpc_port=grpc_port,
                                  metrics_port=metrics, load_models=(model,),
                                  log_file=work / "triton.log")
            server.start(timeout_s=180)
            stack.callback(server.stop)
            triton_url, metrics_url = server.grpc_url, server.metrics_url
        ours, ours_pid = args.gateway_address, None
        if ours is None:
            root = work / "packages"
            root.mkdir()
            shutil.copytree(pkg.root, root / pkg.name)
            gateway = stack.enter_context(
                start_gateway(triton_url, root, work, args.timeout, extra_env=gateway_env)
            )
            ours, ours_pid = gateway.grpc_address, gateway.pid
        baseline, baseline_pid = args.baseline_address, None
        if baseline is None:
            baseline, baseline_pid = stack.enter_context(start_baseline(pkg.root, work))
        rows = run_compare(
            args, ours, baseline, metrics_url, model, frame_range, console, ours_pid, baseline_pid
        )
    load_end = os.getloadavg()
    setup = [
        f"- avatar: `{pkg.name}` ({pkg.manifest.width}x{pkg.manifest.height}, {frame_range} frames, "
        f"weights trained: {pkg.manifest.weights.trained}); JPEG quality 85 on both",
        "- ours: CPU `tritonserver` (Python backend + ONNX Runtime, dynamic batching) + gateway"
        + (f" ({', '.join(f'{k}={v}' for k, v in gateway_env.items())})" if gateway_env else "")
        + ", gRPC `StreamInference`; baseline: `perf/baseline_server.py` (PyTorch eager, one frame "
        "at a time under a lock), same RPC",
        f"- load: {args.frames} frames per stream, "
        + (
            "as fast as possible, one frame in flight per stream"
            if args.pace == 0
            else f"paced at {args.pace:g} fps"
        )
        + "; latency and late frames as in `perf/stats.py` "
        "(late = more than 40 ms)",
        "- CPU ms/frame: CPU time (user + system, all threads) of the gateway process and of the "
        "baseline process per answered frame, from /proc (Triton's own CPU time is not in the "
        "gateway's figure)",
        f"- load average (1/5/15 min) at start {load_start[0]:.1f}/{load_start[1]:.1f}/{load_start[2]:.1f}, "
        f"at end {load_end[0]:.1f}/{load_end[1]:.1f}/{load_end[2]:.1f}: other work on this machine "
        f"shares its cores and affects both sides",
    ]
    write_compare(
        rows,
        args.out,
        args.out.with_suffix(".json"),
        setup,
        ["python", "-m", "perf.compare", *(sys.argv[1:] if argv is None else argv)],
    )
    console.print(f"wrote {args.out}")
    return 1 if any(r.ours.errors or r.baseline.errors for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
