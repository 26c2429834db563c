"""Capacity benchmark: how many frames/s one gateway process composites, and what each frame
costs in CPU, with the UNet replaced by an identity graph so only the gateway's own work
counts (issue 9's yardstick). Gateway variants, each a set of ``LIPSYNC_*`` settings, are
measured side by side in the same run.

    python -m perf.capacity                                  # ~8 min per variant on 2 cores
    python -m perf.capacity --quick                          # ~1 min: checks the harness
    python -m perf.capacity --variant old: --variant new:LIPSYNC_JPEG_SPLICE=1,LIPSYNC_WORKERS=2
    python -m perf.capacity --preset issue9 --avatars demo720 --streams 8   # each improvement

What one run does:

1. **Avatars**: the 176x144 demo (`packages/demo`, built if missing) and the demo clip built
   at 720p (880x720, `perf.micro_720p.ensure_avatar`, cached under ``.cache/perf/micro720/``),
   hard-linked into a scratch packages root (``.cache/perf/capacity/packages/``).
2. **Triton**: the real CPU `tritonserver` on a scratch model repository holding the identity
   UNet (`perf.identity_unet`: ``pred = crop`` with the real tensor contract) under each
   avatar's model name, plus the real ``audio_encoder``.
3. **Gateways**: one `python -m lipsync gateway` process per variant, all running at once, on
   free ports, each with the harness's settings plus its variant's environment; ready when
   ``/readyz`` answers 200. A variant naming a git revision (``NAME@REV:``) runs that
   revision's gateway: its tree exported once per commit under ``<scratch>/revisions/``
   (`perf.git_revision`), first on the gateway's ``PYTHONPATH``, same Python environment.
   With ``--thread-names`` (default) each is started with the hook of ``perf/threadnames/``
   so its Python threads carry their names in /proc.
4. **Load**: for each round, each cell (avatar x protocol x streams), each variant in turn:
   the load generator (`perf.loadgen`, in this process) drives N streams over gRPC
   ``StreamInference`` or the WebSocket, as fast as possible with ``--window`` frames in
   flight per stream, for ``--frames`` frames in all; every ``--verify-every``-th reply of a
   stream is decoded after the window and must be a JPEG of the avatar's size.
   Around the window it reads /proc: the CPU of the gateway's process tree per thread
   (`perf.procstat`), of tritonserver and its Python-backend stubs, of this process (the
   load generator), and the machine's, plus Triton's batch counters.
5. **Report**: ``perf/results/capacity.md`` and ``.json`` (`perf.capacity_report`): per
   avatar size a table of frames/s, p50/p95 latency, errors, gateway CPU ms/frame split by
   thread, Triton and load-generator CPU ms/frame, Triton's mean batch, other processes'
   load; with several variants, each one's ratios to the reference variant(s) (the first,
   or ``--reference``), cell by cell.

Adding a variant for an improvement: give the gateway a ``LIPSYNC_*`` setting that turns it
on (a `gateway.config.GatewaySettings` field) and pass ``--variant NAME:LIPSYNC_X=1``; an
improvement with no setting is measured against the gateway of the commit before it,
``--variant before@REV:``. The first variant is the reference of the ratio tables
(``--reference NAME``, repeatable, adds or picks others). ``--preset NAME`` runs a named list
of variants (`PRESETS`), e.g. ``issue9``: the gateway as issue 9 found it, the gateway of
today with each switchable improvement off, and each of them added in turn.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from perf import report
from perf.capacity_report import (
    FLOOR,
    Cell,
    Measurement,
    Variant,
    aggregate,
    check_variants,
    parse_variant,
    plan,
    render_markdown,
    to_json,
)
from perf.git_revision import RevisionCheckout, RevisionError, checkout_revision, revision_environment
from perf.loadgen import LoadConfig, drive_load, finish_load
from perf.procstat import (
    CLOCK_TICKS_PER_S,
    ProcessTree,
    cpu_between,
    machine_cpu,
    parent_map,
    self_cpu_s,
    thread_name_env,
)
from perf.servers import GatewayHandle, start_gateway

if TYPE_CHECKING:
    from lipsync.triton_local import TritonServer

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRATCH = REPO_ROOT / ".cache" / "perf" / "capacity"
"""Scratch root of a run: packages/, model_repository/, the servers' logs (replaced per run)."""

SMALL_AVATAR = "demo"
"""The 176x144 demo avatar (`export.demo`)."""

TARGETS = ("grpc", "ws")


@dataclass(frozen=True, slots=True)
class Grid:
    """What to measure and how much.

    Attributes:
        avatars: avatar names, in report order.
        targets: protocols (``grpc``, ``ws``).
        streams: stream counts.
        frames: frames per cell, per variant, per round (all streams together).
        rounds: times each cell is measured per variant.
        window: frames in flight per stream.
        verify_every: decode every k-th reply of each stream.
        warmup_frames: frames per (variant, avatar, protocol) before the first round.
    """

    avatars: tuple[str, ...]
    targets: tuple[str, ...]
    streams: tuple[int, ...]
    frames: int
    rounds: int
    window: int
    verify_every: int
    warmup_frames: int

    def cells(self) -> list[Cell]:
        """Every cell: by avatar, then protocol, then streams."""
        return [Cell(a, t, n) for a in self.avatars for t in self.targets for n in self.streams]

    def frames_per_stream(self, streams: int) -> int:
        """``ceil(frames / streams)``: each stream's share of a cell's frames."""
        return max(1, math.ceil(self.frames / streams))


@dataclass(frozen=True, slots=True)
class Budget:
    """How much a run measures (see `Grid` for the meaning of each)."""

    streams: tuple[int, ...]
    frames: int
    rounds: int
    warmup_frames: int


QUICK = Budget(streams=(1, 8), frames=240, rounds=1, warmup_frames=16)
"""``--quick``: the harness checked end to end in ~1 minute (two variants); too short for
figures to compare (an A/A run of two identical variants differs by up to ~40% in frames/s)."""
FULL = Budget(streams=(1, 4, 8, 16), frames=1500, rounds=3, warmup_frames=48)
"""The default run: ~8 minutes per variant on 2 shared cores (~15 for old + new)."""


@dataclass(frozen=True, slots=True)
class AvatarInfo:
    """What the harness needs to know of an avatar: size (px) and servable frames."""

    name: str
    width: int
    height: int
    feature_rows: int

    @property
    def label(self) -> str:
        """Table heading, e.g. ``880x720 (demo720)``."""
        return f"{self.width}x{self.height} (`{self.name}`)"


# ----------------------------------------------------------------------------- setup


def _link_tree(src: Path, dst: Path) -> None:
    """Copy a folder with hard links (plain copies across file systems)."""
    def link_or_copy(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link_or_copy)


def audio_encoder_onnx(repos: Sequence[Path]) -> Path | None:
    """The served ``audio_encoder`` ONNX of the first model repository holding one, or None."""
    from export.model_repo import served_version
    from lipsync.contract import AUDIO_ENCODER_MODEL

    for repo in repos:
        served = served_version(repo, AUDIO_ENCODER_MODEL)
        if served is not None and served.onnx_path.is_file():
            return served.onnx_path
    return None


def prepare_avatars(scratch: Path, names: Sequence[str]) -> tuple[Path, dict[str, AvatarInfo]]:
    """Build what is missing (the demo; the 720p avatar, cached) and link the packages into
    ``scratch/packages``.

    Returns:
        The packages root and each avatar's `AvatarInfo`.

    Raises:
        ValueError: an unknown avatar name.
    """
    from export.demo import ensure_demo
    from lipsync.contract import MANIFEST_NAME
    from lipsync.package import PackageManifest
    from perf import micro_720p

    builders = {SMALL_AVATAR: lambda: ensure_demo(progress=False),
                micro_720p.AVATAR: lambda: micro_720p.ensure_avatar(micro_720p.SCRATCH)}
    unknown = sorted(set(names) - set(builders))
    if unknown:
        raise ValueError(f"unknown avatar(s) {', '.join(unknown)}; choose from {', '.join(builders)}")
    root = scratch / "packages"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    infos: dict[str, AvatarInfo] = {}
    for name in names:
        _link_tree(builders[name](), root / name)
        m = PackageManifest.model_validate_json((root / name / MANIFEST_NAME).read_text())
        infos[name] = AvatarInfo(name, m.width, m.height, m.feature_rows)
    return root, infos


BEFORE_ISSUE9 = "9aa7bb8"
"""main on 2026-11-25, when issue 9 was filed (the gateway its "~6.2 ms per 720p frame" was about)."""

PRESETS: dict[str, tuple[str, ...]] = {
    "issue9": (
        f"before9@{BEFORE_ISSUE9}:",
        "old:LIPSYNC_JPEG_SPLICE=0,LIPSYNC_TRITON_SHM=none,LIPSYNC_TRITON_COALESCE=0",
        "splice:LIPSYNC_TRITON_SHM=none,LIPSYNC_TRITON_COALESCE=0",
        "shm:LIPSYNC_TRITON_COALESCE=0",
        "new:",
    ),
}
"""Named variant lists (``--preset``). ``issue9``:

- ``before9``: the gateway of commit `BEFORE_ISSUE9`, as issue 9 found it (paste back into a
  copy of the full frame and a full-frame simplejpeg encode in the ``composite`` pool, one
  Triton request per frame with the tensors in the gRPC messages, every other per-frame step
  on the event loop); its thread split means the same (pool threads ``composite_*`` there too);
- ``old``: today's gateway with the three switchable improvements off (full-frame JPEG,
  tensors in the gRPC messages, one Triton request per frame); it keeps the improvements that
  have no setting (composite only the face box, fewer event-loop hops, pooled buffers, ...);
- ``splice``: ``old`` + spliced partial JPEG (`gateway.compositor`);
- ``shm``: + UNet tensors in system shared memory (`gateway.triton_shm`);
- ``new``: + coalesced Triton requests (`gateway.batching`): today's defaults.
"""

PRESET_REFERENCES: dict[str, tuple[str, ...]] = {"issue9": ("before9", "old")}
"""The variants a preset's ratio tables divide by (default: its first variant)."""


def unknown_settings(variant: Variant, known: frozenset[str] | None = None) -> list[str]:
    """The variant's keys that its gateway does not read: not in `known` (a revision's keys,
    `perf.git_revision.RevisionCheckout.settings`), by default the fields of today's
    `gateway.config.GatewaySettings` plus ``LIPSYNC_LOG_LEVEL`` (read by `lipsync.log`). The
    gateway ignores those silently."""
    if known is None:
        from gateway.config import GatewaySettings
        from perf.git_revision import settings_keys

        known = settings_keys(GatewaySettings.model_fields)
    return [k for k, _ in variant.env if k not in known]


def checkout_revisions(variants: Sequence[Variant], scratch: Path) -> dict[str, RevisionCheckout]:
    """Each revision variant's exported, probed tree (`perf.git_revision`), by variant name;
    trees are cached under ``scratch/revisions/<commit>``.

    Raises:
        perf.git_revision.RevisionError: a revision that cannot be run (the message says why).
    """
    out: dict[str, RevisionCheckout] = {}
    for v in variants:
        if v.revision is not None:
            out[v.name] = checkout_revision(REPO_ROOT, v.revision, scratch / "revisions")
            log.info("variant %s: git revision %s = %s, tree %s", v.name, v.revision,
                     out[v.name].describe, out[v.name].root)
    return out


# ----------------------------------------------------------------------------- measuring


@dataclass(frozen=True, slots=True)
class Servers:
    """The processes under measurement."""

    triton_pid: int
    triton_metrics_url: str
    gateways: Mapping[str, GatewayHandle]
    ws_count_bounds: frozenset[str] = frozenset()
    """Variants whose WebSocket replies count the bounds (`perf.git_revision.RevisionCheckout`)."""


def _triton_counters(servers: Servers, model: str) -> tuple[float, float]:
    from perf.compare import read_triton_counters

    try:
        return read_triton_counters(servers.triton_metrics_url, model)
    except OSError as exc:
        log.warning("Triton metrics unreadable: %s", exc)
        return float("nan"), float("nan")


def load_config(gw: GatewayHandle, avatar: AvatarInfo, target: str, streams: int,
                frames_per_stream: int, window: int, timeout_s: float, label: str,
                verify_every: int, ws_count_bounds: bool = False) -> LoadConfig:
    """The load generator's settings for one run against `gw`: as fast as possible,
    `window` frames in flight per stream, every reply checked for the avatar's size on a
    sample of one in `verify_every`; `ws_count_bounds` for a gateway whose WebSocket replies
    count the bounds (`LoadConfig`)."""
    return LoadConfig(
        target=target, address=gw.grpc_address if target == "grpc" else gw.http_address,
        avatar=avatar.name, streams=streams, frames=frames_per_stream, pace_fps=0.0,
        window=window, frame_range=avatar.feature_rows, timeout_s=timeout_s, label=label,
        verify_every=verify_every, expect_size=(avatar.width, avatar.height),
        ws_count_bounds=ws_count_bounds)


def measure(cell: Cell, variant: str, round_: int, grid: Grid, avatar: AvatarInfo,
            servers: Servers, timeout_s: float) -> Measurement:
    """Measure one cell for one variant (module docstring, step 4)."""
    from lipsync.contract import avatar_model_name

    gw = servers.gateways[variant]
    config = load_config(gw, avatar, cell.target, cell.streams, grid.frames_per_stream(cell.streams),
                         grid.window, timeout_s, f"{variant} {cell.avatar} {cell.target} x{cell.streams}",
                         grid.verify_every, variant in servers.ws_count_bounds)
    model = avatar_model_name(cell.avatar)
    roots = [servers.triton_pid, *(g.pid for g in servers.gateways.values())]
    counters0 = _triton_counters(servers, model)
    parents = parent_map()
    trees = {pid: ProcessTree(pid) for pid in roots}
    before = {pid: tree.snapshot(parents) for pid, tree in trees.items()}
    machine0 = machine_cpu()
    self0 = self_cpu_s()
    t0 = time.perf_counter()
    records = asyncio.run(drive_load(config))
    window_s = time.perf_counter() - t0
    self1 = self_cpu_s()
    machine1 = machine_cpu()
    parents = parent_map()
    after = {pid: tree.snapshot(parents) for pid, tree in trees.items()}
    counters1 = _triton_counters(servers, model)
    summary, checked = finish_load(config, records)
    usage = {pid: cpu_between(before[pid], after[pid]) for pid in roots}
    ours_s = sum(u.total_s for u in usage.values()) + (self1 - self0)
    busy_s = (machine1.busy_ticks - machine0.busy_ticks) / CLOCK_TICKS_PER_S
    return Measurement(
        round=round_, cell=cell, variant=variant, summary=summary,
        latencies_ms=tuple(r.latency_ms for r in checked if r.ok),
        window_s=window_s, gateway=usage[gw.pid], triton=usage[servers.triton_pid],
        loadgen_cpu_s=self1 - self0,
        foreign_cores=max(busy_s - ours_s, 0.0) / window_s if window_s > 0 else float("nan"),
        triton_inferences=counters1[0] - counters0[0],
        triton_executions=counters1[1] - counters0[1],
    )


def warm_up(grid: Grid, variants: Sequence[Variant], avatars: Mapping[str, AvatarInfo],
            servers: Servers, timeout_s: float) -> None:
    """Send each variant's gateway `grid.warmup_frames` frames per avatar and protocol (4
    streams, every reply verified), so first-call costs stay out of the measurements.

    Raises:
        RuntimeError: a warm-up frame failed (the gateway does not work: no point measuring).
    """
    from perf.loadgen import run_load

    for v in variants:
        gw = servers.gateways[v.name]
        for a in avatars.values():
            for target in grid.targets:
                config = load_config(gw, a, target, 4, max(1, grid.warmup_frames // 4), grid.window,
                                     timeout_s, f"warm-up {v.name} {a.name} {target}", 1,
                                     v.name in servers.ws_count_bounds)
                summary, _ = asyncio.run(run_load(config, progress=False))
                if summary.errors:
                    raise RuntimeError(
                        f"warm-up of variant {v.name!r} ({a.name}, {target}) failed: "
                        f"{summary.errors} errors, e.g. {summary.error_samples[:2]}; "
                        f"see {gw.log_path}")


@contextlib.contextmanager
def identity_triton(
    scratch: Path, avatars: Sequence[str], encoder_onnx: Path | None
) -> Iterator[TritonServer]:
    """The real CPU tritonserver on a new identity-UNet repository under `scratch` (module
    docstring, step 2), started; stopped on exit."""
    from lipsync.triton_local import TritonServer, free_ports
    from perf.identity_unet import write_identity_repository

    repo = scratch / "model_repository"
    shutil.rmtree(repo, ignore_errors=True)
    write_identity_repository(repo, avatars, encoder_onnx)
    http, grpc_port, metrics = free_ports(3)
    triton = TritonServer(repo, http_port=http, grpc_port=grpc_port, metrics_port=metrics,
                          log_file=scratch / "triton.log")
    triton.start(timeout_s=300)
    try:
        yield triton
    finally:
        triton.stop()


@contextlib.contextmanager
def start_servers(scratch: Path, packages_root: Path, avatars: Sequence[str],
                  encoder_onnx: Path | None, variants: Sequence[Variant], *, max_in_flight: int,
                  timeout_s: float, thread_names: bool,
                  revisions: Mapping[str, RevisionCheckout] | None = None) -> Iterator[Servers]:
    """Triton on the identity repository, then one gateway per variant (module docstring);
    a variant in `revisions` runs the gateway of that exported tree."""
    base_env = thread_name_env(os.environ) if thread_names else dict(os.environ)
    with contextlib.ExitStack() as stack:
        triton = stack.enter_context(identity_triton(scratch, avatars, encoder_onnx))
        assert triton.pid is not None
        gateways: dict[str, GatewayHandle] = {}
        for v in variants:
            env = {"LIPSYNC_MAX_IN_FLIGHT_TOTAL": str(max_in_flight), **dict(v.env)}
            tree = (revisions or {}).get(v.name)
            gateways[v.name] = stack.enter_context(start_gateway(
                triton.grpc_url, packages_root, scratch, timeout_s, extra_env=env,
                name=f"gateway-{v.name}", ready_timeout_s=300,
                base_env=base_env if tree is None else revision_environment(base_env, tree.root),
                module=("perf.protocol_floor",) if v.floor else ("lipsync", "gateway")))
            log.info("variant %s: gateway pid %d, gRPC %s, HTTP %s", v.name,
                     gateways[v.name].pid, gateways[v.name].grpc_address,
                     gateways[v.name].http_address)
        yield Servers(triton.pid, triton.metrics_url, gateways,
                      frozenset(n for n, r in (revisions or {}).items() if r.ws_count_bounds))


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    """The `python -m perf.capacity` argument parser."""
    from perf import micro_720p

    p = argparse.ArgumentParser(
        prog="python -m perf.capacity",
        description="Gateway capacity with an identity UNet: frames/s and CPU per frame, "
                    "variants side by side.",
        epilog="Variant: NAME:KEY=VALUE,KEY=VALUE with LIPSYNC_* gateway settings (NAME: = "
               "defaults); NAME@REV:... runs the gateway of git revision REV; the first is the "
               "reference of the ratios. Default: --variant defaults:",
    )
    p.add_argument("--variant", dest="variants", action="append", type=parse_variant, default=None,
                   metavar="NAME[@REV]:ENV", help="a gateway variant (repeat; see below)")
    presets = "; ".join(f"{k}: {', '.join(parse_variant(v).name for v in vs)}"
                        for k, vs in PRESETS.items())
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help=f"a named list of variants, before any --variant: {presets}")
    p.add_argument("--floor", action="store_true",
                   help="add the variant 'floor': the protocols alone (perf.protocol_floor), "
                   "a ready JPEG per request, no Triton, no compositing")
    p.add_argument("--reference", dest="references", action="append", default=None,
                   metavar="NAME", help="a variant the ratio tables divide by (repeat; default: "
                   "the preset's, else the first variant)")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"a short run to check the harness: streams {list(QUICK.streams)}, "
        f"{QUICK.frames} frames per cell, {QUICK.rounds} round",
    )
    p.add_argument(
        "--avatars",
        nargs="+",
        default=[SMALL_AVATAR, micro_720p.AVATAR],
        choices=[SMALL_AVATAR, micro_720p.AVATAR],
        help="avatar sizes to measure",
    )
    p.add_argument(
        "--targets", nargs="+", default=list(TARGETS), choices=TARGETS, help="protocols to measure"
    )
    p.add_argument(
        "--streams", type=int, nargs="+", default=None, help=f"stream counts (default {list(FULL.streams)})"
    )
    p.add_argument(
        "--frames",
        type=int,
        default=None,
        help=f"frames per cell per variant per round, all streams together (default {FULL.frames})",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help=f"measurements of each cell per variant (default {FULL.rounds})",
    )
    p.add_argument(
        "--window",
        type=int,
        default=1,
        help="frames in flight per stream (default 1: N streams = N requests in flight)",
    )
    p.add_argument(
        "--verify-every", type=int, default=10, help="decode every K-th reply of each stream (default 10)"
    )
    p.add_argument(
        "--timeout", type=float, default=120.0, help="per-reply timeout and the gateway's Triton deadline (s)"
    )
    p.add_argument(
        "--no-thread-names",
        dest="thread_names",
        action="store_false",
        help="do not start the gateways with the perf/threadnames hook (their "
        "Python threads then all show the process name)",
    )
    p.add_argument("--scratch", type=Path, default=SCRATCH, help="scratch folder of the run")
    p.add_argument(
        "--out",
        type=Path,
        default=report.RESULTS_DIR / "capacity.md",
        help="markdown report (the JSON goes next to it)",
    )
    return p


def grid_from_args(args: argparse.Namespace) -> Grid:
    """The `Grid` of the parsed arguments (``--quick`` or full defaults, options win).

    Raises:
        ValueError: a count below 1.
    """
    base = QUICK if args.quick else FULL
    grid = Grid(
        avatars=tuple(dict.fromkeys(args.avatars)),
        targets=tuple(dict.fromkeys(args.targets)),
        streams=tuple(args.streams or base.streams),
        frames=args.frames or base.frames,
        rounds=args.rounds or base.rounds,
        window=args.window,
        verify_every=args.verify_every,
        warmup_frames=base.warmup_frames,
    )
    if min(grid.streams) < 1 or grid.frames < 1 or grid.rounds < 1 or grid.window < 1:
        raise ValueError("streams, frames, rounds and window must be >= 1")
    if grid.verify_every < 1:
        raise ValueError("--verify-every must be >= 1: frames are always checked on a sample")
    return grid


def _gateway_defaults() -> str:
    """Today's defaults of the gateway settings that shape a frame's cost."""
    from gateway.config import GatewaySettings

    fields = GatewaySettings.model_fields
    return ", ".join(
        f"{k} {fields[k].default}"
        for k in ("jpeg_encoder", "jpeg_quality", "jpeg_subsampling", "jpeg_threads")
        if k in fields
    )


def _setup_lines(
    grid: Grid,
    avatars: Mapping[str, AvatarInfo],
    load: tuple[float, ...],
    load_end: tuple[float, ...],
    thread_names: bool,
    elapsed_s: float,
    revisions: bool = False,
) -> list[str]:
    lines = [
        (
            f"- load average (1/5/15 min) at start {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}, at end "
            f"{load_end[0]:.2f}/{load_end[1]:.2f}/{load_end[2]:.2f}; run took {elapsed_s / 60:.1f} min"
        ),
        (
            "- model: identity UNet (`perf/identity_unet.py`, pred = crop, real tensor contract) in "
            "the real CPU `tritonserver` (Python backend + ONNX Runtime, dynamic batching), one model "
            "per avatar, plus the real `audio_encoder`"
        ),
        (
            f"- avatars: {', '.join(a.label for a in avatars.values())}; gateway: the defaults of "
            f"`GatewaySettings` ({_gateway_defaults()}) plus each variant's environment"
        ),
        (
            f"- load: `perf.loadgen` in the harness process, streams as fast as possible with "
            f"{grid.window} frame(s) in flight each, {grid.frames} frames per cell per variant per "
            f"round (split over the streams), {grid.rounds} round(s), variants back to back per cell "
            f"(order rotating); every {grid.verify_every}th reply of each stream decoded and checked "
            "for its size after the window (errors / verified)"
        ),
        (
            "- frames/s = successful frames / time from first send to last reply, pooled over rounds; "
            "p50/p95 = latency of every successful frame (send to reply)"
        ),
        "- CPU ms/frame = utime + stime from /proc over the window / successful frames: the "
        "gateway's process tree (workers included), split by thread: event loop = each "
        "process's main thread, pool = `composite_*` (paste back + JPEG), gRPC core = gRPC's "
        "C++ threads and grpc.aio's poller, other = the rest and threads that exited; Triton = "
        "tritonserver + its Python-backend stubs; loadgen = the harness process"
        + (
            ""
            if thread_names
            else " (thread-name hook off: Python threads show the process name and fall under other)"
        ),
        (
            "- Triton batch = inferences / executions of the avatar's model over the window; other "
            "load = CPU other processes on the machine used during the window (cores)"
        ),
    ]
    if revisions:
        lines.append(
            "- a variant of a git revision runs that revision's gateway code (same Python "
            "environment, Triton, packages and load): its gateway CPU is its whole process tree "
            "as for the others; its threads are split by the same rules (main thread, threads "
            "named `composite_*`, gRPC's), so a column means that revision's work on those "
            "threads, which may differ from today's (see its note and `gateway_threads` in the JSON)"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and write the report; exit 1 when any frame failed."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    variants: list[Variant] = [parse_variant(v) for v in PRESETS.get(args.preset or "", ())]
    variants += args.variants or ([] if variants else [parse_variant("defaults:")])
    if args.floor:
        variants.append(FLOOR)
    references: list[str] = args.references or list(PRESET_REFERENCES.get(args.preset or "", ()))
    try:
        check_variants(variants, references)
        grid = grid_from_args(args)
        revisions = checkout_revisions(variants, args.scratch)
    except (ValueError, RevisionError) as exc:
        parser.error(str(exc))
    command = report.command_line(
        ["python", "-m", "perf.capacity", *(sys.argv[1:] if argv is None else argv)]
    )
    started = time.monotonic()
    load_start = os.getloadavg()
    scratch: Path = args.scratch
    scratch.mkdir(parents=True, exist_ok=True)
    packages_root, avatars = prepare_avatars(scratch, grid.avatars)
    from lipsync.paths import MODEL_REPOSITORY_CPU
    from perf import micro_720p

    encoder = audio_encoder_onnx([MODEL_REPOSITORY_CPU, micro_720p.SCRATCH / "model_repo_cpu"])
    if encoder is None:
        log.warning("no audio_encoder ONNX found: the gateways will serve without it")
    ignored = {v.name: unknown_settings(v, revisions[v.name].settings if v.name in revisions else None)
               for v in variants}
    for name, keys in ignored.items():
        if keys:
            log.warning(
                "variant %s: %s unknown to this gateway's settings (ignored by it)", name, ", ".join(keys)
            )
    steps = plan(grid.cells(), variants, grid.rounds)
    measurements: list[Measurement] = []
    with start_servers(
        scratch,
        packages_root,
        list(avatars),
        encoder,
        variants,
        max_in_flight=max(64, max(grid.streams) * grid.window),
        timeout_s=args.timeout,
        thread_names=args.thread_names,
        revisions=revisions,
    ) as servers:
        pids = {
            "triton": servers.triton_pid,
            **{f"gateway-{name}": g.pid for name, g in servers.gateways.items()},
        }
        warm_up(grid, variants, avatars, servers, args.timeout)
        for i, (r, cell, v) in enumerate(steps, 1):
            m = measure(cell, v.name, r, grid, avatars[cell.avatar], servers, args.timeout)
            measurements.append(m)
            log.info(
                "[%d/%d] round %d %s %s x%d %s: %.1f frames/s, gateway %.2f ms/frame, p95 %.1f ms, errors %d",
                i,
                len(steps),
                r + 1,
                cell.avatar,
                cell.target,
                cell.streams,
                v.name,
                m.summary.fps,
                m.gateway.total_s * 1000 / max(m.summary.frames_ok, 1),
                m.summary.p95_ms,
                m.summary.errors,
            )
    load_end = os.getloadavg()
    elapsed = time.monotonic() - started
    results = aggregate(measurements)
    setup = _setup_lines(grid, avatars, load_start, load_end, args.thread_names, elapsed,
                         bool(revisions))
    labels = {a.name: a.label for a in avatars.values()}
    notes: dict[str, str] = {}
    for v in variants:
        tree = revisions.get(v.name)
        parts = [f"commit {tree.describe}"] if tree else []
        if tree and tree.ws_count_bounds:
            parts.append("its WebSocket replies give bounds_len as a count of values, read as such")
        if ignored[v.name]:
            parts.append(f"not settings of this gateway (ignored by it): {', '.join(ignored[v.name])}")
        if parts:
            notes[v.name] = "; ".join(parts)
    report.write_text(args.out, render_markdown(results, variants, labels, setup, command,
                                                notes, references))
    report.write_json(
        args.out.with_suffix(".json"),
        to_json(
            results,
            measurements,
            variants,
            {
                "machine": report.machine_line(),
                "command": command,
                "date": report.utc_now(),
                "load_average_start": list(load_start),
                "load_average_end": list(load_end),
                "elapsed_s": elapsed,
                "grid": {
                    "avatars": list(grid.avatars),
                    "targets": list(grid.targets),
                    "streams": list(grid.streams),
                    "frames": grid.frames,
                    "rounds": grid.rounds,
                    "window": grid.window,
                    "verify_every": grid.verify_every,
                },
                "avatars": {
                    a.name: {"width": a.width, "height": a.height, "feature_rows": a.feature_rows}
                    for a in avatars.values()
                },
                "thread_names": args.thread_names,
                "variant_notes": notes,
                "revisions": {name: r.commit for name, r in revisions.items()},
                "references": references or [variants[0].name],
                "processes": pids,
            },
        ),
    )
    log.info("wrote %s (%.1f min)", args.out, elapsed / 60)
    return 1 if any(r.errors for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
