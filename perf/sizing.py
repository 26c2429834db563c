"""Sizing on paper: streams per GPU (H100, L4) and gateway cores per GPU, computed from the
measured numbers in `perf/results/` and stated assumptions. Every output is an ESTIMATE.

    python -m perf.sizing          # after perf.model_cost and perf.capacity --preset issue9

Inputs (written by the other tools): `model_cost.json` (conv GFLOP and FP16 activation bytes
per frame, from the ONNX graph), `capacity_issue9.json` (today's gateway, the variant ``new``:
its whole CPU and its event loop's per 880x720 frame with an identity UNet, measured under
load). GPU figures are the
vendors' datasheet peaks (FP16 tensor, dense; DRAM bandwidth). The efficiency ranges are
assumptions, written next to the result. Method in `perf/SIZING.md`; writes
`perf/results/sizing.md` and `.json`.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from perf import report
from perf.procstat import EVENT_LOOP

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Gpu:
    """Datasheet peaks of one GPU (not measured here)."""

    name: str
    fp16_tflops: float
    dram_tb_s: float


GPUS = (
    Gpu("H100 SXM (80 GB)", fp16_tflops=989.0, dram_tb_s=3.35),
    Gpu("L4 (24 GB)", fp16_tflops=121.0, dram_tb_s=0.30),
)
"""Dense FP16 tensor-core peak (TFLOP/s) and DRAM bandwidth (TB/s) from NVIDIA's datasheets."""


@dataclass(frozen=True, slots=True)
class Assumptions:
    """The assumed ranges (low, high) the estimate rests on.

    Attributes:
        compute_eff: fraction of the FP16 peak this depthwise-separable UNet reaches.
        bandwidth_eff: fraction of the DRAM bandwidth reached on activation traffic.
        traffic_factor: DRAM bytes moved per byte of (fused) activation produced: written
            once and read once = 2 (L2 hits lower it).
        gpu_headroom: share of the GPU's frame rate to plan for, so queueing keeps p95 inside
            the 40 ms slot.
        cpu_headroom: share of a core to plan for.
        fps: frames per second per stream.
    """

    compute_eff: tuple[float, float] = (0.05, 0.15)
    bandwidth_eff: tuple[float, float] = (0.5, 0.7)
    traffic_factor: float = 2.0
    gpu_headroom: float = 0.7
    cpu_headroom: float = 0.7
    fps: float = 25.0


@dataclass(frozen=True, slots=True)
class GpuEstimate:
    """Estimated frame rate and streams of one GPU (low, high), the gateway cores they need,
    and the gateway processes (one asyncio event loop each) their per-frame overhead needs."""

    gpu: str
    compute_bound_fps: tuple[float, float]
    bandwidth_bound_fps: tuple[float, float]
    fps: tuple[float, float]
    streams: tuple[int, int]
    gateway_cores: tuple[float, float]
    gateway_processes: tuple[int, int]


def estimate(gpu: Gpu, gflop: float, activation_mib: float, gateway_ms: float,
             a: Assumptions, overhead_ms: float | None = None) -> GpuEstimate:
    """Streams one GPU can serve and the gateway cores they need (both ranges, estimates).

    frames/s = min(peak FLOP/s x compute_eff / FLOP per frame,
                   DRAM B/s x bandwidth_eff / (traffic_factor x activation bytes per frame));
    streams = frames/s x gpu_headroom / fps; cores = streams x fps x gateway_ms / 1000 / cpu_headroom;
    processes = ceil(streams x fps x overhead_ms / 1000 / cpu_headroom): the per-frame Python
    overhead runs on each process's one event-loop thread (`overhead_ms` defaults to
    `gateway_ms`).
    """
    traffic = a.traffic_factor * activation_mib * 2**20
    comp = _pair(gpu.fp16_tflops * 1e12 * e / (gflop * 1e9) for e in a.compute_eff)
    band = _pair(gpu.dram_tb_s * 1e12 * e / traffic for e in a.bandwidth_eff)
    fps = (min(comp[0], band[0]), min(comp[1], band[1]))
    streams = _pair(int(f * a.gpu_headroom / a.fps) for f in fps)
    cores = _pair(s * a.fps * gateway_ms / 1000.0 / a.cpu_headroom for s in streams)
    loop_ms = gateway_ms if overhead_ms is None else overhead_ms
    procs = _pair(max(1, math.ceil(s * a.fps * loop_ms / 1000.0 / a.cpu_headroom)) for s in streams)
    return GpuEstimate(gpu.name, comp, band, fps, streams, cores, procs)


def _pair(values: Iterable[T]) -> tuple[T, T]:
    """The (low, high) of a range computed element-wise (ValueError unless exactly two)."""
    low, high = values
    return low, high


CAPACITY_VARIANT = "new"
"""The variant of `capacity_issue9.json` that is today's gateway (its defaults)."""


def gateway_ms_per_frame(capacity: dict[str, Any], variant: str = CAPACITY_VARIANT) -> tuple[float, float]:
    """(whole gateway, its event loop) in CPU ms per 720p frame: the largest over the
    protocols of `variant`'s cells at their highest stream count in a `perf.capacity` JSON
    (identity UNet, so this is the gateway's own work: pixels, protocol, Triton calls).

    Raises:
        ValueError: no cell of `variant`.
    """
    cells = [c for c in capacity["cells"] if c["variant"] == variant]
    if not cells:
        raise ValueError(f"the capacity results have no cell of variant {variant!r}")
    top = max(c["cell"]["streams"] for c in cells)
    cells = [c for c in cells if c["cell"]["streams"] == top]
    total = max(float(c["gateway_ms"]["total"]) for c in cells)
    loop = max(float(c["gateway_ms"][EVENT_LOOP]) for c in cells)
    return total, loop


BEGIN_MARK = "<!-- sizing:begin (written by python -m perf.sizing; do not edit) -->"
END_MARK = "<!-- sizing:end -->"


def update_doc_block(doc: Path, block: Sequence[str]) -> bool:
    """Replace the text between `BEGIN_MARK` and `END_MARK` in `doc` with `block`.

    Returns:
        False (and leaves the file alone) when the file or its markers are missing.
    """
    if not doc.exists():
        return False
    text = doc.read_text()
    start, end = text.find(BEGIN_MARK), text.find(END_MARK)
    if start < 0 or end < start:
        return False
    new = text[: start + len(BEGIN_MARK)] + "\n" + "\n".join(block) + "\n" + text[end:]
    doc.write_text(new)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: read the results, write the estimate (and its block in perf/SIZING.md)."""
    p = argparse.ArgumentParser(prog="python -m perf.sizing", description=__doc__.split("\n")[0])
    p.add_argument("--results", type=Path, default=report.RESULTS_DIR)
    p.add_argument("--out", type=Path, default=report.RESULTS_DIR / "sizing.md")
    p.add_argument("--doc", type=Path, default=Path(__file__).resolve().parent / "SIZING.md",
                   help="document whose marked block receives the table (default perf/SIZING.md)")
    args = p.parse_args(argv)
    try:
        cost = json.loads((args.results / "model_cost.json").read_text())["cost"]
        capacity = json.loads((args.results / "capacity_issue9.json").read_text())
    except FileNotFoundError as exc:
        p.error(f"{exc.filename} is missing: run perf.model_cost and perf.capacity --preset issue9 first")
    a = Assumptions()
    total, loop = gateway_ms_per_frame(capacity)
    ests = [estimate(g, cost["conv_gflop"], cost["activation_mib_fp16_fused"], total, a, loop)
            for g in GPUS]
    argv_full = ["python", "-m", "perf.sizing", *(sys.argv[1:] if argv is None else argv)]
    lines = report.header("Sizing estimate (ESTIMATES, not measurements)", argv_full)
    lines += [
        "Inputs measured here: "
        f"{cost['conv_gflop']:.2f} GFLOP and {cost['activation_mib_fp16_fused']:.0f} MiB of FP16 "
        f"activations per frame after fusion (`model_cost.md`, estimate of fusion); gateway CPU per "
        f"720p frame = **{total:.2f} ms**, of which {loop:.2f} ms on its event loop "
        f"(`capacity_issue9.md`, variant `{CAPACITY_VARIANT}`, identity UNet, the larger of gRPC "
        "and WebSocket at the highest stream count; measured on this machine's CPU).",
        "",
        f"Assumptions: compute efficiency {a.compute_eff[0]:.0%}-{a.compute_eff[1]:.0%} of the FP16 "
        f"peak; bandwidth efficiency {a.bandwidth_eff[0]:.0%}-{a.bandwidth_eff[1]:.0%}; DRAM traffic "
        f"{a.traffic_factor:g}x the activations; plan for {a.gpu_headroom:.0%} of the GPU and "
        f"{a.cpu_headroom:.0%} of each core; {a.fps:g} fps per stream.",
        "",
    ]
    table = report.markdown_table(
        ["GPU (datasheet peaks)", "compute-bound frames/s (est.)", "bandwidth-bound frames/s (est.)",
         "frames/s (est.)", "streams at 25 fps (est.)", "gateway cores (est.)",
         "gateway processes (est.)"],
        [[e.gpu, f"{e.compute_bound_fps[0]:,.0f}-{e.compute_bound_fps[1]:,.0f}",
          f"{e.bandwidth_bound_fps[0]:,.0f}-{e.bandwidth_bound_fps[1]:,.0f}",
          f"{e.fps[0]:,.0f}-{e.fps[1]:,.0f}", f"{e.streams[0]}-{e.streams[1]}",
          f"{e.gateway_cores[0]:.1f}-{e.gateway_cores[1]:.1f}",
          f"{e.gateway_processes[0]}-{e.gateway_processes[1]}"] for e in ests],
    )
    lines += table
    lines += ["", "Replace these with `perf/perf_analyzer.sh --profile gpu` and `python -m perf.loadgen "
              "--pace 25` on the GPU host: the estimate only says where to start."]
    report.write_text(args.out, lines)
    block = [f"_Estimates computed {report.utc_now()} by `python -m perf.sizing` from "
             f"[results/](results/) (details: [results/sizing.md](results/sizing.md))._", "",
             f"Gateway CPU per 720p frame (measured, `capacity_issue9.md`): {total:.2f} ms, of "
             f"which {loop:.2f} ms on the event loop.", "", *table]
    update_doc_block(args.doc, block)
    report.write_json(args.out.with_suffix(".json"), {
        "machine": report.machine_line(), "command": report.command_line(argv_full),
        "date": report.utc_now(), "assumptions": asdict(a),
        "gateway_ms_per_frame": {"total": total, "event_loop": loop},
        "estimates": [asdict(e) for e in ests],
    })
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
