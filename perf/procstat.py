"""CPU time of processes and their threads from /proc (Linux), split by thread name.

Reads ``/proc/<pid>/stat`` and ``/proc/<pid>/task/<tid>/stat`` (proc(5): field 2 ``comm``,
field 4 ``ppid``, fields 14 ``utime`` and 15 ``stime`` in clock ticks, ``SC_CLK_TCK`` per
second) and the machine's ``/proc/stat`` ``cpu`` line. A `ProcessTree` names a root process;
each `snapshot` holds the CPU ticks of the root and every descendant (so gateway workers
started as child processes are counted with their parent), per process and per thread. The
difference of two snapshots gives the CPU each process and each thread used in between.

Thread names come from ``comm`` (the kernel's 15-character thread name). Native libraries
name their threads (gRPC core: ``grpc_global_tim``, ``event_engine``, ...); Python 3.11 does
not give threads created by `threading` a native name, so they all show the process name
unless the process runs with the hook in ``perf/threadnames/`` (see `thread_name_env`).
`classify_thread` maps a thread to a category through `THREAD_RULES`.

Accounting limits: a thread that exits between two snapshots leaves its time in its process's
total but not in any thread (reported as the category ``exited threads``); a process that exits
in between is not counted at all.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PROC = Path("/proc")
"""The proc file system's mount point."""

CLOCK_TICKS_PER_S: int = os.sysconf("SC_CLK_TCK")
"""Units of utime/stime per second (USER_HZ, 100 on Linux)."""

THREADNAMES_DIR = Path(__file__).resolve().parent / "threadnames"
"""Folder holding the ``sitecustomize`` hook that gives Python threads native names."""

EVENT_LOOP = "event loop (MainThread)"
POOL = "composite/JPEG pool"
GRPC_CORE = "gRPC core"
EXITED = "exited threads"
OTHER = "other"

THREAD_RULES: tuple[tuple[str, str], ...] = (
    # gateway.context: CompositePool(name="composite") -> composite_0, ...
    (POOL, r"^composite"),
    # gRPC core (C++) threads, and grpc.aio's Python poller thread (target _poll_wrapper)
    (GRPC_CORE, (r"^(grpc|event_engine|lifeguard|default-execut|resolver-execu|timer_manager"
                 r"|executor|_poll_wrapper|grpcpp)")),
)
"""(category, regular expression on the thread name) pairs, first match wins; the main
thread (tid = pid) of each process is `EVENT_LOOP`, a thread matching no rule is `OTHER`.
Add a pair here when the gateway names a new kind of thread."""

CATEGORIES: tuple[str, ...] = (EVENT_LOOP, POOL, GRPC_CORE, OTHER, EXITED)
"""Every category, in report order."""


@dataclass(frozen=True, slots=True)
class TaskStat:
    """One line of ``/proc/<pid>/stat`` or ``/proc/<pid>/task/<tid>/stat``.

    Attributes:
        id: pid or tid.
        comm: process or thread name (at most 15 characters).
        ppid: parent process id.
        cpu_ticks: utime + stime (clock ticks, `CLOCK_TICKS_PER_S` per second).
    """

    id: int
    comm: str
    ppid: int
    cpu_ticks: int


def parse_stat(text: str) -> TaskStat:
    """Parse the text of a ``stat`` file (proc(5)).

    ``comm`` is the text between the first ``(`` and the last ``)`` (a name may itself hold
    spaces and parentheses); the fields after it are split on whitespace.

    Raises:
        ValueError: the text is not a stat line.
    """
    head, sep, tail = text.rpartition(")")
    pid_text, open_paren, comm = head.partition("(")
    fields = tail.split()
    if not sep or not open_paren or len(fields) < 13:
        raise ValueError(f"not a /proc stat line: {text[:80]!r}")
    # fields[0] is field 3 (state): field n of proc(5) is fields[n - 3]
    return TaskStat(int(pid_text), comm, int(fields[1]), int(fields[11]) + int(fields[12]))


def _read_stat(path: Path) -> TaskStat | None:
    try:
        return parse_stat(path.read_text())
    except (OSError, ValueError):  # the task exited while we looked
        return None


def parent_map(proc: Path = PROC) -> dict[int, int]:
    """``{pid: ppid}`` of every process now running (one scan of /proc)."""
    out: dict[int, int] = {}
    for entry in proc.iterdir():
        if entry.name.isdigit():
            st = _read_stat(entry / "stat")
            if st is not None:
                out[st.id] = st.ppid
    return out


def descendants(root: int, parents: Mapping[int, int]) -> list[int]:
    """`root` and every process below it in `parents` (``{pid: ppid}``), root first."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(sorted(children.get(pid, ()), reverse=True))
    return out


@dataclass(frozen=True, slots=True)
class ProcessSample:
    """CPU ticks of one process: its total and each live thread's.

    Attributes:
        pid: process id.
        comm: process name.
        total_ticks: utime + stime of the whole process (exited threads included).
        threads: ``{tid: (thread name, ticks)}``.
    """

    pid: int
    comm: str
    total_ticks: int
    threads: dict[int, tuple[str, int]]


def sample_process(pid: int, proc: Path = PROC) -> ProcessSample | None:
    """Read one process's and its threads' CPU ticks; None when it is gone."""
    total = _read_stat(proc / str(pid) / "stat")
    if total is None:
        return None
    threads: dict[int, tuple[str, int]] = {}
    try:
        tids = [int(t.name) for t in (proc / str(pid) / "task").iterdir()]
    except OSError:
        return None
    for tid in tids:
        st = _read_stat(proc / str(pid) / "task" / str(tid) / "stat")
        if st is not None:
            threads[tid] = (st.comm, st.cpu_ticks)
    return ProcessSample(pid, total.comm, total.cpu_ticks, threads)


@dataclass(frozen=True, slots=True)
class TreeSnapshot:
    """CPU ticks of a process tree at one moment: ``{pid: ProcessSample}``."""

    processes: dict[int, ProcessSample]


class ProcessTree:
    """A root process and its descendants, sampled from /proc.

    Args:
        root: pid of the root (e.g. the gateway, or tritonserver).
        proc: the proc file system (a test may point it elsewhere).
    """

    def __init__(self, root: int, proc: Path = PROC) -> None:
        self.root = root
        self.proc = proc

    def pids(self, parents: Mapping[int, int] | None = None) -> list[int]:
        """The root and its descendants now (`parents` from `parent_map`, read if None)."""
        return descendants(self.root, parent_map(self.proc) if parents is None else parents)

    def snapshot(self, parents: Mapping[int, int] | None = None) -> TreeSnapshot:
        """Sample every process of the tree (see `sample_process`)."""
        out: dict[int, ProcessSample] = {}
        for pid in self.pids(parents):
            s = sample_process(pid, self.proc)
            if s is not None:
                out[pid] = s
        return TreeSnapshot(out)


def classify_thread(pid: int, tid: int, name: str,
                    rules: Sequence[tuple[str, str]] = THREAD_RULES) -> str:
    """The category of one thread: `EVENT_LOOP` for a process's main thread (tid = pid), else
    the first of `rules` whose expression matches `name`, else `OTHER`."""
    if tid == pid:
        return EVENT_LOOP
    for category, pattern in rules:
        if re.search(pattern, name):
            return category
    return OTHER


@dataclass(frozen=True, slots=True)
class CpuUsage:
    """CPU used by a process tree between two snapshots.

    Attributes:
        total_s: CPU seconds of every process of the tree (user + system).
        by_category: CPU seconds per thread category (`CATEGORIES`; `EXITED` = the part of
            the processes' totals no live thread accounts for); sums to `total_s`.
        by_thread: CPU seconds per ``"<process name>/<thread name>"``, threads of the same
            name added up (e.g. both ``composite_*`` threads stay apart, every
            ``event_engine`` thread is one entry).
        processes: processes seen in both snapshots.
    """

    total_s: float
    by_category: dict[str, float]
    by_thread: dict[str, float] = field(default_factory=dict)
    processes: int = 0

    def ms_per(self, frames: int) -> dict[str, float]:
        """``{"total": ..., <category>: ...}`` in ms per frame (NaN when `frames` is 0)."""
        scale = 1000.0 / frames if frames else float("nan")
        return {"total": self.total_s * scale, **{k: v * scale for k, v in self.by_category.items()}}


def cpu_between(before: TreeSnapshot, after: TreeSnapshot,
                rules: Sequence[tuple[str, str]] = THREAD_RULES) -> CpuUsage:
    """The CPU each category of thread used from `before` to `after`.

    Only processes present in both snapshots count (a pid seen once is new or gone); a
    thread present only in `after` counts from zero (it started in between), one present
    only in `before` went into `EXITED`.
    """
    by_cat = dict.fromkeys(CATEGORIES, 0.0)
    by_thread: dict[str, float] = {}
    total = 0
    common = [pid for pid in after.processes if pid in before.processes]
    for pid in common:
        a, b = after.processes[pid], before.processes[pid]
        delta_total = a.total_ticks - b.total_ticks
        total += delta_total
        live = 0
        for tid, (name, ticks) in a.threads.items():
            d = ticks - b.threads.get(tid, (name, 0))[1]
            live += d
            by_cat[classify_thread(pid, tid, name, rules)] += d / CLOCK_TICKS_PER_S
            key = f"{a.comm}/{name}" if tid != pid else f"{a.comm}/{name} (main)"
            by_thread[key] = by_thread.get(key, 0.0) + d / CLOCK_TICKS_PER_S
        by_cat[EXITED] += max(delta_total - live, 0) / CLOCK_TICKS_PER_S
    return CpuUsage(total / CLOCK_TICKS_PER_S, by_cat, by_thread, len(common))


def self_cpu_s() -> float:
    """CPU seconds (user + system, every thread, exited ones included) of this process."""
    t = os.times()
    return t.user + t.system


@dataclass(frozen=True, slots=True)
class MachineCpu:
    """The machine's CPU counters from the ``cpu`` line of /proc/stat (ticks).

    Attributes:
        busy_ticks: user + nice + system + irq + softirq + steal.
        total_ticks: busy + idle + iowait.
    """

    busy_ticks: int
    total_ticks: int


def parse_proc_stat_cpu(text: str) -> MachineCpu:
    """Parse the aggregate ``cpu`` line of /proc/stat (proc(5): user nice system idle iowait
    irq softirq steal guest guest_nice; guest time is already in user).

    Raises:
        ValueError: no ``cpu`` line.
    """
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] == "cpu":
            v = [int(x) for x in parts[1:9]] + [0] * max(0, 9 - len(parts))
            user, nice, system, idle, iowait, irq, softirq, steal = v[:8]
            busy = user + nice + system + irq + softirq + steal
            return MachineCpu(busy, busy + idle + iowait)
    raise ValueError("no aggregate 'cpu' line in /proc/stat")


def machine_cpu(proc: Path = PROC) -> MachineCpu:
    """The machine's CPU counters now."""
    return parse_proc_stat_cpu((proc / "stat").read_text())


def thread_name_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with the thread-name hook (``perf/threadnames/sitecustomize.py``) first on
    ``PYTHONPATH``: a Python process started with it gives each `threading.Thread` its Python
    name as native name (``composite_0``, ``asyncio_0``, ...), so `classify_thread` can tell
    the gateway's pools apart. Child processes inherit it (gateway workers)."""
    out = dict(env)
    old = out.get("PYTHONPATH", "")
    out["PYTHONPATH"] = os.pathsep.join(p for p in (str(THREADNAMES_DIR), old) if p)
    return out


def sum_categories(usages: Iterable[CpuUsage]) -> CpuUsage:
    """Several `CpuUsage` added up (e.g. the rounds of one cell)."""
    by_cat = dict.fromkeys(CATEGORIES, 0.0)
    by_thread: dict[str, float] = {}
    total, procs = 0.0, 0
    for u in usages:
        total += u.total_s
        procs = max(procs, u.processes)
        for k, v in u.by_category.items():
            by_cat[k] = by_cat.get(k, 0.0) + v
        for k, v in u.by_thread.items():
            by_thread[k] = by_thread.get(k, 0.0) + v
    return CpuUsage(total, by_cat, by_thread, procs)
