"""Memory of the gateway with one process and with several workers: RSS and PSS per process;
and the load time of an avatar's background JPEGs with their cache entry present vs encoded.

    python -m perf.workers_memory                       # ~5 min on 2 cores
    python -m perf.workers_memory --variant w1: --variant w2:LIPSYNC_WORKERS=2

PSS (proportional set size, ``/proc/<pid>/smaps_rollup``) is the honest figure for processes
that share pages: a page mapped by k processes counts 1/k in each, so the PSS of a gateway's
processes add up to the memory it really holds, where their RSS would count the shared avatar
arrays (``frames.npy``, the crop cache and the background JPEGs' cache, memory-mapped:
`lipsync.package`, `gateway.crop_cache`, `gateway.background_cache`) and the libraries once
per process.

What one run does: the avatars of `perf.capacity` (the 176x144 demo and the 880x720 clip), the
identity UNet in the real CPU ``tritonserver`` (`perf.identity_unet`), then for each variant in
turn (one gateway at a time, so no other gateway shares its pages): start ``lipsync gateway``
with the variant's ``LIPSYNC_*`` environment, send every servable frame of each avatar over 8
gRPC streams and 8 WebSocket streams (each stream walks every frame id, so every worker touches
every video frame's arrays, as a long-running gateway does), read ``smaps_rollup`` of each of
its processes, stop it. The default variants: one process and two workers, each with the
caches (the default) and with the crops and background JPEGs computed into each process's RAM
(``LIPSYNC_CROP_CACHE_DIR=`` empty, what every worker held before the crop cache); and two
workers with the crops mapped but the background JPEGs in each worker's RAM (``w2-bg-ram``:
what every worker held before the background cache), whose cache folder `NO_BACKGROUND_CACHE`
holds a file where the ``backgrounds`` folder would be, so that cache falls back to RAM.

Load time (`load_times`, before the gateways, in this process): each avatar loaded by a fresh
`gateway.store.AvatarStore` with the gateway's compositor (after one load not counted: first-use
costs), ``--load-repeats`` times, each time three ways in a row: without a cache (encoded into
RAM), with an empty cache folder (encoded, written, mapped), and again with that folder (the
entry present: checked and mapped); the background part is ``AvatarBackgrounds.build_ms`` (JPEGs
encoded or mapped, plans made, start-up self-test), the whole is the store's load time (crops
cached the same way).

Writes ``perf/results/workers_memory.md`` and ``.json``.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import shutil
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from perf import report
from perf.capacity import (
    SCRATCH,
    SMALL_AVATAR,
    AvatarInfo,
    audio_encoder_onnx,
    identity_triton,
    load_config,
    prepare_avatars,
)
from perf.capacity_report import Variant, parse_variant
from perf.procstat import ProcessTree
from perf.servers import GatewayHandle, start_gateway

log = logging.getLogger(__name__)

NO_BACKGROUND_CACHE = SCRATCH.parent / "workers_memory" / "cache-backgrounds-in-ram"
"""A crop cache folder whose ``backgrounds`` is a file: crops mapped, background JPEGs in RAM."""

DEFAULT_VARIANTS = (
    "w1-ram:LIPSYNC_CROP_CACHE_DIR=",
    "w1:",
    "w2-ram:LIPSYNC_WORKERS=2,LIPSYNC_CROP_CACHE_DIR=",
    f"w2-bg-ram:LIPSYNC_WORKERS=2,LIPSYNC_CROP_CACHE_DIR={NO_BACKGROUND_CACHE}",
    "w2:LIPSYNC_WORKERS=2",
)
"""One process and two workers: everything in each process's RAM, crops mapped and background
JPEGs in RAM (two workers), everything mapped."""

_FIELDS = ("Rss", "Pss", "Pss_Anon", "Pss_File", "Shared_Clean", "Private_Dirty")
MIB = 1024.0


@dataclass(frozen=True, slots=True)
class ProcessMemory:
    """``smaps_rollup`` of one process of a gateway (MiB)."""

    variant: str
    pid: int
    role: str
    rss: float
    pss: float
    pss_anon: float
    pss_file: float
    shared_clean: float
    private_dirty: float


@dataclass(frozen=True, slots=True)
class LoadTime:
    """One load of one avatar (`load_times`).

    Attributes:
        avatar: the avatar's name.
        way: ``ram`` (no cache), ``build`` (empty cache folder), ``map`` (entry present).
        backgrounds_ms: ``AvatarBackgrounds.build_ms`` (ms).
        load_ms: the store's whole load (ms).
        mapped: whether the background JPEGs came memory-mapped.
        frames: video frames N.
        backgrounds_mib: the background JPEGs and offsets (MiB, `AvatarBackgrounds.nbytes`).
    """

    avatar: str
    way: str
    backgrounds_ms: float
    load_ms: float
    mapped: bool
    frames: int
    backgrounds_mib: float


def load_times(
    packages_root: Path, avatars: Sequence[AvatarInfo], repeats: int, scratch: Path
) -> list[LoadTime]:
    """Load each avatar ``repeats`` times each way (module doc), in this process, offline (no
    Triton: the store registers no model)."""
    from gateway.config import GatewaySettings
    from gateway.context import make_compositor
    from gateway.crop_cache import CropCache
    from gateway.store import AvatarStore

    def load_once(avatar: str, way: str, cache: Path | None) -> LoadTime:
        compositor = make_compositor(GatewaySettings.model_validate({"crop_cache_dir": cache}))
        store = AvatarStore(packages_root, None, None if cache is None else CropCache(cache),
                            backgrounds=compositor.backgrounds)
        loaded = asyncio.run(store.load(avatar))
        assert loaded.backgrounds is not None
        bg = loaded.backgrounds
        return LoadTime(avatar, way, bg.build_ms, loaded.init_ms, bg.source.mapped,
                        loaded.video_frames, bg.nbytes / 2**20)

    out: list[LoadTime] = []
    if avatars:
        load_once(avatars[0].name, "warm-up", None)  # first-use costs (imports, pools): not counted
    for avatar in avatars:
        for _ in range(repeats):
            cache = Path(tempfile.mkdtemp(dir=scratch, prefix="load-cache."))
            try:
                out += [load_once(avatar.name, "ram", None), load_once(avatar.name, "build", cache),
                        load_once(avatar.name, "map", cache)]
            finally:
                shutil.rmtree(cache, ignore_errors=True)
    return out


def smaps_rollup(pid: int) -> dict[str, float]:
    """The fields of ``/proc/<pid>/smaps_rollup`` in `_FIELDS`, MiB."""
    values: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        if key in _FIELDS:
            values[key] = int(rest.split()[0]) / MIB
    return values


def role_of(pid: int, root: int, tree: Sequence[int]) -> str:
    """``gateway`` (one process: a root without workers, whatever helpers it has), ``supervisor``
    (the workers' parent), ``worker``, ``resource tracker`` (multiprocessing's) or ``other``."""
    if pid == root:
        workers = any(b"spawn_main" in _cmdline(p) for p in tree if p != root)
        return "supervisor" if workers else "gateway"
    cmdline = _cmdline(pid)
    if b"spawn_main" in cmdline:
        return "worker"
    return "resource tracker" if b"resource_tracker" in cmdline else "other"


def _cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def measure(variant: str, gw: GatewayHandle) -> list[ProcessMemory]:
    """``smaps_rollup`` of every process of the gateway's tree now."""
    tree = ProcessTree(gw.pid).pids()
    out = []
    for pid in tree:
        v = smaps_rollup(pid)
        out.append(ProcessMemory(
            variant, pid, role_of(pid, gw.pid, tree), v["Rss"], v["Pss"], v["Pss_Anon"],
            v["Pss_File"], v["Shared_Clean"], v["Private_Dirty"],
        ))
    return out


def touch_every_frame(gw: GatewayHandle, avatars: Sequence[AvatarInfo], timeout_s: float) -> None:
    """Every servable frame of each avatar over 8 gRPC and 8 WebSocket streams (module doc).

    Raises:
        RuntimeError: a frame failed.
    """
    from perf.loadgen import run_load

    for avatar in avatars:
        for target in ("grpc", "ws"):
            config = load_config(gw, avatar, target, 8, avatar.feature_rows, 1, timeout_s,
                                 f"{avatar.name} {target}", 0)
            summary, _ = asyncio.run(run_load(config, progress=False))
            if summary.errors:
                raise RuntimeError(
                    f"{config.label}: {summary.errors} errors, e.g. {summary.error_samples[:2]}"
                )


def render(rows: Sequence[ProcessMemory], variants: Sequence[Variant], avatars: Sequence[AvatarInfo],
           loads: Sequence[LoadTime], command: str) -> list[str]:
    """The markdown report."""
    lines = report.header("Gateway memory: one process vs workers (RSS and PSS)", command=command)
    lines += [
        "- avatars: " + ", ".join(a.label for a in avatars) + "; every servable frame of each sent "
        "over 8 gRPC and 8 WebSocket streams before the reading (so every worker touched every "
        "video frame's arrays)",
        "- PSS: a page mapped by k processes counts 1/k in each (the sum over a gateway's "
        "processes is what it holds); Pss_File: mapped files (libraries, `frames.npy`, the crop "
        "and background caches); Pss_Anon: the process's own memory (heap, computed crops, "
        "background JPEGs encoded in RAM)",
        "- one gateway at a time, so no other gateway shares its pages",
        "- `w2-bg-ram` vs `w2` (before and after the background cache): PSS anon differs by the "
        "background JPEGs each worker encodes into its RAM; PSS file differs too, because a worker "
        "that encodes the backgrounds reads every full video frame (all of `frames.npy` mapped "
        "into it), while one that maps the JPEGs from the cache reads only the face bands of the "
        "frames it composites (the kernel's page cache may still hold the rest: PSS counts what "
        "is mapped)",
        "",
        "## Variants",
        "",
        *report.markdown_table(["variant", "gateway environment"],
                               [[v.name, f"`{v.env_text}`"] for v in variants]),
        "",
        "## Per process (MiB)",
        "",
        *report.markdown_table(
            ["variant", "process", "pid", "RSS", "PSS", "PSS anon", "PSS file", "shared clean",
             "private dirty"],
            [[r.variant, r.role, r.pid, r.rss, r.pss, r.pss_anon, r.pss_file, r.shared_clean,
              r.private_dirty] for r in rows]),
        "",
        "## Per gateway (MiB)",
        "",
    ]
    table = []
    last = variants[-1].name if variants else ""
    totals = {v.name: sum(r.pss for r in rows if r.variant == v.name) for v in variants}
    for v in variants:
        mine = [r for r in rows if r.variant == v.name]
        workers = [r for r in mine if r.role in ("worker", "gateway")]
        table.append([v.name, len(workers), totals[v.name],
                      sum(r.pss for r in workers) / max(len(workers), 1),
                      sum(r.pss_anon for r in workers) / max(len(workers), 1),
                      sum(r.rss for r in workers) / max(len(workers), 1),
                      f"{totals[v.name] / totals[last]:.3f}" if totals[last] else "-"])
    lines += report.markdown_table(
        ["variant", "serving processes", "PSS, all processes", "PSS per serving process",
         "PSS anon per serving process", "RSS per serving process", f"PSS, all / {last}'s"], table)
    if loads:
        lines += ["", "## Avatar load time: background cache entry present vs encoded (ms)", "",
                  "Median over the repeats; `ram`: no cache (encoded into RAM), `build`: empty cache "
                  "folder (encoded, written, mapped), `map`: the entry present (sha256-checked and "
                  "mapped; its pages in the page cache, just written). Backgrounds: JPEGs encoded or "
                  "mapped + splice plans + the start-up self-test; load: the store's whole load "
                  "(the crops cached the same way).", ""]
        table = []
        for avatar in dict.fromkeys(t.avatar for t in loads):
            med = {}
            for way in ("ram", "build", "map"):
                same = [t for t in loads if (t.avatar, t.way) == (avatar, way)]
                med[way] = (statistics.median(t.backgrounds_ms for t in same),
                            statistics.median(t.load_ms for t in same))
            mapped = [t for t in loads if (t.avatar, t.way) == (avatar, "map")]
            table.append([avatar, len(mapped), mapped[0].frames, mapped[0].backgrounds_mib,
                          *med["ram"], *med["build"], *med["map"],
                          f"{med['map'][0] / med['ram'][0]:.3f}", f"{med['map'][1] / med['ram'][1]:.3f}"])
        lines += report.markdown_table(
            ["avatar", "repeats", "video frames", "background JPEGs MiB", "ram: backgrounds", "ram: load",
             "build: backgrounds", "build: load",
             "map: backgrounds", "map: load", "backgrounds map / ram", "load map / ram"], table)
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Run the variants one after the other and write the report (module doc)."""
    from gateway.background_cache import SUBFOLDER
    from lipsync.log import setup_logging
    from perf import micro_720p

    setup_logging()
    p = argparse.ArgumentParser(prog="python -m perf.workers_memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", dest="variants", action="append", type=parse_variant, default=None,
                   metavar="NAME:ENV",
                   help="a gateway variant (repeat); default: " + " ".join(DEFAULT_VARIANTS))
    p.add_argument("--avatars", nargs="+", default=[SMALL_AVATAR, micro_720p.AVATAR])
    p.add_argument("--timeout", type=float, default=120.0, help="per-frame deadline, s")
    p.add_argument("--load-repeats", type=int, default=3, help="loads per avatar and way (0: none)")
    p.add_argument("--out", type=Path, default=report.RESULTS_DIR / "workers_memory.md")
    args = p.parse_args(argv)
    variants: list[Variant] = args.variants or [parse_variant(v) for v in DEFAULT_VARIANTS]
    scratch = SCRATCH.parent / "workers_memory"
    scratch.mkdir(parents=True, exist_ok=True)
    packages_root, infos = prepare_avatars(scratch, args.avatars)
    avatars = [infos[a] for a in args.avatars]
    loads = load_times(packages_root, avatars, args.load_repeats, scratch)
    for t in loads:
        log.info("load %s %s: backgrounds %.0f ms, load %.0f ms",
                 t.avatar, t.way, t.backgrounds_ms, t.load_ms)
    shutil.rmtree(NO_BACKGROUND_CACHE, ignore_errors=True)
    NO_BACKGROUND_CACHE.mkdir(parents=True)
    (NO_BACKGROUND_CACHE / SUBFOLDER).write_text("a file, not a folder: background JPEGs in RAM")
    rows: list[ProcessMemory] = []
    from lipsync.paths import MODEL_REPOSITORY_CPU

    encoder = audio_encoder_onnx([MODEL_REPOSITORY_CPU])
    with identity_triton(scratch, args.avatars, encoder) as triton:
        for v in variants:
            with start_gateway(triton.grpc_url, packages_root, scratch, args.timeout, extra_env=dict(v.env),
                               name=f"gateway-{v.name}", ready_timeout_s=300) as gw:
                touch_every_frame(gw, avatars, args.timeout)
                measured = measure(v.name, gw)
                rows += measured
                summary = ", ".join(f"{r.role} {r.pid} PSS {r.pss:.0f} MiB" for r in measured)
                log.info("%s: %s", v.name, summary)
    given = list(argv) if argv is not None else sys.argv[1:]
    command = " ".join(["python -m perf.workers_memory", shlex.join(given)]).strip()
    report.write_text(args.out, render(rows, variants, avatars, loads, command))
    report.write_json(args.out.with_suffix(".json"),
                      {"processes": [asdict(r) for r in rows], "loads": [asdict(t) for t in loads]})
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
