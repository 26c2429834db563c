"""`WorkerSupervisor`: runs ``--workers N`` gateway worker processes sharing the ports, restarts
the ones that die, stops them all gracefully.

Process model: the supervisor is the ``lipsync gateway`` (or ``lipsync up``) process itself; it
serves nothing. It picks the ports once (gRPC, HTTP, and the health port when
``LIPSYNC_HEALTH_PORT`` is set; port 0 becomes a free port) and keeps them reserved
with a bound, not listening, ``SO_REUSEPORT`` socket each, so a restarted worker always gets
them back; each worker (`gateway.worker`, started with `multiprocessing`'s *spawn*: a fresh
interpreter, no state copied from here) is a whole gateway bound to them with ``SO_REUSEPORT``
(gRPC ``grpc.so_reuseport`` = 1, aiohttp ``reuse_port``), and the kernel spreads new
connections over the listening workers. A connection stays with the worker that accepted it.
Every worker gets the one `GatewaySettings` (ports filled in), so TLS, tokens and limits are the
same in each; every limit is per worker.

Each worker slot goes through these states (`WorkerState`)::

    STARTING --Serving--> SERVING --exit--> BACKING_OFF --delay--> STARTING
    STARTING --exit--> BACKING_OFF | (first start) start error
    any --stop()--> STOPPING --exit--> STOPPED

and the supervisor through `SupervisorPhase`: STARTING (until every worker serves; a worker
that fails then fails the start, with its reason) -> RUNNING -> STOPPING -> STOPPED, or
GIVEN_UP.

Restart rule (`lipsync.triton_supervisor.RestartPolicy`, as for Triton under ``lipsync up``):
a *quick failure* is an exit before serving or within ``healthy_after_s`` of it; after quick
failure n in a row a slot waits ``backoff_s(n)`` (1 s doubling to 30 s) and starts its worker
again; failure ``max_restarts + 1`` in a row gives up: every worker is stopped and
`WorkersGaveUp` says which worker failed how. A worker that served ``healthy_after_s`` resets
its count. Every exit is reaped at once and its live gauges dropped (``mark_process_dead``).

Stop (SIGINT/SIGTERM to the supervisor): every worker gets SIGTERM and stops gracefully (its
in-flight requests get ``grace_s``); one still running after `stop_timeout_s` is killed. None is
left behind; the metrics folder is removed. A supervisor that is SIGKILLed cannot remove it (its
workers see their pipe close and stop): the next supervisor's start removes the folders of
supervisors that no longer run (`remove_stale_metrics_dirs`).

Shared state, through the pipes (`gateway.worker`): metrics are aggregated from the files in a
fresh ``PROMETHEUS_MULTIPROC_DIR`` (`gateway.metrics`); an avatar one worker loads or unloads on
request (``LoadPackage``, ``UnloadPackage``) is loaded or unloaded by every other worker before
the call returns, and by every worker started later: the supervisor keeps the journal of these
changes, the last one per avatar name, in order, and a restarted worker replays it after loading
the packages root (so an avatar unloaded on request stays unloaded); under ``lipsync up`` the
Triton supervisor's status is relayed to every worker.
"""
from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import multiprocessing
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Protocol

from prometheus_client.multiprocess import mark_process_dead

from gateway.config import GatewaySettings
from gateway.worker import (
    Applied,
    Apply,
    Changed,
    Readiness,
    Replicated,
    Serving,
    SharedChange,
    StartFailed,
    SupervisorUpdate,
    WorkerSpec,
    worker_main,
)
from lipsync.triton_local import describe_exit
from lipsync.triton_supervisor import RestartPolicy, SupervisorStatus, SupervisorView

log = logging.getLogger(__name__)

WORKER_RESTART_POLICY = RestartPolicy(
    max_restarts=5, backoff_initial_s=1.0, backoff_max_s=30.0, healthy_after_s=60.0
)
"""Restart limits of the workers (module doc)."""


METRICS_DIR_PREFIX = "lipsync-metrics-"
"""Name of a supervisor's metrics folder in the temporary folder: the prefix, its pid, ``-``,
`tempfile.mkdtemp`'s random part."""


def remove_stale_metrics_dirs(parent: str | None = None) -> list[str]:
    """Remove the metrics folders (`METRICS_DIR_PREFIX`) left in ``parent`` (default: the
    temporary folder, ``TMPDIR``) by supervisors that no longer run (killed with SIGKILL).

    A folder whose pid runs (a live supervisor, or a later process that got its pid) is kept.

    Returns:
        The folders removed.
    """
    base = parent or tempfile.gettempdir()
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(base):
            pid_text = entry.name.removeprefix(METRICS_DIR_PREFIX).partition("-")[0]
            if not entry.name.startswith(METRICS_DIR_PREFIX) or not pid_text.isdigit():
                continue
            if _pid_running(int(pid_text)) or not entry.is_dir(follow_symlinks=False):
                continue
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
    return removed


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class WorkerState(enum.StrEnum):
    """Where one worker slot is (module doc: the transitions)."""

    STARTING = "starting"
    SERVING = "serving"
    BACKING_OFF = "backing_off"
    STOPPING = "stopping"
    STOPPED = "stopped"


class SupervisorPhase(enum.StrEnum):
    """Where the supervisor is (module doc)."""

    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    GIVEN_UP = "given_up"


class WorkerStartError(RuntimeError):
    """A worker failed during the first start (the message says which and why)."""


class WorkersGaveUp(RuntimeError):
    """A worker failed quickly too often in a row; every worker was stopped."""


class WorkerProcess(Protocol):
    """A started worker process (`multiprocessing.Process` provides it)."""

    @property
    def pid(self) -> int | None: ...
    @property
    def sentinel(self) -> int: ...
    @property
    def exitcode(self) -> int | None: ...
    def terminate(self) -> None: ...
    def kill(self) -> None: ...
    def join(self, timeout: float | None = None) -> None: ...


Launcher = Callable[[WorkerSpec], tuple[WorkerProcess, Connection]]
"""Starts one worker from its spec; returns the process and the supervisor's end of its pipe."""


def spawn_worker(spec: WorkerSpec) -> tuple[WorkerProcess, Connection]:
    """The real `Launcher`: `gateway.worker.worker_main` in a *spawned* process."""
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe(duplex=True)
    process = ctx.Process(target=worker_main, args=(spec, theirs), name=f"lipsync-worker-{spec.index}")
    process.start()
    theirs.close()  # the child has its copy; ours sees EOF when the child exits
    return process, ours


@dataclass
class WorkerSlot:
    """One of the N workers: its current process and counts (a restart reuses the slot)."""

    index: int
    state: WorkerState = WorkerState.STARTING
    process: WorkerProcess | None = None
    conn: Connection | None = None
    pid: int | None = None
    ready: bool = False
    serving_at: float | None = None
    failures_in_a_row: int = 0
    restarts: int = 0
    start_error: str | None = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class _Replication:
    """A `Changed` being applied by the other workers."""

    origin: WorkerSlot
    request_id: int
    waiting: set[int]
    failures: list[str] = field(default_factory=list)


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound, not listening, ``SO_REUSEPORT`` TCP socket on ``host:port`` (0: a free port),
    which keeps the port for the workers (module doc).

    Raises:
        OSError: the port cannot be bound (taken by a program without ``SO_REUSEPORT``).
    """
    bind_host = "" if host in ("0.0.0.0", "") else host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((bind_host, port))
    except BaseException:
        sock.close()
        raise
    return sock


class WorkerSupervisor:
    """Runs ``settings.workers`` workers (module doc).

    Args:
        settings: the gateway settings (``workers`` >= 1; ports 0 pick free ports).
        grace_s: how long each worker lets in-flight requests finish when stopped (s).
        policy: the restart rule.
        triton: the supervisor of Triton under ``lipsync up`` (its status is relayed).
        launcher: starts one worker (default `spawn_worker`; tests pass short-lived stand-ins).
        stop_timeout_s: how long a stopping worker may take before it is killed (s; default
            twice the grace period, for gRPC then HTTP, plus 10 s).

    Use from one event loop: `start`, then `wait_given_up` or `stop`.
    """

    def __init__(
        self,
        settings: GatewaySettings,
        *,
        grace_s: float = 2.0,
        policy: RestartPolicy = WORKER_RESTART_POLICY,
        triton: SupervisorView | None = None,
        launcher: Launcher = spawn_worker,
        stop_timeout_s: float | None = None,
    ) -> None:
        self.settings = settings
        self.grace_s = grace_s
        self.policy = policy
        self.triton = triton
        self.launcher = launcher
        self.stop_timeout_s = stop_timeout_s if stop_timeout_s is not None else 2 * grace_s + 10.0
        self.phase = SupervisorPhase.STOPPED
        self.slots = [WorkerSlot(i + 1) for i in range(settings.workers)]
        self.grpc_port = 0
        self.http_port = 0
        self.health_port: int | None = None
        self.metrics_dir = ""
        self.gave_up_message: str | None = None
        self._reserved: list[socket.socket] = []
        self._changes: list[SharedChange] = []
        self._replications: dict[int, _Replication] = {}
        self._next_request = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._given_up = asyncio.Event()
        self._changed = asyncio.Event()
        self._unsubscribe: Callable[[], None] | None = None

    # ------------------------------------------------------------------ public
    def all_ready(self) -> bool:
        """Whether every worker serves and reports the gateway ready."""
        return all(s.state is WorkerState.SERVING and s.ready for s in self.slots)

    def pids(self) -> list[int]:
        """Process ids of the workers running now."""
        return [s.pid for s in self.slots if s.pid is not None and s.state is not WorkerState.BACKING_OFF]

    async def start(self, timeout_s: float = 600.0) -> None:
        """Reserve the ports, make the metrics folder, start every worker and wait until all
        serve.

        Raises:
            OSError: a port cannot be bound.
            WorkerStartError: a worker failed to start, or not every worker served within
                ``timeout_s`` (every worker is stopped again).
        """
        s = self.settings
        self.phase = SupervisorPhase.STARTING
        try:
            for port in (s.grpc_port, s.http_port, s.health_port):
                if port is not None:
                    self._reserved.append(reserve_port(s.host, port))
            bound = [int(sock.getsockname()[1]) for sock in self._reserved]
            self.grpc_port, self.http_port = bound[:2]
            self.health_port = bound[2] if s.health_port is not None else None
            for stale in remove_stale_metrics_dirs():
                log.info("removed the metrics folder of a supervisor that no longer runs: %s", stale)
            # fresh: nothing stale in it
            self.metrics_dir = tempfile.mkdtemp(prefix=f"{METRICS_DIR_PREFIX}{os.getpid()}-")
            if self.triton is not None:
                loop = asyncio.get_running_loop()

                def relay(status: SupervisorStatus) -> None:  # the Triton supervisor's thread
                    loop.call_soon_threadsafe(self._relay, status)

                self._unsubscribe = self.triton.subscribe(relay)
            self._tasks = [asyncio.ensure_future(self._run_slot(slot)) for slot in self.slots]
            try:
                await asyncio.wait_for(self._first_start(), timeout_s)
            except TimeoutError:
                waiting = [s.index for s in self.slots if s.state is not WorkerState.SERVING]
                raise WorkerStartError(
                    f"workers {waiting} did not serve within {timeout_s:.0f} s (loading avatars?)"
                ) from None
        except BaseException:
            await self.stop()
            raise
        self.phase = SupervisorPhase.RUNNING
        log.info(
            "%d gateway workers serving (pids %s) on gRPC %d, HTTP %d",
            len(self.slots), ", ".join(map(str, self.pids())), self.grpc_port, self.http_port,
        )

    async def _first_start(self) -> None:
        while True:
            failed = [slot for slot in self.slots if slot.start_error is not None]
            if failed:
                raise WorkerStartError(failed[0].start_error)
            if all(slot.state is WorkerState.SERVING for slot in self.slots):
                return
            self._changed.clear()
            await self._changed.wait()

    async def wait_given_up(self) -> str:
        """Wait until the supervisor gives up; returns why (`WorkersGaveUp`'s message)."""
        await self._given_up.wait()
        return self.gave_up_message or "gave up"

    async def stop(self) -> None:
        """Stop every worker gracefully (module doc); idempotent."""
        if self.phase in (SupervisorPhase.STOPPED, SupervisorPhase.STOPPING) and not self._tasks:
            self._cleanup()
            return
        if self.phase is not SupervisorPhase.GIVEN_UP:
            self.phase = SupervisorPhase.STOPPING
        self._terminate_all()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._tasks = []
        self._cleanup()
        if self.phase is not SupervisorPhase.GIVEN_UP:
            self.phase = SupervisorPhase.STOPPED
        log.info("gateway workers stopped")

    def _cleanup(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        for sock in self._reserved:
            sock.close()
        self._reserved = []
        if self.metrics_dir:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)

    # ------------------------------------------------------------------ one slot
    def _spec(self, slot: WorkerSlot) -> WorkerSpec:
        ports = {"grpc_port": self.grpc_port, "http_port": self.http_port, "health_port": self.health_port}
        return WorkerSpec(
            index=slot.index,
            settings=self.settings.model_copy(update=ports),
            grace_s=self.grace_s,
            metrics_dir=self.metrics_dir,
            changes=tuple(self._changes),
            triton_status=self.triton.status() if self.triton is not None else None,
        )

    async def _run_slot(self, slot: WorkerSlot) -> None:
        """Start, watch, back off, start again ... until stop or give-up."""
        while not self._stopping.is_set():
            await self._run_once(slot)
            if self._stopping.is_set():
                break
            ran_s = None if slot.serving_at is None else time.monotonic() - slot.serving_at
            slot.failures_in_a_row = self.policy.failures_after(slot.failures_in_a_row, ran_s)
            code = slot.process.exitcode if slot.process is not None else None
            ended = describe_exit(code) if code is not None else "exited"
            how = f"worker {slot.index} (pid {slot.pid}) {ended}"
            how += f" after serving {ran_s:.1f} s" if ran_s is not None else " before it served"
            if slot.start_error:
                how += f" ({slot.start_error})"
            if self.phase is SupervisorPhase.STARTING:
                slot.start_error = slot.start_error or how
                self._changed.set()
                break
            if self.policy.gives_up(slot.failures_in_a_row):
                self._give_up(slot, how)
                break
            delay = self.policy.backoff_s(slot.failures_in_a_row)
            log.error(
                "%s; restarting it in %.1f s (quick failure %d in a row; gives up at %d)",
                how, delay, slot.failures_in_a_row, self.policy.max_restarts + 1,
            )
            slot.state = WorkerState.BACKING_OFF
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            if self._stopping.is_set():
                break
            slot.restarts += 1
        slot.state = WorkerState.STOPPED
        self._changed.set()

    async def _run_once(self, slot: WorkerSlot) -> None:
        """Start the slot's worker and wait until it exits; reap it and drop its gauges."""
        slot.state, slot.ready, slot.serving_at, slot.start_error = WorkerState.STARTING, False, None, None
        slot.exited = asyncio.Event()
        process, conn = self.launcher(self._spec(slot))
        slot.process, slot.conn, slot.pid = process, conn, process.pid
        loop = asyncio.get_running_loop()
        loop.add_reader(conn.fileno(), self._readable, slot)
        loop.add_reader(process.sentinel, slot.exited.set)
        try:
            if self._stopping.is_set():  # stop() came while it was being spawned
                process.terminate()
            await self._wait_exit(slot)
        finally:
            loop.remove_reader(process.sentinel)
            self._readable(slot)  # what it sent last
            loop.remove_reader(conn.fileno())
            conn.close()
            slot.conn = None
            if slot.pid is not None:
                mark_process_dead(slot.pid, self.metrics_dir)
            self._worker_gone(slot)

    async def _wait_exit(self, slot: WorkerSlot) -> None:
        """Wait for the exit (killing it when a stop takes longer than `stop_timeout_s`)."""
        assert slot.process is not None
        while not slot.exited.is_set():
            waiter = asyncio.ensure_future(slot.exited.wait())
            stopping = asyncio.ensure_future(self._stopping.wait())
            try:
                await asyncio.wait({waiter, stopping}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopping.cancel()
            if not slot.exited.is_set():  # a stop began: SIGTERM was sent by stop()
                try:
                    await asyncio.wait_for(waiter, self.stop_timeout_s)
                except TimeoutError:
                    log.error(
                        "worker %d (pid %s) did not stop within %.1f s: killing it",
                        slot.index, slot.pid, self.stop_timeout_s,
                    )
                    slot.process.kill()
                    await slot.exited.wait()
            waiter.cancel()
        slot.process.join(5.0)  # reaps it (the sentinel says it exited)

    # ------------------------------------------------------------------ messages
    def _readable(self, slot: WorkerSlot) -> None:
        """Dispatch every message the worker sent that is waiting (also once it exited: its
        last, e.g. `StartFailed`); at EOF stop watching its pipe."""
        conn = slot.conn
        if conn is None:
            return
        try:
            while conn.poll():
                self._dispatch(slot, conn.recv())
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(conn.fileno())

    def _dispatch(self, slot: WorkerSlot, message: object) -> None:
        if isinstance(message, Serving):
            slot.state, slot.serving_at = WorkerState.SERVING, time.monotonic()
            if slot.restarts:
                log.info(
                    "worker %d serving again (pid %d, restart %d)", slot.index, message.pid, slot.restarts
                )
        elif isinstance(message, Readiness):
            slot.ready = message.ready
        elif isinstance(message, StartFailed):
            slot.start_error = message.message
        elif isinstance(message, Changed):
            self._replicate(slot, message)
        elif isinstance(message, Applied):
            self._applied(slot, message)
        else:
            log.warning("unexpected message from worker %d: %r", slot.index, message)
        self._changed.set()

    def _send(self, slot: WorkerSlot, message: object) -> None:
        if slot.conn is not None:
            try:
                slot.conn.send(message)
            except OSError:
                log.debug("worker %d is gone; %r not sent", slot.index, message)

    def _relay(self, status: SupervisorStatus) -> None:
        for slot in self.slots:
            self._send(slot, SupervisorUpdate(status))

    def _replicate(self, origin: WorkerSlot, changed: Changed) -> None:
        """A worker loaded or unloaded an avatar on request: every other running worker makes
        the change too, and every worker started from now on (the journal keeps the last change
        of each avatar name, in order)."""
        change = changed.change
        self._changes = [c for c in self._changes if c.name != change.name]
        self._changes.append(change)
        self._next_request += 1
        others = [s for s in self.slots if s is not origin and s.conn is not None]
        replication = _Replication(origin, changed.request_id, {s.index for s in others})
        self._replications[self._next_request] = replication
        for slot in others:
            self._send(slot, Apply(self._next_request, change))
        self._check_replicated(self._next_request)

    def _applied(self, slot: WorkerSlot, result: Applied) -> None:
        replication = self._replications.get(result.request_id)
        if replication is None:
            return
        replication.waiting.discard(slot.index)
        if result.error is not None:
            replication.failures.append(result.error)
        self._check_replicated(result.request_id)

    def _check_replicated(self, request_id: int) -> None:
        replication = self._replications[request_id]
        if not replication.waiting:
            del self._replications[request_id]
            self._send(replication.origin, Replicated(replication.request_id, tuple(replication.failures)))

    def _worker_gone(self, slot: WorkerSlot) -> None:
        """A worker exited: it applies nothing more, and its own replications end."""
        for request_id, replication in list(self._replications.items()):
            if replication.origin is slot:
                del self._replications[request_id]
            elif slot.index in replication.waiting:
                replication.waiting.discard(slot.index)
                self._check_replicated(request_id)

    # ------------------------------------------------------------------ give up
    def _give_up(self, slot: WorkerSlot, how: str) -> None:
        p = self.policy
        self.gave_up_message = (
            f"gave up on the gateway workers: worker {slot.index} failed {slot.failures_in_a_row} "
            f"times in a row (at most {p.max_restarts} restarts; a quick failure is an exit before "
            f"serving or within {p.healthy_after_s:.0f} s of it). The last: {how}"
        )
        log.error("%s", self.gave_up_message)
        self.phase = SupervisorPhase.GIVEN_UP
        self._given_up.set()
        self._terminate_all()

    def _terminate_all(self) -> None:
        """No more restarts; SIGTERM to every worker still running (each then stops gracefully)."""
        self._stopping.set()
        for slot in self.slots:
            if slot.process is not None and not slot.exited.is_set():
                slot.state = WorkerState.STOPPING
                with contextlib.suppress(OSError):
                    slot.process.terminate()
