"""Gateway load generator: N concurrent streams over gRPC `StreamInference` or the binary
WebSocket protocol, paced at 25 fps or as fast as possible.

    python -m perf.loadgen --target grpc --address localhost:50051 --streams 8 --pace 25 \
        --frames 250 --avatar demo
    python -m perf.loadgen --target ws --address localhost:8085 --streams 4 --pace 0

Reports frames/s, latency p50/p95/p99 (ms), frames later than their 40 ms slot and errors
(timing model in `perf/stats.py`), with a live progress display; writes JSON (every summary
and, with --raw, every frame) and a markdown table when asked.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from lipsync.contract import GATEWAY_GRPC_PORT, GATEWAY_HTTP_PORT
from perf import report
from perf.clients import (
    GrpcTransport,
    StreamAborted,
    StreamSpec,
    Transport,
    WsTransport,
    drive_stream,
)
from perf.stats import FrameRecord, RunSummary, summarize

if TYPE_CHECKING:
    from cv2.typing import MatLike

log = logging.getLogger(__name__)

SUMMARY_HEADERS = (
    "label", "target", "streams", "pace (fps)", "frames ok", "errors", "frames/s",
    "p50 ms", "p95 ms", "p99 ms", "late (>40 ms)", "server p50 ms",
)


@dataclass(frozen=True, slots=True)
class LoadConfig:
    """One load run.

    Attributes:
        target: "grpc" (StreamInference) or "ws" (binary WebSocket protocol).
        address: gRPC ``host:port``, or for ws ``host:port`` or a full ``ws://`` URL.
        avatar: avatar (model) name.
        streams: concurrent streams N (>= 1).
        frames: frames per stream (>= 1).
        pace_fps: 25 = paced (frame k due at t0 + k*40 ms); 0 = as fast as possible.
        window: frames in flight per stream; None = 1 unpaced (closed loop), 8 paced.
        frame_range: frame ids used are 0 .. frame_range-1 (stream s starts at an offset).
        timeout_s: a reply later than this aborts the stream (s).
        ws_path: path of the WebSocket endpoint when `address` is host:port.
        label: name of the run in reports.
        verify_every: decode the JPEG of every k-th frame of each stream after the run and
            count a reply that does not decode (or has the wrong size) as an error; 0 = none.
        expect_size: ``(width, height)`` px the verified frames must have; None = any size.
        ws_count_bounds: read a WebSocket success reply's ``bounds_len`` as a count of float32
            values, as gateways before commit c528de5 wrote it (`perf.clients.WsTransport`).
    """

    target: str
    address: str
    avatar: str = "demo"
    streams: int = 1
    frames: int = 100
    pace_fps: float = 25.0
    window: int | None = None
    frame_range: int = 50
    timeout_s: float = 30.0
    ws_path: str = "/ws"
    label: str = ""
    verify_every: int = 0
    expect_size: tuple[int, int] | None = None
    ws_count_bounds: bool = False

    def __post_init__(self) -> None:
        if self.target not in ("grpc", "ws"):
            raise ValueError(f"target must be 'grpc' or 'ws', got {self.target!r}")
        if self.streams < 1 or self.frames < 1 or self.frame_range < 1:
            raise ValueError(
                f"streams, frames and frame_range must be >= 1 "
                f"(got {self.streams}, {self.frames}, {self.frame_range})"
            )
        if self.pace_fps < 0:
            raise ValueError(f"pace must be >= 0 fps (0 = as fast as possible), got {self.pace_fps}")
        if self.verify_every < 0:
            raise ValueError(f"verify_every must be >= 0 (0 = no check), got {self.verify_every}")

    @property
    def effective_window(self) -> int:
        """Frames in flight per stream actually used."""
        if self.window is not None:
            return max(1, self.window)
        return 8 if self.pace_fps > 0 else 1

    @property
    def ws_url(self) -> str:
        """The WebSocket URL for target ws."""
        if self.address.startswith(("ws://", "wss://")):
            return self.address
        return f"ws://{self.address}{self.ws_path}"

    def stream_frame_ids(self, stream: int) -> tuple[int, ...]:
        """Frame ids for one stream: consecutive from an offset spread over the range."""
        offset = (stream * self.frame_range) // self.streams
        return tuple((offset + k) % self.frame_range for k in range(self.frames))


async def open_transport(config: LoadConfig) -> Transport:
    """Connect one stream's transport.

    Raises:
        StreamAborted: the connection failed.
    """
    if config.target == "grpc":
        return GrpcTransport(config.address)
    return await WsTransport.connect(config.ws_url, config.ws_count_bounds)


def _progress(console: Console | None, enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[fps]:>6.1f} frames/s"),
        TextColumn("errors {task.fields[errors]}"),
        TimeElapsedColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    )


async def drive_load(
    config: LoadConfig, on_record: Callable[[FrameRecord], None] | None = None
) -> list[FrameRecord]:
    """Run `config.streams` streams concurrently; every frame record (N x F), unverified.

    Args:
        config: the load.
        on_record: called with each record as it completes (progress display).
    """
    async def one(stream: int, t0: float) -> list[FrameRecord]:
        spec = StreamSpec(
            stream=stream,
            avatar=config.avatar,
            frame_ids=config.stream_frame_ids(stream),
            pace_fps=config.pace_fps,
            window=config.effective_window,
            timeout_s=config.timeout_s,
            sample_every=config.verify_every,
        )
        try:
            transport = await open_transport(config)
        except StreamAborted as exc:
            now = time.perf_counter()
            lost = [
                FrameRecord(stream, k, f, now, now, now, False, f"not sent: {exc}")
                for k, f in enumerate(spec.frame_ids)
            ]
            for rec in lost:
                if on_record is not None:
                    on_record(rec)
            return lost
        try:
            return await drive_stream(spec, transport, on_record, t0=t0)
        finally:
            await transport.close()

    t0 = time.perf_counter() + 0.05
    parts = await asyncio.gather(*(one(s, t0) for s in range(config.streams)))
    return [rec for part in parts for rec in part]


def check_jpeg(data: bytes, expect_size: tuple[int, int] | None) -> str:
    """Why `data` is not a good frame ("" when it is): it must decode as a colour JPEG of
    `expect_size` = ``(width, height)`` px (any size when None)."""
    if data[:2] != b"\xff\xd8":
        return "bad JPEG: no SOI marker"
    image: MatLike | None = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:  # OpenCV returns None for undecodable data (its stubs do not say so)
        return "bad JPEG: does not decode"
    height, width = image.shape[:2]
    if expect_size is not None and (width, height) != tuple(expect_size):
        return f"bad JPEG: {width}x{height} px, expected {expect_size[0]}x{expect_size[1]}"
    return ""


def verify_records(
    records: Sequence[FrameRecord], expect_size: tuple[int, int] | None
) -> tuple[list[FrameRecord], int]:
    """Decode the sampled replies (`FrameRecord.sample`); a bad one becomes a failed record.

    Returns:
        The records without their samples (a failed check as ``ok=False`` with the reason)
        and the number of samples checked.
    """
    out: list[FrameRecord] = []
    checked = 0
    for rec in records:
        if rec.sample is None:
            out.append(rec)
            continue
        checked += 1
        problem = check_jpeg(rec.sample, expect_size)
        out.append(dataclasses.replace(
            rec, sample=None, ok=rec.ok and not problem, error=problem or rec.error))
    return out, checked


def finish_load(config: LoadConfig, records: Sequence[FrameRecord]) -> tuple[RunSummary, list[FrameRecord]]:
    """Verify the sampled frames (`verify_records`) and summarise a run's records."""
    checked_records, checked = verify_records(records, config.expect_size)
    summary = summarize(
        checked_records,
        label=config.label or f"{config.target} x{config.streams}",
        streams=config.streams,
        frames_per_stream=config.frames,
        pace_fps=config.pace_fps,
        verified=checked,
    )
    return summary, checked_records


async def run_load(
    config: LoadConfig, *, progress: bool = True, console: Console | None = None
) -> tuple[RunSummary, list[FrameRecord]]:
    """Run `config.streams` streams concurrently, verify the samples and summarise them.

    Returns:
        The run's summary and every frame record (N x F).
    """
    label = config.label or f"{config.target} x{config.streams}"
    total = config.streams * config.frames
    errors = 0
    done = 0
    started = time.perf_counter()
    with _progress(console, progress) as bar:
        task = bar.add_task(label, total=total, fps=0.0, errors=0)

        def on_record(rec: FrameRecord) -> None:
            nonlocal errors, done
            errors += 0 if rec.ok else 1
            done += 1
            elapsed = max(time.perf_counter() - started, 1e-6)
            bar.update(task, advance=1, fps=(done - errors) / elapsed, errors=errors)

        records = await drive_load(config, on_record)
    return finish_load(config, records)


def summary_row(summary: RunSummary, target: str) -> list[object]:
    """One row of the markdown summary table (columns `SUMMARY_HEADERS`)."""
    return [
        summary.label, target, summary.streams, summary.pace_fps, summary.frames_ok,
        summary.errors, summary.fps, summary.p50_ms, summary.p95_ms, summary.p99_ms,
        f"{summary.late} ({summary.late_pct:.0f}%)" if summary.frames_ok else "n/a",
        summary.server_p50_ms,
    ]


def write_reports(
    summary: RunSummary,
    config: LoadConfig,
    *,
    json_path: Path | None,
    markdown_path: Path | None,
    records: Sequence[FrameRecord] | None = None,
    argv: Sequence[str] | None = None,
) -> None:
    """Write the run's JSON (summary, config, optionally every frame) and markdown table."""
    if json_path is not None:
        payload: dict[str, object] = {
            "machine": report.machine_line(),
            "command": report.command_line(argv),
            "date": report.utc_now(),
            "config": {
                "target": config.target, "address": config.address, "avatar": config.avatar,
                "streams": config.streams, "frames": config.frames, "pace_fps": config.pace_fps,
                "window": config.effective_window, "frame_range": config.frame_range,
                "verify_every": config.verify_every,
                "expect_size": list(config.expect_size) if config.expect_size else None,
            },
            "summary": summary.to_dict(),
        }
        if records is not None:
            payload["frames"] = [
                {"stream": r.stream, "seq": r.seq, "frame_id": r.frame_id, "ok": r.ok,
                 "latency_ms": r.latency_ms, "server_ms": r.server_ms, "error": r.error}
                for r in records
            ]
        report.write_json(json_path, payload)
    if markdown_path is not None:
        lines = report.header(f"Load run: {summary.label}", argv)
        lines += report.markdown_table(SUMMARY_HEADERS, [summary_row(summary, config.target)])
        if summary.error_samples:
            lines += ["", "Errors seen:", *[f"- `{e}`" for e in summary.error_samples]]
        report.write_text(markdown_path, lines)


def _size(text: str) -> tuple[int, int]:
    """``"880x720"`` -> ``(880, 720)`` (argparse type)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 880x720, got {text!r}") from None
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f"frame size must be positive, got {text!r}")
    return width, height


def build_parser() -> argparse.ArgumentParser:
    """The `python -m perf.loadgen` argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m perf.loadgen",
        description="Drive the gateway (or the baseline) with N concurrent frame streams.",
    )
    p.add_argument("--target", choices=("grpc", "ws"), default="grpc",
                   help="gRPC StreamInference or the binary WebSocket protocol")
    p.add_argument("--address", default=None,
                   help=f"grpc: host:port (default localhost:{GATEWAY_GRPC_PORT}); ws: host:port "
                        f"or ws:// URL (default localhost:{GATEWAY_HTTP_PORT})")
    p.add_argument("--ws-path", default="/ws", help="WebSocket path when --address is host:port")
    p.add_argument("--avatar", default="demo", help="avatar (model) name")
    p.add_argument("--streams", type=int, default=1, help="concurrent streams N")
    p.add_argument("--pace", type=float, default=25.0,
                   help="frames/s per stream: 25 = real time, 0 = as fast as possible")
    p.add_argument("--frames", type=int, default=100, help="frames per stream")
    p.add_argument("--window", type=int, default=None,
                   help="frames in flight per stream (default 1 unpaced, 8 paced)")
    p.add_argument("--frame-range", type=int, default=50,
                   help="use frame ids 0..R-1 (must not exceed the avatar's frame count)")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds without a reply before a stream is aborted")
    p.add_argument("--label", default="", help="name of the run in the reports")
    p.add_argument("--verify-every", type=int, default=0, metavar="K",
                   help="decode every K-th reply of each stream after the run; a bad one "
                        "counts as an error (default 0 = no check)")
    p.add_argument("--expect-size", type=_size, default=None, metavar="WxH",
                   help="with --verify-every: the frame size the JPEGs must have, e.g. 880x720")
    p.add_argument("--json", type=Path, default=None, help="write the summary as JSON here")
    p.add_argument("--raw", action="store_true", help="include every frame in the JSON")
    p.add_argument("--markdown", type=Path, default=None, help="write a markdown table here")
    p.add_argument("--no-progress", action="store_true", help="no live progress display")
    return p


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    """Turn parsed arguments into a `LoadConfig` (raises ValueError on bad values)."""
    port = GATEWAY_GRPC_PORT if args.target == "grpc" else GATEWAY_HTTP_PORT
    address = args.address or f"localhost:{port}"
    return LoadConfig(
        target=args.target, address=address, avatar=args.avatar, streams=args.streams,
        frames=args.frames, pace_fps=args.pace, window=args.window,
        frame_range=args.frame_range, timeout_s=args.timeout, ws_path=args.ws_path,
        label=args.label, verify_every=args.verify_every, expect_size=args.expect_size,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: run one load, print the table, write the reports; exit 1 if any error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    console = Console()
    summary, records = asyncio.run(run_load(config, progress=not args.no_progress, console=console))
    console.print("\n".join(report.markdown_table(SUMMARY_HEADERS, [summary_row(summary, config.target)])),
                  soft_wrap=True, markup=False, highlight=False)
    for err in summary.error_samples:
        console.print(f"[red]error:[/red] {err}", markup=True, highlight=False)
    write_reports(summary, config, json_path=args.json, markdown_path=args.markdown,
                  records=records if args.raw else None,
                  argv=["python", "-m", "perf.loadgen", *(sys.argv[1:] if argv is None else argv)])
    return 1 if summary.errors else 0


if __name__ == "__main__":
    sys.exit(main())
