"""Helpers of `perf/perf_analyzer.sh`: real input tensors for perf_analyzer, and the markdown
report of its CSV output.

    python -m perf.pa_tools input --package packages/demo --frame 10 --out DIR [--model NAME]
    python -m perf.pa_tools report --csv run.csv --out perf/results/perf_analyzer_cpu.md \
        --title "..." --command "..."

`input` writes perf_analyzer's *directory* input format: one raw row-major file per model input,
named after the input, holding one batch-1 tensor of the UNet's Triton contract
(`lipsync.contract`): ``UNET_CROP`` (the package's inner crop of a real video frame, BGR) and
``UNET_AUDIO`` (the frame's feature window, docs/REFERENCE.md s.2 step 6); it prints the
perf_analyzer arguments that go with them, one per line (model, input folder, shapes).
"""
from __future__ import annotations

import argparse
import csv
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lipsync.contract import UNET_AUDIO, UNET_CROP
from perf import report

US_PER_MS = 1000.0


def write_input_dir(package_dir: Path, frame_id: int, out: Path) -> tuple[Path, Path]:
    """Write the ``UNET_CROP`` (u8 [320,320,3]) and ``UNET_AUDIO`` (f32 [16,512]) raw files of
    one frame, named after the tensors.

    Args:
        package_dir: an avatar package folder (validated by `load_package`).
        frame_id: the output frame whose inputs to write (0 .. M-1).
        out: folder to write into (created).

    Returns:
        The two file paths.

    Raises:
        ValueError: frame_id outside the package's feature rows.
        lipsync.package.PackageError: invalid package.
    """
    from lipsync.frames import audio_window, crop_328, inner_320, pingpong_index
    from lipsync.package import load_package

    pkg = load_package(package_dir)
    if not 0 <= frame_id < pkg.feature_rows:
        raise ValueError(f"frame {frame_id} outside 0..{pkg.feature_rows - 1} of {package_dir}")
    v = pingpong_index(frame_id, pkg.frame_count)
    crop = np.ascontiguousarray(inner_320(crop_328(pkg.frames[v], pkg.rects[v])))
    audio = np.ascontiguousarray(audio_window(pkg.features, frame_id), dtype="<f4")
    out.mkdir(parents=True, exist_ok=True)
    crop_path, audio_path = out / UNET_CROP.name, out / UNET_AUDIO.name
    crop_path.write_bytes(crop.astype(UNET_CROP.dtype).tobytes())
    audio_path.write_bytes(audio.tobytes())
    return crop_path, audio_path


def perf_analyzer_args(model: str, input_dir: Path) -> list[str]:
    """perf_analyzer's model, input-data and ``--shape`` arguments for the UNet contract."""
    args = ["-m", model, "--input-data", str(input_dir)]
    for spec in (UNET_CROP, UNET_AUDIO):
        args += ["--shape", f"{spec.name}:{','.join(map(str, spec.dims))}"]
    return args


def read_pa_csv(path: Path) -> list[dict[str, str]]:
    """Rows of one or more concatenated perf_analyzer CSV files (repeated headers skipped).

    Raises:
        ValueError: no header with a ``Concurrency`` column.
    """
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    if not lines or not lines[0].startswith("Concurrency"):
        raise ValueError(f"{path}: not a perf_analyzer CSV (first line {lines[:1]!r})")
    header = lines[0]
    body = [ln for ln in lines[1:] if ln != header]
    return list(csv.DictReader([header, *body]))


def read_batching(text_path: Path) -> dict[int, float]:
    """Mean batch size per concurrency from perf_analyzer's text output: the server's
    ``Inference count`` over its ``Execution count`` in each ``Request concurrency: C`` block
    (the last block per concurrency wins)."""
    out: dict[int, float] = {}
    conc: int | None = None
    inferences: float | None = None
    for line in text_path.read_text().splitlines():
        line = line.strip()
        if m := re.match(r"Request concurrency: (\d+)", line):
            conc, inferences = int(m.group(1)), None
        elif m := re.match(r"Inference count: (\d+)", line):
            inferences = float(m.group(1))
        elif (m := re.match(r"Execution count: (\d+)", line)) and conc is not None and inferences:
            executions = float(m.group(1))
            out[conc] = inferences / executions if executions else float("nan")
    return out


def pa_table(rows: Sequence[dict[str, str]], batching: dict[int, float] | None = None) -> list[str]:
    """Markdown table of perf_analyzer rows: concurrency, infer/s, latency percentiles (ms),
    the server-side split (queue, compute) Triton reports (ms) and, when known, the mean
    batch Triton's dynamic batcher formed."""
    headers = ["concurrency", "infer/s", "p50 ms", "p90 ms", "p95 ms", "p99 ms",
               "server queue ms", "server compute ms", "mean batch"]
    batching = batching or {}

    def ms(row: dict[str, str], key: str) -> float:
        value = row.get(key, "")
        return float(value) / US_PER_MS if value not in ("", None) else float("nan")

    table = []
    for r in rows:
        compute = sum(
            ms(r, k) for k in ("Server Compute Input", "Server Compute Infer", "Server Compute Output")
        )
        table.append([
            int(r["Concurrency"]), float(r["Inferences/Second"]), ms(r, "p50 latency"),
            ms(r, "p90 latency"), ms(r, "p95 latency"), ms(r, "p99 latency"),
            ms(r, "Server Queue"), compute,
            batching.get(int(r["Concurrency"]), float("nan")),
        ])
    return report.markdown_table(headers, table)


def write_report(csv_path: Path, out: Path, title: str, command: str, notes: Sequence[str],
                 text_path: Path | None = None) -> Path:
    """Write the markdown report of a perf_analyzer sweep (`text_path`: its console output,
    for the batching column)."""
    lines = report.header(title, command=command)
    batching = read_batching(text_path) if text_path is not None and text_path.exists() else None
    lines += pa_table(read_pa_csv(csv_path), batching)
    if notes:
        lines += ["", *notes]
    return report.write_text(out, lines)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: `input` or `report`."""
    p = argparse.ArgumentParser(prog="python -m perf.pa_tools")
    sub = p.add_subparsers(dest="cmd", required=True)
    pi = sub.add_parser("input", help="write perf_analyzer input files from a package frame")
    pi.add_argument("--package", type=Path, required=True)
    pi.add_argument("--frame", type=int, default=10)
    pi.add_argument("--out", type=Path, required=True)
    pi.add_argument("--model", default=None, help="Triton model (default: the package's)")
    pr = sub.add_parser("report", help="markdown report of perf_analyzer CSV output")
    pr.add_argument("--csv", type=Path, required=True)
    pr.add_argument("--out", type=Path, required=True)
    pr.add_argument("--text", type=Path, default=None, help="perf_analyzer's console output")
    pr.add_argument("--title", default="perf_analyzer")
    pr.add_argument("--command", default="")
    pr.add_argument("--note", action="append", default=[])
    args = p.parse_args(argv)
    if args.cmd == "input":
        from lipsync.package import load_package

        write_input_dir(args.package, args.frame, args.out)
        model = args.model or load_package(args.package, verify_checksums=False).manifest.model_name
        print("\n".join(perf_analyzer_args(model, args.out)))
    else:
        print(write_report(args.csv, args.out, args.title, args.command, args.note, args.text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
