"""The capacity benchmark's data and report (`perf.capacity`): variants, cells, measurements,
their aggregation over rounds, and the markdown/JSON writer. Pure: no processes, no sockets.

A **variant** is a named gateway configuration: the ``LIPSYNC_*`` environment the gateway
process gets on top of the harness's own settings (``old:`` = none, today's defaults), and
optionally the git revision whose gateway runs (``before9@9aa7bb8:``; none = this checkout). A
**cell** is (avatar, protocol, streams). Each round measures every cell once per variant, the
variants back to back (`plan`), so drift on a shared machine hits them alike; a cell's figures
pool its rounds (`aggregate`).
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from perf import report
from perf.procstat import (
    EVENT_LOOP,
    EXITED,
    GRPC_CORE,
    OTHER,
    POOL,
    CpuUsage,
    sum_categories,
)
from perf.stats import RunSummary, percentiles, ratio

VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
"""A variant's name: 1-32 letters, digits, ``_``, ``.``, ``-``."""
REVISION = re.compile(r"^[^\s:,\-][^\s:,]{0,99}$")
"""A git revision as a variant names it (``9aa7bb8``, ``main~3``, ``v1.0``): 1-100 characters,
no white space, ``:`` or ``,``, not starting with ``-``; `perf.git_revision` resolves it."""
ENV_KEY = re.compile(r"^LIPSYNC_[A-Z0-9_]+$")
"""A variant may set gateway settings only (`gateway.config.GatewaySettings`, env ``LIPSYNC_*``)."""

HARNESS_KEYS = frozenset({
    "LIPSYNC_TRITON_URL", "LIPSYNC_HOST", "LIPSYNC_GRPC_PORT", "LIPSYNC_HTTP_PORT",
    "LIPSYNC_PACKAGES_ROOT",
})
"""Settings the harness itself gives every gateway (where Triton, ports, avatars are); a
variant may not change them."""


@dataclass(frozen=True, slots=True)
class Variant:
    """One gateway configuration under test.

    Attributes:
        name: the variant's name in reports (``old``, ``new``, ``splice``, ...).
        env: ``LIPSYNC_*`` settings added to the gateway process's environment, in order.
        revision: the git revision whose gateway runs (`perf.git_revision`), or None for
            this checkout's.
        floor: not a gateway but the protocol floor (`perf.protocol_floor`, ``--floor``).
    """

    name: str
    env: tuple[tuple[str, str], ...] = ()
    revision: str | None = None
    floor: bool = False

    @property
    def env_text(self) -> str:
        """``K=V,K=V`` as given, or ``(defaults)``."""
        return ",".join(f"{k}={v}" for k, v in self.env) or "(defaults)"

    @property
    def code_text(self) -> str:
        """Whose gateway runs: ``git revision REV`` or ``this checkout`` (or the floor's)."""
        if self.floor:
            return FLOOR_TEXT
        return f"git revision {self.revision}" if self.revision else "this checkout"


FLOOR = Variant("floor", floor=True)
"""The protocol floor as a variant (``--floor``)."""
FLOOR_TEXT = ("`perf.protocol_floor`: the same protocols answered with a ready JPEG of the "
              "avatar's size, no Triton, no compositing (what serving alone costs)")


def parse_variant(text: str) -> Variant:
    """Parse ``NAME:``, ``NAME:KEY=VALUE,KEY=VALUE`` (values may not hold commas), or either
    with a git revision after the name, ``NAME@REV:...`` (that revision's gateway; whether it
    exists is checked when the run starts, `perf.git_revision`).

    Raises:
        ValueError: no ``:``, a bad name, an empty or malformed revision (`REVISION`), an
            entry that is not ``KEY=VALUE``, a key that is not ``LIPSYNC_*`` in upper case, a
            key the harness sets (`HARNESS_KEYS`), or a key given twice.
    """
    head, colon, rest = text.partition(":")
    if not colon:
        raise ValueError(f"variant {text!r}: expected NAME:KEY=VALUE,... or NAME@REV:... "
                         "(NAME: for defaults)")
    name, at, revision = head.partition("@")
    if not VARIANT_NAME.match(name):
        raise ValueError(f"variant {text!r}: name {name!r} must be 1-32 letters, digits, _ . -")
    if at and not REVISION.match(revision):
        raise ValueError(f"variant {text!r}: revision {revision!r} must be a git revision "
                         "(1-100 characters, no white space, ':' or ',', not starting with '-')")
    env: list[tuple[str, str]] = []
    for item in (i.strip() for i in rest.split(",")):
        if not item:
            continue
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq:
            raise ValueError(f"variant {name!r}: {item!r} is not KEY=VALUE")
        if not ENV_KEY.match(key):
            raise ValueError(f"variant {name!r}: {key!r} is not a gateway setting (LIPSYNC_*, upper case)")
        if key in HARNESS_KEYS:
            raise ValueError(f"variant {name!r}: {key} is set by the harness, not by a variant")
        if any(k == key for k, _ in env):
            raise ValueError(f"variant {name!r}: {key} given twice")
        env.append((key, value.strip()))
    return Variant(name, tuple(env), revision if at else None)


def check_variants(variants: Sequence[Variant], references: Sequence[str] = ()) -> None:
    """Raises ValueError when there is no variant, two share a name, or a reference of the
    ratio tables names no variant."""
    if not variants:
        raise ValueError("no variant to measure")
    names = [v.name for v in variants]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"variant names must differ: {', '.join(dupes)} given twice")
    unknown = [r for r in references if r not in names]
    if unknown:
        raise ValueError(f"reference(s) {', '.join(unknown)} name no variant ({', '.join(names)})")


@dataclass(frozen=True, slots=True, order=True)
class Cell:
    """One point of the grid.

    Attributes:
        avatar: avatar name (``demo`` 176x144, ``demo720`` 880x720).
        target: ``grpc`` (StreamInference) or ``ws`` (binary WebSocket).
        streams: concurrent streams, each as fast as possible with a bounded window.
    """

    avatar: str
    target: str
    streams: int


def plan(cells: Sequence[Cell], variants: Sequence[Variant], rounds: int) -> list[tuple[int, Cell, Variant]]:
    """The order of the measurements: round by round, cell by cell, every variant back to back.

    The variants' order rotates from one cell to the next (and by one more each round), so
    each variant goes first equally often and none always follows the same neighbour.

    Raises:
        ValueError: rounds < 1.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    out: list[tuple[int, Cell, Variant]] = []
    n = len(variants)
    for r in range(rounds):
        for i, cell in enumerate(cells):
            shift = (i + r) % n if n else 0
            out.extend((r, cell, v) for v in (*variants[shift:], *variants[:shift]))
    return out


@dataclass(frozen=True, slots=True)
class Measurement:
    """One cell measured once for one variant.

    Attributes:
        round: round index (0-based).
        cell: what was measured.
        variant: the variant's name.
        summary: the load generator's summary (frames/s over first due to last reply, ...).
        latencies_ms: latency of every successful frame (ms), for pooled percentiles.
        window_s: wall time between the CPU snapshots (s).
        gateway: CPU of the gateway process tree in the window (workers included).
        triton: CPU of tritonserver and its Python-backend stubs in the window.
        loadgen_cpu_s: CPU of the load generator (this process) in the window (s).
        foreign_cores: CPU other processes on the machine used in the window, in cores.
        triton_inferences, triton_executions: Triton's counters for the avatar's model over
            the window (mean batch = inferences / executions); NaN if unread.
    """

    round: int
    cell: Cell
    variant: str
    summary: RunSummary
    latencies_ms: tuple[float, ...]
    window_s: float
    gateway: CpuUsage
    triton: CpuUsage
    loadgen_cpu_s: float
    foreign_cores: float
    triton_inferences: float = float("nan")
    triton_executions: float = float("nan")


@dataclass(frozen=True, slots=True)
class CellResult:
    """A cell's figures for one variant, pooled over its rounds.

    Attributes:
        cell, variant: what.
        rounds: measurements pooled.
        frames_ok, errors, verified: summed over the rounds.
        fps: successful frames / summed wall time (frames/s).
        fps_by_round: each round's frames/s (spread).
        p50_ms, p95_ms: latency percentiles over every successful frame.
        gateway_ms: gateway CPU ms per frame: ``total`` and each thread category.
        triton_ms, loadgen_ms: Triton's and the load generator's CPU ms per frame.
        triton_batch: mean Triton batch (frames per model execution).
        foreign_cores: mean CPU of other processes during the windows (cores).
        gateway_threads: gateway CPU ms per frame per thread name (largest first).
        error_samples: distinct error texts.
    """

    cell: Cell
    variant: str
    rounds: int
    frames_ok: int
    errors: int
    verified: int
    fps: float
    fps_by_round: tuple[float, ...]
    p50_ms: float
    p95_ms: float
    gateway_ms: dict[str, float]
    triton_ms: float
    loadgen_ms: float
    triton_batch: float
    foreign_cores: float
    gateway_threads: dict[str, float] = field(default_factory=dict)
    error_samples: tuple[str, ...] = ()


def aggregate(measurements: Sequence[Measurement]) -> list[CellResult]:
    """Pool the rounds of each (cell, variant), in order of first appearance."""
    groups: dict[tuple[Cell, str], list[Measurement]] = {}
    for m in measurements:
        groups.setdefault((m.cell, m.variant), []).append(m)
    out = []
    for (cell, variant), ms in groups.items():
        frames = sum(m.summary.frames_ok for m in ms)
        wall = sum(m.summary.wall_s for m in ms)
        lat = [v for m in ms for v in m.latencies_ms]
        p50, p95 = percentiles(lat, (50, 95))
        gw = sum_categories(m.gateway for m in ms)
        per = 1000.0 / frames if frames else float("nan")
        inf = sum(m.triton_inferences for m in ms)
        exe = sum(m.triton_executions for m in ms)
        errors_seen = dict.fromkeys(e for m in ms for e in m.summary.error_samples)
        out.append(CellResult(
            cell=cell, variant=variant, rounds=len(ms), frames_ok=frames,
            errors=sum(m.summary.errors for m in ms),
            verified=sum(m.summary.verified for m in ms),
            fps=frames / wall if wall > 0 else float("nan"),
            fps_by_round=tuple(m.summary.fps for m in ms),
            p50_ms=p50, p95_ms=p95,
            gateway_ms=gw.ms_per(frames),
            triton_ms=sum(m.triton.total_s for m in ms) * per,
            loadgen_ms=sum(m.loadgen_cpu_s for m in ms) * per,
            triton_batch=inf / exe if exe and not math.isnan(exe) else float("nan"),
            foreign_cores=float(np.mean([m.foreign_cores for m in ms])),
            gateway_threads=dict(sorted(((k, v * per) for k, v in gw.by_thread.items() if v > 0),
                                        key=lambda kv: -kv[1])),
            error_samples=tuple(list(errors_seen)[:5]),
        ))
    return out


# ----------------------------------------------------------------------------- tables

TABLE_HEADERS = (
    "protocol", "streams", "variant", "frames/s", "p50 ms", "p95 ms", "errors / verified",
    "gateway CPU ms/frame", "event loop", "pool", "gRPC core", "other", "Triton CPU ms/frame",
    "Triton batch", "loadgen CPU ms/frame", "other load (cores)",
)
"""Columns of a per-avatar table; ``event loop``/``pool``/``gRPC core``/``other`` split the
gateway's CPU ms/frame by thread (`perf.procstat.THREAD_RULES`; other = unmatched + exited)."""

RATIO_HEADERS = (
    "protocol", "streams", "variant / reference", "frames/s", "gateway CPU ms/frame",
    "event loop", "pool", "p95 latency",
)
"""Columns of a per-avatar ratio table (variant / reference variant, same cell, same run)."""


def _other_ms(r: CellResult) -> float:
    return r.gateway_ms.get(OTHER, 0.0) + r.gateway_ms.get(EXITED, 0.0)


def _row_order(results: Sequence[CellResult], avatar: str,
               variant_order: Sequence[str]) -> list[CellResult]:
    rank = {name: i for i, name in enumerate(variant_order)}
    return sorted((r for r in results if r.cell.avatar == avatar),
                  key=lambda r: (r.cell.target, r.cell.streams, rank.get(r.variant, len(rank))))


def cell_rows(results: Sequence[CellResult], avatar: str,
              variant_order: Sequence[str] = ()) -> list[list[object]]:
    """Rows of `TABLE_HEADERS` for one avatar, by protocol, streams, then `variant_order`."""
    rows = []
    for r in _row_order(results, avatar, variant_order):
        g = r.gateway_ms
        rows.append([
            r.cell.target, r.cell.streams, r.variant, report.fmt(r.fps, 1),
            report.fmt(r.p50_ms, 1), report.fmt(r.p95_ms, 1), f"{r.errors} / {r.verified}",
            report.fmt(g["total"], 2), report.fmt(g[EVENT_LOOP], 2), report.fmt(g[POOL], 2),
            report.fmt(g[GRPC_CORE], 2), report.fmt(_other_ms(r), 2), report.fmt(r.triton_ms, 2),
            report.fmt(r.triton_batch, 2), report.fmt(r.loadgen_ms, 2),
            report.fmt(r.foreign_cores, 2),
        ])
    return rows


def ratio_rows(results: Sequence[CellResult], avatar: str, reference: str,
               variant_order: Sequence[str] = ()) -> list[list[object]]:
    """Rows of `RATIO_HEADERS`: each non-reference variant over `reference`, cell by cell."""
    ref = {r.cell: r for r in results if r.variant == reference and r.cell.avatar == avatar}
    rows = []
    for r in _row_order(results, avatar, variant_order):
        base = ref.get(r.cell)
        if base is None or r.variant == reference:
            continue
        rows.append([
            r.cell.target, r.cell.streams, f"{r.variant} / {reference}",
            f"{ratio(r.fps, base.fps):.2f}x",
            f"{ratio(r.gateway_ms['total'], base.gateway_ms['total']):.2f}x",
            f"{ratio(r.gateway_ms[EVENT_LOOP], base.gateway_ms[EVENT_LOOP]):.2f}x",
            f"{ratio(r.gateway_ms[POOL], base.gateway_ms[POOL]):.2f}x",
            f"{ratio(r.p95_ms, base.p95_ms):.2f}x",
        ])
    return rows


def render_markdown(results: Sequence[CellResult], variants: Sequence[Variant],
                    avatar_labels: Mapping[str, str], setup: Sequence[str],
                    command: str, variant_notes: Mapping[str, str] | None = None,
                    references: Sequence[str] = ()) -> list[str]:
    """The whole report: header, setup, variants (whose gateway code, environment, and
    `variant_notes` by name), then per avatar its table and, with more than one variant, one
    ratio table per reference variant (`references`, default the first variant)."""
    notes = variant_notes or {}
    lines = report.header("Gateway capacity with an identity UNet", command=command)
    lines += [*setup, ""]
    lines += ["## Variants", ""]
    lines += report.markdown_table(
        ("variant", "gateway code", "gateway environment", "note"),
        [[f"`{v.name}`", v.code_text, f"`{v.env_text}`", notes.get(v.name, "")] for v in variants])
    order = [v.name for v in variants]
    for avatar, label in avatar_labels.items():
        rows = cell_rows(results, avatar, order)
        if not rows:
            continue
        lines += ["", f"## {label}", ""]
        lines += report.markdown_table(TABLE_HEADERS, rows)
        for reference in references or order[:1]:
            ratios = ratio_rows(results, avatar, reference, order)
            if ratios:
                lines += ["", f"Ratios to `{reference}` (same cell, same run; below 1x = less):", ""]
                lines += report.markdown_table(RATIO_HEADERS, ratios)
    errors = sorted({e for r in results for e in r.error_samples})
    if errors:
        lines += ["", "Errors seen:", *[f"- `{e}`" for e in errors]]
    return lines


def to_json(results: Sequence[CellResult], measurements: Sequence[Measurement],
            variants: Sequence[Variant], meta: Mapping[str, object]) -> dict[str, object]:
    """Everything measured, JSON-ready: `meta` (machine, command, settings), the variants,
    each cell's pooled result and each measurement's summary and CPU split."""
    def usage(u: CpuUsage) -> dict[str, object]:
        return {"total_s": u.total_s, "by_category_s": u.by_category,
                "by_thread_s": u.by_thread, "processes": u.processes}

    return {
        **meta,
        "variants": [{"name": v.name, "env": dict(v.env), "revision": v.revision, "floor": v.floor}
                     for v in variants],
        "cells": [{**asdict(r), "cell": asdict(r.cell)} for r in results],
        "measurements": [
            {"round": m.round, "cell": asdict(m.cell), "variant": m.variant,
             "summary": m.summary.to_dict(), "window_s": m.window_s,
             "gateway": usage(m.gateway), "triton": usage(m.triton),
             "loadgen_cpu_s": m.loadgen_cpu_s, "foreign_cores": m.foreign_cores,
             "triton_inferences": m.triton_inferences, "triton_executions": m.triton_executions}
            for m in measurements
        ],
    }
