"""`gateway.workers.WorkerSupervisor`'s rules with stand-in workers: real spawned processes
that speak the workers' pipe protocol (`gateway.worker` messages) but serve nothing, so the
start, restart, give-up and stop rules run in seconds without Triton. The real workers are
tested in `tests/test_workers.py`."""
from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

import pytest

from gateway.config import GatewaySettings
from gateway.worker import (
    Applied,
    Apply,
    Changed,
    Readiness,
    Replicated,
    Serving,
    SharedChange,
    SharedLoad,
    SharedUnload,
    StartFailed,
    WorkerSpec,
)
from gateway.workers import (
    SupervisorPhase,
    WorkerProcess,
    WorkerStartError,
    WorkerState,
    WorkerSupervisor,
)
from lipsync.triton_supervisor import RestartPolicy
from tests.waiting import until

T = TypeVar("T")
FAST = RestartPolicy(max_restarts=2, backoff_initial_s=0.05, backoff_max_s=0.2, healthy_after_s=60.0)


CHANGES: tuple[SharedChange, ...] = (
    SharedLoad("/packages/extra", "extra"),
    SharedUnload("demo"),
    SharedLoad("/packages/other", "x"),
    SharedUnload("x"),
    SharedLoad("/packages/extra", "extra"),  # reloaded: once in the journal, at its new place
)
"""What the ``change`` stand-in makes on request, in order."""


def stand_in(spec: WorkerSpec, conn: Connection, behaviour: str) -> None:
    """A stand-in worker process: ``serve`` (until SIGTERM, then exit 0; every `Apply` is
    answered `Applied`), ``crash`` (serve, then exit 7 at once), ``start_failed`` (`StartFailed`,
    exit 3), ``ignore_term`` (serve, ignore SIGTERM), ``change`` (serve, share `CHANGES` one by
    one, each after the last was `Replicated`, then report ready)."""
    if behaviour == "start_failed":
        conn.send(StartFailed(f"worker {spec.index} could not start: port busy"))
        sys.exit(3)
    signal.signal(signal.SIGTERM, signal.SIG_IGN if behaviour == "ignore_term" else lambda *_: sys.exit(0))
    if behaviour != "change":
        conn.send(Readiness(True))
    conn.send(Serving(os.getpid()))
    if behaviour == "crash":
        sys.exit(7)
    if behaviour == "change":
        for request_id, change in enumerate(CHANGES, 1):
            conn.send(Changed(request_id, change))
            while not isinstance(reply := conn.recv(), Replicated):
                pass
            assert reply.request_id == request_id and not reply.failures, reply
        conn.send(Readiness(True))
    while True:
        if conn.poll(0.05) and isinstance(message := conn.recv(), Apply):
            conn.send(Applied(message.request_id, None))


class Launcher:
    """Starts `stand_in` processes; ``plan(slot index, launch number of that slot)`` says which
    behaviour (launch 1 is the first start)."""

    def __init__(self, plan: Callable[[int, int], str]) -> None:
        self.plan = plan
        self.launches: dict[int, int] = {}
        self.processes: list[Any] = []
        self.specs: list[WorkerSpec] = []

    def __call__(self, spec: WorkerSpec) -> tuple[WorkerProcess, Connection]:
        n = self.launches[spec.index] = self.launches.get(spec.index, 0) + 1
        self.specs.append(spec)
        ctx = multiprocessing.get_context("spawn")
        ours, theirs = ctx.Pipe()
        process = ctx.Process(target=stand_in, args=(spec, theirs, self.plan(spec.index, n)))
        process.start()
        theirs.close()
        self.processes.append(process)
        return process, ours

    def alive(self) -> list[int]:
        return [p.pid for p in self.processes if p.is_alive()]


def settings(workers: int = 2) -> GatewaySettings:
    values: dict[str, Any] = {"host": "127.0.0.1", "grpc_port": 0, "http_port": 0, "workers": workers}
    return GatewaySettings(**values)


def run(fn: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(fn())  # type: ignore[arg-type]


def test_workers_start_serve_share_the_ports_and_stop_gracefully() -> None:
    launcher = Launcher(lambda index, n: "serve")
    sup = WorkerSupervisor(settings(), launcher=launcher, policy=FAST)

    async def body() -> None:
        await sup.start()
        assert sup.phase is SupervisorPhase.RUNNING and sup.all_ready()
        assert len(set(sup.pids())) == 2 and sorted(sup.pids()) == sorted(launcher.alive())
        assert sup.grpc_port and sup.http_port and sup.grpc_port != sup.http_port
        assert Path(sup.metrics_dir).is_dir()
        # the reserved ports stay taken for programs without SO_REUSEPORT
        with socket.socket() as other, pytest.raises(OSError):
            other.bind(("127.0.0.1", sup.http_port))
        await sup.stop()

    run(body)
    assert sup.phase is SupervisorPhase.STOPPED
    assert [p.exitcode for p in launcher.processes] == [0, 0], "SIGTERM, then a clean exit"
    assert all(slot.state is WorkerState.STOPPED for slot in sup.slots)
    assert not Path(sup.metrics_dir).exists(), "the metrics folder is removed"
    with socket.socket() as other:
        other.bind(("127.0.0.1", sup.http_port))  # the port is free again


def test_a_killed_worker_is_restarted_on_the_same_slot() -> None:
    launcher = Launcher(lambda index, n: "serve")
    sup = WorkerSupervisor(settings(), launcher=launcher, policy=FAST)

    async def body() -> None:
        await sup.start()
        victim = sup.slots[0].pid
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        await until(lambda: sup.slots[0].restarts == 1 and sup.slots[0].state is WorkerState.SERVING,
                    "worker 1 restarted and serving", timeout_s=30)
        assert sup.slots[0].pid != victim and sup.slots[0].failures_in_a_row == 1
        assert sup.slots[1].restarts == 0, "the other worker was left alone"
        assert sup.all_ready()
        await sup.stop()

    run(body)
    assert launcher.launches == {1: 2, 2: 1}
    assert not launcher.alive()


def test_changes_on_request_reach_the_other_workers_and_a_restarted_one() -> None:
    """Loads and unloads one worker shares are applied by the others before it is answered, and
    a worker started later gets the journal: the last change of each avatar name, in order (an
    unloaded avatar stays unloaded, even one of the packages root)."""
    launcher = Launcher(lambda index, n: "change" if index == 1 else "serve")
    sup = WorkerSupervisor(settings(), launcher=launcher, policy=FAST)

    async def body() -> None:
        await sup.start()
        # every change Replicated: worker 2 applied each
        await until(lambda: sup.slots[0].ready, "worker 1 ready", timeout_s=30)
        victim = sup.slots[1].pid
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        await until(lambda: sup.slots[1].restarts == 1 and sup.slots[1].state is WorkerState.SERVING,
                    "worker 2 restarted and serving", timeout_s=30)
        await sup.stop()

    run(body)
    first, restarted = (spec for spec in launcher.specs if spec.index == 2)
    assert first.changes == ()
    extra = SharedLoad("/packages/extra", "extra")
    assert restarted.changes == (SharedUnload("demo"), SharedUnload("x"), extra)
    assert not launcher.alive()


def test_quick_failures_in_a_row_give_up_and_stop_every_worker(caplog: pytest.LogCaptureFixture) -> None:
    # both serve at first; worker 1 then crashes at once each time it is started again
    launcher = Launcher(lambda index, n: "crash" if index == 1 and n > 1 else "serve")
    sup = WorkerSupervisor(settings(), launcher=launcher, policy=FAST)

    async def body() -> str:
        await sup.start()
        pid = sup.slots[0].pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        message = await asyncio.wait_for(sup.wait_given_up(), 30)
        await sup.stop()
        return message

    message = run(body)
    assert sup.phase is SupervisorPhase.GIVEN_UP
    assert "worker 1 failed 3 times in a row (at most 2 restarts" in message
    assert "exited with status 7" in message
    assert launcher.launches[1] == 3, "the first start and two restarts"
    assert not launcher.alive(), "every worker was stopped"
    assert "restarting it in 0.1 s (quick failure 2 in a row; gives up at 3)" in caplog.text


def test_a_worker_that_fails_its_first_start_fails_the_start() -> None:
    launcher = Launcher(lambda index, n: "start_failed" if index == 2 else "serve")
    sup = WorkerSupervisor(settings(), launcher=launcher, policy=FAST)

    async def body() -> None:
        with pytest.raises(WorkerStartError, match="worker 2 could not start: port busy"):
            await sup.start()

    run(body)
    assert launcher.launches == {1: 1, 2: 1}, "no restart during the first start"
    assert not launcher.alive()


@pytest.mark.slow  # waits out the real stop timeout: ~3.5 s
def test_a_worker_that_ignores_sigterm_is_killed_after_the_stop_timeout() -> None:
    launcher = Launcher(lambda index, n: "ignore_term" if index == 1 else "serve")
    sup = WorkerSupervisor(settings(), launcher=launcher, policy=FAST, stop_timeout_s=3.0)

    async def body() -> float:
        await sup.start()
        t0 = time.monotonic()
        await sup.stop()
        return time.monotonic() - t0

    elapsed = run(body)
    assert [p.exitcode for p in launcher.processes] == [-signal.SIGKILL, 0], "the other stopped by itself"
    assert 3.0 <= elapsed < 15.0
    assert not launcher.alive()
