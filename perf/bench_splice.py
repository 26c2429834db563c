"""Spliced partial JPEG vs today's full-frame composite + encode at 720p: CPU ms and bytes per
frame, per restart interval R (issue 9 item 2), and the cost of building the backgrounds.

    python -m perf.bench_splice                   # builds the 720p avatar once (~1 min)
    python -m perf.bench_splice --iterations 300 --restarts 1,2,4,8,16,row,auto

Frames: the demo clip built at 720p by the package builder (`perf.micro_720p.ensure_avatar`,
880x720, real face rectangles) and the same frames pillarboxed to 1280x720. Predictions: real
ONNX Runtime outputs of the avatar's (untrained) UNet, as in `perf.micro_720p`.

Paths timed per output frame (consecutive frames, ping-pong over the video):

- today, simplejpeg / OpenCV: `lipsync.frames.paste_back` (full-frame copy) + full encode;
- spliced, R: `lipsync.frames.paste_back_region` on the aligned rectangle
  (`lipsync.jpeg_splice.aligned_rect`) + `encode_bgr` of that rectangle + `splice` into the
  frame's precomputed background (`SplicedBackground`, built before timing).

All paths run round-robin in one loop (each iteration calls every path once), so load on this
shared machine hits them alike; times are the calling thread's CPU time
(`time.thread_time_ns`; OpenCV threads 1, both libraries encode on the calling thread), medians
over the iterations. The spliced output is checked byte-identical to a full encode with the
same restart interval on the first frames. Writes `perf/results/bench_splice.md` and `.json`.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray

from lipsync.frames import crop_328, paste_back, paste_back_region, pingpong_index
from lipsync.jpeg_splice import (
    McuGrid,
    SplicedBackground,
    SplicePlan,
    SpliceSettings,
    Subsampling,
    aligned_rect,
    encode_bgr,
    restart_mcus_for,
)
from perf import report
from perf.micro_720p import SCRATCH, ensure_avatar, pillarbox, real_predictions

log = logging.getLogger(__name__)

QUALITY = 85
SUBSAMPLING: Subsampling = "420"
CHECKED_FRAMES = 8
"""Output frames per spliced path whose bytes are compared with a full encode."""
BUILD_FRAMES = 250
"""Background frames built to time a 10 s avatar at 25 fps."""

Stages = dict[str, float]
"""CPU ms per stage of one call."""


@dataclass(slots=True)
class PathResult:
    """One timed path on one frame set: per-stage CPU ms of every call and the output sizes."""

    frame: str
    path: str
    restart_mcus: int = 0
    wraps: bool = False
    rect_px: str = ""
    stages: dict[str, list[float]] = field(default_factory=dict)
    sizes: list[int] = field(default_factory=list)

    def median(self, stage: str) -> float:
        """Median CPU ms of a stage (``total``: the whole call)."""
        return float(np.median(self.stages[stage]))


@dataclass(frozen=True, slots=True)
class BuildCost:
    """Cost of precomputing one frame set's backgrounds at one R."""

    frame: str
    restart_mcus: int
    encode_split_ms: float
    split_only_ms: float
    plan_ms: float
    kib_per_frame: float
    offsets_bytes_per_frame: float


class _Clock:
    """Per-stage CPU time of the calling thread, in ms."""

    def __init__(self) -> None:
        self.stages: Stages = {}
        self._t = time.thread_time_ns()

    def lap(self, stage: str) -> None:
        now = time.thread_time_ns()
        self.stages[stage] = (now - self._t) / 1e6
        self._t = now


PathFn = Callable[[int], tuple[bytes, Stages]]


def today_path(frames: NDArray[np.uint8], rects: NDArray[np.int32], crops: NDArray[np.uint8],
               preds: NDArray[np.uint8], encode: Callable[[NDArray[np.uint8]], bytes]) -> PathFn:
    """Today's gateway work: paste back into a full-frame copy, then encode the whole frame."""
    n = len(frames)

    def run(i: int) -> tuple[bytes, Stages]:
        v = pingpong_index(i, n)
        clock = _Clock()
        composited = paste_back(frames[v], rects[v], crops[v], preds[i % len(preds)])
        clock.lap("composite")
        out = encode(composited)
        clock.lap("encode")
        return out, clock.stages

    return run


def spliced_path(frames: NDArray[np.uint8], rects: NDArray[np.int32], crops: NDArray[np.uint8],
                 preds: NDArray[np.uint8], plans: Sequence[SplicePlan], settings: SpliceSettings) -> PathFn:
    """The spliced path: composite the aligned rectangle only, encode it, splice it (with the
    video frame's `SplicePlan`, built at load time)."""
    n = len(frames)

    def run(i: int) -> tuple[bytes, Stages]:
        v = pingpong_index(i, n)
        clock = _Clock()
        region = paste_back_region(frames[v], rects[v], crops[v], preds[i % len(preds)], plans[v].rect)
        clock.lap("composite")
        rect_jpeg = encode_bgr(region, settings)
        clock.lap("encode")
        out = plans[v].apply(rect_jpeg)
        clock.lap("splice")
        return out, clock.stages

    return run


def restart_choices(spec: str, width: int) -> list[int]:
    """Parse ``1,2,...,row,auto``: ``row`` = MCUs per row, ``auto`` = `restart_mcus_for`."""
    cols = McuGrid.of(width, 16, SpliceSettings(QUALITY, SUBSAMPLING, 1)).cols
    out: list[int] = []
    for item in spec.split(","):
        item = item.strip()
        r = cols if item == "row" else restart_mcus_for(width, SUBSAMPLING) if item == "auto" else int(item)
        if r not in out:
            out.append(r)
    return sorted(out)


def build_cost(frames: NDArray[np.uint8], rects: NDArray[np.int32], settings: SpliceSettings,
               label: str) -> BuildCost:
    """Time `SplicedBackground.encode` (encode + split), `from_jpeg` (split only) and
    `SplicePlan.of` over `BUILD_FRAMES` frames (cycling the video), CPU ms per frame, and the
    memory per frame."""
    n = len(frames)
    t0 = time.thread_time_ns()
    built = [SplicedBackground.encode(frames[k % n], settings) for k in range(BUILD_FRAMES)]
    t1 = time.thread_time_ns()
    for b in built:
        SplicedBackground.from_jpeg(b.jpeg)
    t2 = time.thread_time_ns()
    for k, b in enumerate(built):
        SplicePlan.of(b, aligned_rect(rects[k % n], b.grid))
    t3 = time.thread_time_ns()
    return BuildCost(label, settings.restart_mcus, (t1 - t0) / 1e6 / BUILD_FRAMES,
                     (t2 - t1) / 1e6 / BUILD_FRAMES, (t3 - t2) / 1e6 / BUILD_FRAMES,
                     float(np.mean([b.nbytes for b in built])) / 1024,
                     float(np.mean([b.starts.nbytes for b in built])))


def bench_frame_set(
    frames: NDArray[np.uint8],
    rects: NDArray[np.int32],
    preds: NDArray[np.uint8],
    restarts: Sequence[int],
    iterations: int,
    label: str,
) -> tuple[list[PathResult], list[BuildCost]]:
    """Time every path round-robin on one frame set; check byte identity; time the builds."""
    from gateway.jpeg import OpenCvJpegEncoder, SimpleJpegEncoder

    crops = np.stack([crop_328(f, r) for f, r in zip(frames, rects, strict=True)])
    paths: list[tuple[PathResult, PathFn]] = []
    for encoder in (SimpleJpegEncoder(QUALITY, SUBSAMPLING), OpenCvJpegEncoder(QUALITY, SUBSAMPLING)):
        paths.append((PathResult(label, f"today: paste_back + {encoder.name} full frame"),
                      today_path(frames, rects, crops, preds, encoder.encode)))
    builds: list[BuildCost] = []
    for r in restarts:
        settings = SpliceSettings(QUALITY, SUBSAMPLING, r)
        backgrounds = [SplicedBackground.encode(f, settings) for f in frames]
        plans = [
            SplicePlan.of(b, aligned_rect(rect, b.grid)) for b, rect in zip(backgrounds, rects, strict=True)
        ]
        areas = sorted({(x1 - x0, y1 - y0) for x0, y0, x1, y1 in (p.rect for p in plans)},
                       key=lambda wh: -wh[0] * wh[1])
        result = PathResult(label, f"spliced, R={r}", r, backgrounds[0].grid.wraps,
                            ", ".join(f"{w}x{h}" for w, h in areas[:2]))
        run = spliced_path(frames, rects, crops, preds, plans, settings)
        for i in range(CHECKED_FRAMES):  # byte identity with a full encode of the composited frame
            v = pingpong_index(i, len(frames))
            full = encode_bgr(paste_back(frames[v], rects[v], crops[v], preds[i % len(preds)]), settings)
            if run(i)[0] != full:
                raise AssertionError(f"{label} R={r}: spliced frame {i} differs from the full encode")
        paths.append((result, run))
        builds.append(build_cost(frames, rects, settings, label))
    log.info("%s: %d paths, %d iterations", label, len(paths), iterations)
    for i in range(3):  # warm-up
        for _, run in paths:
            run(i)
    for i in range(iterations):
        for result, run in paths:
            out, stages = run(i)
            stages["total"] = sum(stages.values())
            for stage, ms in stages.items():
                result.stages.setdefault(stage, []).append(ms)
            result.sizes.append(len(out))
    log.info("%s done", label)
    return [p for p, _ in paths], builds


def write_bench_report(results: Sequence[PathResult], builds: Sequence[BuildCost], setup: Sequence[str],
                       out: Path, argv: Sequence[str] | None = None) -> None:
    """Markdown tables (per frame set: paths; then background builds) plus JSON next to it."""
    lines = report.header("Spliced partial JPEG vs full-frame encode at 720p", argv)
    lines += [*setup, ""]
    for frame in dict.fromkeys(r.frame for r in results):
        rows = [r for r in results if r.frame == frame]
        base = rows[0].median("total")  # today with simplejpeg
        table = []
        for r in rows:
            table.append([
                r.path, r.rect_px or "full frame", "yes" if r.wraps else "",
                f"{r.median('composite'):.3f}", f"{r.median('encode'):.3f}",
                f"{r.median('splice'):.3f}" if "splice" in r.stages else "",
                f"{r.median('total'):.3f}", f"{float(np.percentile(r.stages['total'], 90)):.3f}",
                f"{base / r.median('total'):.2f}x", f"{float(np.mean(r.sizes)) / 1024:.1f}",
            ])
        lines += [f"## {frame}", ""]
        lines += report.markdown_table(
            ["path", "encoded rect px (largest)", "R wraps rows", "composite ms", "encode ms",
             "splice ms", "total ms (median)", "total ms (p90)", "speed-up vs today (simplejpeg)",
             "KiB/frame"], table)
        spliced = [r for r in rows if r.restart_mcus]
        best = min(spliced, key=lambda r: r.median("total"))
        lines += ["", (f"Fastest spliced path here: R={best.restart_mcus} ({best.median('total'):.3f} ms, "
                       f"{base / best.median('total'):.2f}x less CPU than today's simplejpeg path); "
                       f"{len(rows[0].stages['total'])} calls per path."), ""]
    lines += ["## Building the backgrounds", "",
              (f"Per background frame, over {BUILD_FRAMES} frames (a 10 s avatar at 25 fps; the video "
              "cycled): encode + split = what a gateway does at load time; split only = "
              "`SplicedBackground.from_jpeg` of stored JPEG bytes (what loading a format-v2 package "
              "that stores the JPEGs would still do, unless it also stores the offsets); plan = "
              "`SplicePlan.of` for the frame's face rectangle (load time either way; it holds views, "
              "not copies, of the background)."), ""]
    lines += report.markdown_table(
        ["frame set", "R", "encode + split ms/frame", "split only ms/frame", "plan ms/frame",
         f"encode + split s / {BUILD_FRAMES} frames", "KiB/frame (JPEG + offsets)",
         "offsets bytes/frame", f"MiB / {BUILD_FRAMES} frames"],
        [[b.frame, b.restart_mcus, f"{b.encode_split_ms:.2f}", f"{b.split_only_ms:.3f}", f"{b.plan_ms:.3f}",
          f"{b.encode_split_ms * BUILD_FRAMES / 1e3:.2f}", f"{b.kib_per_frame:.1f}",
          f"{b.offsets_bytes_per_frame:.0f}", f"{b.kib_per_frame * BUILD_FRAMES / 1024:.1f}"]
         for b in builds])
    report.write_text(out, lines)
    report.write_json(out.with_suffix(".json"), {
        "machine": report.machine_line(), "command": report.command_line(argv), "date": report.utc_now(),
        "paths": [{"frame": r.frame, "path": r.path, "restart_mcus": r.restart_mcus, "wraps": r.wraps,
                   "rect_px": r.rect_px, "median_ms": {s: r.median(s) for s in r.stages},
                   "mean_bytes": float(np.mean(r.sizes)), "calls": len(r.sizes)} for r in results],
        "builds": [asdict(b) for b in builds],
    })


def main(argv: Sequence[str] | None = None) -> int:
    """Build (once) the 720p avatar, run the paths side by side, write the report."""
    p = argparse.ArgumentParser(prog="python -m perf.bench_splice", description=__doc__.split("\n")[0])
    p.add_argument("--iterations", type=int, default=300, help="timed calls per path")
    p.add_argument("--restarts", default="1,2,4,8,16,row,auto",
                   help="restart intervals R in MCUs; row = one MCU row, auto = restart_mcus_for (128 px)")
    p.add_argument("--scratch", type=Path, default=SCRATCH, help="scratch root for the 720p avatar")
    p.add_argument("--out", type=Path, default=report.RESULTS_DIR / "bench_splice.md")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cv2.setNumThreads(1)

    from lipsync.frames import inner_320
    from lipsync.package import load_package

    pkg = load_package(ensure_avatar(args.scratch))
    onnx_path = args.scratch / "model_repo_cpu" / pkg.manifest.model_name / "1" / "model.onnx"
    rects = np.asarray(pkg.rects, dtype=np.int32)
    frames = np.ascontiguousarray(pkg.frames)
    inners = np.stack([inner_320(crop_328(f, r)) for f, r in zip(frames, rects, strict=True)])
    preds = real_predictions(onnx_path, np.ascontiguousarray(inners), pkg.features, 8)
    h, w = frames.shape[1:3]
    results, builds = bench_frame_set(
        frames,
        rects,
        preds,
        restart_choices(args.restarts, w),
        args.iterations,
        f"{w}x{h} (the clip at 720p, aspect kept)",
    )
    wide, wide_rects = pillarbox(frames, rects, 1280)
    more = bench_frame_set(wide, wide_rects, preds, restart_choices(args.restarts, 1280), args.iterations,
                           "1280x720 (same frames pillarboxed)")
    results += more[0]
    builds += more[1]
    side = rects[:, 2] - rects[:, 0]
    setup = [
        (f"- avatar: `{pkg.name}` built by `lipsync package build --height 720` from the demo clip "
        f"(176x144 upscaled: smoother than camera 720p, so JPEGs are small and fast); "
        f"{pkg.frame_count} video frames, face rectangle {int(side.min())}-{int(side.max())} px; "
        "predictions: real ONNX Runtime outputs of its untrained UNet"),
        (f"- JPEG quality {QUALITY}, 4:{SUBSAMPLING[1]}:{SUBSAMPLING[2]}; spliced paths encode with OpenCV "
        f"{cv2.__version__} (libjpeg-turbo, restart markers), each checked byte-identical to a full "
        f"encode of the composited frame on {CHECKED_FRAMES} frames"),
        ("- times: CPU time of the calling thread (ms), median (and p90) over the calls; paths "
        "interleaved round-robin in one loop; composite = `paste_back` (today) or "
        "`paste_back_region` (spliced); KiB/frame = mean output size"),
    ]
    write_bench_report(results, builds, setup, args.out,
                       ["python", "-m", "perf.bench_splice", *(sys.argv[1:] if argv is None else argv)])
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
