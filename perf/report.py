"""Report writing shared by the perf tools: machine description, markdown tables, JSON.

Every results file under `perf/results/` is written by a tool through this module, with the
machine, the command line and the date (UTC) in its header: the numbers are never typed by hand.
"""
from __future__ import annotations

import json
import math
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
"""Where the perf tools write their reports (`perf/results/`)."""


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo ("unknown CPU" where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_line() -> str:
    """One line describing this machine: CPU model, usable cores, RAM, OS, Python."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem_gib = float("nan")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = int(line.split()[1]) / 1024 / 1024
                break
    except OSError:
        pass
    return (
        f"{cpu_model()}, {cores} usable cores, {mem_gib:.0f} GiB RAM, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}"
    )


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that produced a report, shell-quoted (`python -m <module> args...`)."""
    args = list(sys.argv if argv is None else argv)
    if args and args[0].endswith(".py"):
        rel = Path(args[0]).resolve()
        try:
            rel = rel.relative_to(RESULTS_DIR.parent.parent)
            args[0] = "python -m " + ".".join(rel.with_suffix("").parts)
            return args[0] + (" " + shlex.join(args[1:]) if len(args) > 1 else "")
        except ValueError:
            pass
    return shlex.join(args)


def utc_now() -> str:
    """The current date and time in UTC, ISO 8601 to the second."""
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def header(title: str, argv: Sequence[str] | None = None, command: str | None = None) -> list[str]:
    """The markdown header every report starts with (title, machine, command, date).

    Args:
        title: the report's title.
        argv: the producing command's argv (default `sys.argv`), used when `command` is None.
        command: the producing command as one string (wins over `argv`).
    """
    return [
        f"# {title}",
        "",
        "_Written by the tool; do not edit by hand._",
        "",
        f"- machine: {machine_line()}",
        f"- command: `{command if command is not None else command_line(argv)}`",
        f"- date: {utc_now()}",
        "",
    ]


def fmt(value: float | int | str, digits: int = 1) -> str:
    """Format a table cell: ints as is, floats with `digits` decimals, NaN as "n/a"."""
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "n/a"
    return f"{value:.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """A GitHub markdown table; numbers formatted with `fmt`.

    Raises:
        ValueError: a row whose length differs from the headers'.
    """
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells, the table has {len(headers)} columns")
        cells = [fmt(c) if isinstance(c, (int, float, str)) else str(c) for c in row]
        out.append("| " + " | ".join(cells) + " |")
    return out


def write_text(path: Path, lines: Sequence[str]) -> Path:
    """Write lines (joined with newlines, trailing newline) creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines).rstrip("\n") + "\n", encoding="utf-8")
    return path


def write_json(path: Path, payload: object) -> Path:
    """Write `payload` as indented JSON (NaN allowed), creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path
