"""Supervision of the local `tritonserver`: reap it when it exits, say how it ended, start it
again on the same ports with exponential back-off, give up after too many quick failures.

`TritonSupervisor` owns one `TritonServer` (`lipsync/triton_local.py`) and runs it from a
thread of its own, through these states (`SupervisorState`)::

    STOPPED --start()--> STARTING --ready--> RUNNING
    STARTING --start failed--> BACKING_OFF | GIVEN_UP
    RUNNING --process exited--> BACKING_OFF | GIVEN_UP
    BACKING_OFF --delay elapsed--> STARTING
    STARTING | RUNNING | BACKING_OFF --stop()--> STOPPING --> STOPPED

- A *quick failure* is a start that never became ready (early exit, not ready in time, busy
  port), or an exit less than `RestartPolicy.healthy_after_s` after it became ready. A run that
  lasted that long resets the count (and so the back-off) first.
- After failure n in a row it waits `RestartPolicy.backoff_s(n)` (1 s doubling to 30 s by
  default), then starts it again; failure `max_restarts + 1` in a row is final: GIVEN_UP, with
  a message that says what happened (`SupervisorStatus.message`, `TritonGaveUp`).
- Every exit is reaped at once (`Popen.poll` every `poll_interval_s`, so no zombie is left)
  and what is left of Triton's process group (its Python-backend stubs) is killed; the log
  says how it ended (exit status or signal) and ends with the last lines of Triton's log.
- `stop()` wakes a back-off wait at once and cancels a start within about a second (the
  readiness request in flight); then the process is stopped (SIGTERM, SIGKILL after 15 s).

Why a thread and not asyncio: `TritonServer` is synchronous (Popen, a blocking readiness
wait), and the supervisor must run before the gateway's event loop exists (`lipsync up` waits
for the first ready Triton before it starts the gateway) and after it is gone (stopping Triton
is the last thing `lipsync up` does). A thread of its own also keeps reaping and restarting
independent of a busy or stalled event loop, and signals stay with the main thread, where
`lipsync up` handles Ctrl-C. The gateway follows it through `SupervisorView` (a thread-safe
status snapshot plus change callbacks it can forward to its loop with
`loop.call_soon_threadsafe`); `serve_until_given_up` does that for `lipsync up`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import enum
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol, Self, TypeVar

from lipsync.subscribers import Subscribers
from lipsync.triton_local import TritonStartCancelled, TritonStartError, describe_exit

logger = logging.getLogger(__name__)

T = TypeVar("T")

class SupervisorState(enum.StrEnum):
    """Where the supervisor is (module docstring: the transitions)."""

    STARTING = "starting"
    """A start is in progress: the process is spawned, loading its models."""
    RUNNING = "running"
    """tritonserver is ready and watched."""
    BACKING_OFF = "backing_off"
    """It exited or failed to start; waiting before the next start."""
    GIVEN_UP = "given_up"
    """Final: too many quick failures in a row; no process is left."""
    STOPPING = "stopping"
    """Stop requested: stopping the process."""
    STOPPED = "stopped"
    """Not started yet, or stopped on request; no process is left."""


FINAL_STATES = frozenset({SupervisorState.GIVEN_UP, SupervisorState.STOPPED})
"""States the supervisor never leaves by itself (STOPPED until `start()`)."""


@dataclass(frozen=True)
class RestartPolicy:
    """When and how often the supervisor starts tritonserver again.

    Attributes:
        max_restarts: restarts allowed after quick failures in a row; failure
            `max_restarts + 1` in a row gives up (0 = never restart).
        backoff_initial_s: wait after the first failure in a row, s.
        backoff_max_s: the longest wait, s (the wait doubles up to it).
        healthy_after_s: a run that lasted this long after it became ready is healthy: the
            failure count and the back-off start again from the beginning, s.

    Raises:
        ValueError: a negative count, a wait <= 0, or backoff_max_s < backoff_initial_s.
    """

    max_restarts: int = 5
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 30.0
    healthy_after_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, not {self.max_restarts}")
        if self.backoff_initial_s <= 0 or self.healthy_after_s <= 0:
            raise ValueError("backoff_initial_s and healthy_after_s must be > 0")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError(
                f"backoff_max_s ({self.backoff_max_s}) must be >= backoff_initial_s "
                f"({self.backoff_initial_s})"
            )

    def failures_after(self, failures_in_a_row: int, ran_s: float | None) -> int:
        """Quick failures in a row once a run ends: the count so far plus this one, or 1 when
        the run was healthy (it served ``ran_s`` >= `healthy_after_s`; None: it never did)."""
        healthy = ran_s is not None and ran_s >= self.healthy_after_s
        return 1 if healthy else failures_in_a_row + 1

    def gives_up(self, failures_in_a_row: int) -> bool:
        """Whether failure `failures_in_a_row` in a row is past `max_restarts` (no restart)."""
        return failures_in_a_row > self.max_restarts

    def backoff_s(self, failures_in_a_row: int) -> float:
        """The wait after failure `failures_in_a_row` (>= 1) in a row, s:
        `min(backoff_initial_s * 2 ** (failures_in_a_row - 1), backoff_max_s)`."""
        exponent = min(max(failures_in_a_row - 1, 0), 62)  # no float overflow for huge counts
        return float(min(self.backoff_initial_s * 2.0**exponent, self.backoff_max_s))


@dataclass(frozen=True)
class TritonExit:
    """How one run (or start attempt) of tritonserver ended.

    Attributes:
        pid: its process id (None when the start failed before spawning it).
        returncode: `Popen.returncode` (< 0: killed by that signal), None when not spawned.
        reason: one line, e.g. "tritonserver (pid 12) was killed by SIGKILL after running
            12.3 s", or what `TritonServer.start` said ("tritonserver exited with status 1
            before it was ready").
        report: Triton's error lines and the last lines of its log (may be "").
        ran_s: time from ready to exit, s; None when it never became ready.
        at: when it was noticed, Unix time (s).
    """

    pid: int | None
    returncode: int | None
    reason: str
    report: str
    ran_s: float | None
    at: float


@dataclass(frozen=True)
class SupervisorStatus:
    """A snapshot of the supervisor, published after every change.

    Attributes:
        state: the current state.
        pid: tritonserver's process id while RUNNING, else None.
        restarts: starts after the first one (counted when a restart begins).
        failures_in_a_row: quick failures since the last healthy run (0 once a run has
            lasted `RestartPolicy.healthy_after_s`).
        last_exit: how the last run or start attempt ended, None before any.
        backoff_s: the wait in progress while BACKING_OFF, else None (s).
        next_start_at: when the next start begins while BACKING_OFF, Unix time (s), else None.
        message: one line for people ("tritonserver was killed by SIGKILL ...; restarting
            it in 2.0 s"); for GIVEN_UP the full reason it gave up.
        changed_at: when this state was entered, Unix time (s).
    """

    state: SupervisorState
    pid: int | None = None
    restarts: int = 0
    failures_in_a_row: int = 0
    last_exit: TritonExit | None = None
    backoff_s: float | None = None
    next_start_at: float | None = None
    message: str = "not started"
    changed_at: float = dataclasses.field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready summary (for /readyz): state, pid, restarts, failures_in_a_row,
        message, the last exit's reason and exit status, and the seconds until the next start
        while backing off."""
        last = self.last_exit
        return {
            "state": self.state.value,
            "pid": self.pid,
            "restarts": self.restarts,
            "failures_in_a_row": self.failures_in_a_row,
            "message": self.message,
            "last_exit": None if last is None else {"reason": last.reason, "returncode": last.returncode},
            "next_start_in_s": (
                None if self.next_start_at is None else max(0.0, self.next_start_at - time.time())
            ),
        }


StatusCallback = Callable[[SupervisorStatus], None]


class SupervisorView(Protocol):
    """What the gateway needs from a supervisor (`TritonSupervisor` provides it): a snapshot
    for /readyz, /metrics and the page, and a callback on every change."""

    def status(self) -> SupervisorStatus:
        """The current snapshot (thread-safe)."""
        ...

    def subscribe(self, callback: StatusCallback) -> Callable[[], None]:
        """Call `callback(status)` after every change, from the supervisor's thread; returns a
        function that unsubscribes."""
        ...


class SupervisedServer(Protocol):
    """The process the supervisor runs (`lipsync.triton_local.TritonServer` provides it)."""

    @property
    def pid(self) -> int | None:
        """Process id of the last process spawned, or None."""
        ...

    def check(self) -> list[str]:
        """Check what a start needs (install, models, ports); raises TritonStartError."""
        ...

    def start(self, timeout_s: float = ..., *, cancel: threading.Event | None = ...) -> None:
        """Spawn and wait until ready; raises TritonStartError / TritonStartCancelled."""
        ...

    def poll(self) -> int | None:
        """Reap it if it has exited and return its exit status, else None."""
        ...

    def stop(self, timeout_s: float = ...) -> None:
        """Stop it and what is left of its process group; a no-op when not running."""
        ...

    def failure_report(self) -> str:
        """Its error lines and the last lines of its log."""
        ...


class TritonGaveUp(TritonStartError):
    """The supervisor gave up on tritonserver after too many quick failures in a row; the
    message says how many, the limit and the last failure (Triton's own error lines and the
    tail of its log were logged as each failure happened)."""


class TritonSupervisor:
    """Runs a `SupervisedServer` (tritonserver) and restarts it when it exits (module docstring).

    Args:
        server: the server to supervise; it keeps its ports across restarts.
        policy: restart limits and back-off.
        start_timeout_s: how long one start may wait for readiness (models loading), s.
        poll_interval_s: how often the running process is polled (so reaped), s.

    Thread-safe. `start()` once, `stop()` any time (also after it gave up); a context manager.
    """

    def __init__(
        self,
        server: SupervisedServer,
        policy: RestartPolicy | None = None,
        *,
        start_timeout_s: float = 300.0,
        poll_interval_s: float = 0.1,
    ) -> None:
        self.server = server
        self.policy = policy if policy is not None else RestartPolicy()
        self.start_timeout_s = start_timeout_s
        self.poll_interval_s = poll_interval_s
        self._status = SupervisorStatus(SupervisorState.STOPPED)
        self._changed = threading.Condition()
        self._subscribers = Subscribers[SupervisorStatus]("Triton supervisor status", logger)
        self._stop_requested = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ status and callbacks
    def status(self) -> SupervisorStatus:
        """The current snapshot."""
        with self._changed:
            return self._status

    def subscribe(self, callback: StatusCallback) -> Callable[[], None]:
        """Call `callback(status)` after every change, from the supervisor's thread (so it
        must be quick and must not block; an exception it raises is logged and ignored).

        Returns:
            A function that unsubscribes `callback`.
        """
        return self._subscribers.subscribe(callback)

    def wait_for(
        self,
        predicate: Callable[[SupervisorStatus], bool],
        timeout_s: float | None = None,
        cancel: threading.Event | None = None,
    ) -> SupervisorStatus:
        """Block until `predicate(status)` holds, `timeout_s` passed or `cancel` is set; return
        the status then. Waits in short slices (0.5 s), so `cancel` set by a signal handler
        (`lipsync up`: Ctrl-C sets it rather than raising KeyboardInterrupt, which could leave
        this lock held, CPython issue bpo-29988, and the supervisor thread blocked on it) ends it."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._changed:
            while not predicate(self._status) and not (cancel is not None and cancel.is_set()):
                remaining = 0.5 if deadline is None else deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._changed.wait(min(remaining, 0.5))
            return self._status

    def wait_running(self, cancel: threading.Event | None = None) -> SupervisorStatus:
        """Block until tritonserver is ready (after as many restarts as the policy allows).

        Args:
            cancel: set to stop waiting (e.g. by a signal handler); then `TritonStartCancelled`.

        Raises:
            TritonGaveUp: the supervisor gave up first (the message says why).
            TritonStartCancelled: it was stopped, or `cancel` set, first.
        """
        status = self.wait_for(
            lambda s: s.state in (SupervisorState.RUNNING, SupervisorState.STOPPING, *FINAL_STATES),
            cancel=cancel,
        )
        if status.state is SupervisorState.GIVEN_UP:
            raise TritonGaveUp(status.message)
        if status.state is not SupervisorState.RUNNING:
            raise TritonStartCancelled("tritonserver was stopped before it was ready")
        return status

    def _publish(self, state: SupervisorState, message: str, **changes: Any) -> None:
        """Enter `state` (fields not in `changes` keep their values, except pid and the
        back-off, which belong to one state) and tell the subscribers."""
        changes.setdefault("pid", None)
        changes.setdefault("backoff_s", None)
        changes.setdefault("next_start_at", None)
        with self._changed:
            self._status = dataclasses.replace(
                self._status, state=state, message=message, changed_at=time.time(), **changes
            )
            status = self._status
            self._changed.notify_all()
        self._subscribers.publish(status)

    # ------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Check the server can start at all (`SupervisedServer.check`: install, models,
        ports), then start supervising it in a background thread; returns at once (STARTING).
        `wait_running()` waits for it to be ready.

        Raises:
            TritonStartError: the check failed (nothing is retried: fix and run again).
            RuntimeError: start() or stop() was called before.
        """
        if self._thread is not None or self._stop_requested.is_set():
            raise RuntimeError("TritonSupervisor.start() can be called once, before stop()")
        self.server.check()
        self._publish(SupervisorState.STARTING, "starting tritonserver")
        self._thread = threading.Thread(target=self._run, name="triton-supervisor", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 60.0) -> SupervisorStatus:
        """Stop supervising and stop tritonserver; returns the final status (STOPPED, or
        GIVEN_UP when it had given up). Prompt in every state: a back-off wait ends at once, a
        start is cancelled within about a second, then the process gets SIGTERM (SIGKILL to
        its process group after 15 s). Safe to call more than once, and before `start()`."""
        self._stop_requested.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
            if thread.is_alive():
                logger.error("the Triton supervisor did not stop within %.0f s", timeout_s)
        return self.status()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------- supervisor thread
    def _run(self) -> None:
        try:
            given_up = self._supervise()
        except Exception as exc:  # a bug here must not leave a process or a stale state
            logger.exception("the Triton supervisor failed")
            self._stop_server()
            self._publish(SupervisorState.GIVEN_UP, f"the Triton supervisor failed: {exc!r}")
            return
        if not given_up:
            self._stop_server()
            self._publish(SupervisorState.STOPPED, "tritonserver stopped")

    def _stop_server(self) -> None:
        self._publish(SupervisorState.STOPPING, "stopping tritonserver")
        self.server.stop()

    def _supervise(self) -> bool:
        """Start, watch, back off, start again ... Returns True when it gave up, False when a
        stop was requested."""
        failures = 0
        while True:
            ended = self._run_once()
            if ended is None:  # stop() was called
                return False
            failures = self.policy.failures_after(failures, ended.ran_s)
            if self.policy.gives_up(failures):
                self._publish(
                    SupervisorState.GIVEN_UP, self._give_up_message(failures, ended),
                    failures_in_a_row=failures, last_exit=ended,
                )
                return True
            delay = self.policy.backoff_s(failures)
            message = (
                f"{ended.reason}; restarting it in {delay:.1f} s (quick failure {failures} "
                f"in a row; gives up at {self.policy.max_restarts + 1})"
            )
            logger.warning("%s", message)
            self._publish(
                SupervisorState.BACKING_OFF, message, failures_in_a_row=failures,
                last_exit=ended, backoff_s=delay, next_start_at=time.time() + delay,
            )
            if self._stop_requested.wait(delay):
                return False
            restarts = self.status().restarts + 1
            logger.info("restarting tritonserver (restart %d)", restarts)
            self._publish(
                SupervisorState.STARTING, f"restarting tritonserver (restart {restarts})",
                restarts=restarts,
            )

    def _run_once(self) -> TritonExit | None:
        """One start and, once ready, the watch until it exits. Returns how it ended, or None
        when a stop was requested (the process is then left to `_stop_server`)."""
        try:
            self.server.start(self.start_timeout_s, cancel=self._stop_requested)
        except TritonStartCancelled:
            return None
        except TritonStartError as exc:
            if self._stop_requested.is_set():
                return None
            logger.error("%s", exc)
            code = self.server.poll()  # None when the start failed before spawning it
            return TritonExit(
                pid=self.server.pid if code is not None else None, returncode=code,
                reason=exc.summary.rstrip("."), report=exc.report, ran_s=None, at=time.time(),
            )
        pid = self.server.pid
        ready_at = time.monotonic()
        self._publish(SupervisorState.RUNNING, f"tritonserver ready (pid {pid})", pid=pid)
        healthy = False
        while not self._stop_requested.wait(self.poll_interval_s):
            code = self.server.poll()
            ran_s = time.monotonic() - ready_at
            if code is not None:
                ended = TritonExit(
                    pid=pid, returncode=code,
                    reason=f"tritonserver (pid {pid}) {describe_exit(code)} after running "
                    f"{ran_s:.1f} s",
                    report=self.server.failure_report(), ran_s=ran_s, at=time.time(),
                )
                logger.error("%s. %s", ended.reason, ended.report)
                return ended
            if not healthy and ran_s >= self.policy.healthy_after_s:
                healthy = True  # from now on an exit starts the back-off from the beginning
                if self.status().failures_in_a_row:
                    self._publish(
                        SupervisorState.RUNNING, f"tritonserver ready (pid {pid}), healthy",
                        pid=pid, failures_in_a_row=0,
                    )
        return None

    def _give_up_message(self, failures: int, ended: TritonExit) -> str:
        policy = self.policy
        return (
            f"gave up on tritonserver after {failures} quick failure{'s' * (failures != 1)} "
            f"in a row (at most "
            f"{policy.max_restarts} restarts; a quick failure is a start that never became "
            f"ready or an exit within {policy.healthy_after_s:.0f} s of being ready). The last: "
            f"{ended.reason}. Triton's own errors are in its log."
        )


async def serve_until_given_up(main: Coroutine[Any, Any, T], supervisor: SupervisorView) -> T:
    """Run `main` (e.g. the gateway's serve coroutine) on the running event loop until it
    returns, or until `supervisor` gives up on tritonserver; then `main` is cancelled (its
    `finally` blocks run: the gateway stops) and `TritonGaveUp` is raised.

    Returns:
        What `main` returned.

    Raises:
        TritonGaveUp: the supervisor gave up (its status message).
        Whatever `main` raised.
    """
    loop = asyncio.get_running_loop()
    gave_up = asyncio.Event()

    def on_status(status: SupervisorStatus) -> None:
        if status.state is SupervisorState.GIVEN_UP:
            with contextlib.suppress(RuntimeError):  # the loop may be closed already
                loop.call_soon_threadsafe(gave_up.set)

    unsubscribe = supervisor.subscribe(on_status)
    try:
        on_status(supervisor.status())  # it may have given up before we subscribed
        main_task = asyncio.ensure_future(main)
        watcher = asyncio.ensure_future(gave_up.wait())
        try:
            await asyncio.wait({main_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not main_task.done():
                main_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await main_task
        if gave_up.is_set():
            raise TritonGaveUp(supervisor.status().message)
        return main_task.result()
    finally:
        unsubscribe()


# --------------------------------------------------------------------------------------- CLI


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {value}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 s, not {text}")
    return value


def add_restart_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Add the restart-policy options (`--triton-max-restarts`, ...) to a CLI parser or group;
    `restart_policy_from_args` reads them back. argparse refuses a negative count or a time
    <= 0, naming the option."""
    default = RestartPolicy()
    parser.add_argument(
        "--triton-max-restarts", type=_count, default=default.max_restarts, metavar="N",
        help="restart a failing tritonserver at most N times in a row, then give up and exit "
        f"non-zero (a run of --triton-healthy-after-s resets the count; default {default.max_restarts})",
    )
    parser.add_argument(
        "--triton-restart-backoff-s", type=_seconds, default=default.backoff_initial_s,
        metavar="S", help="wait before the first restart, doubling at each failure in a row, s "
        f"(default {default.backoff_initial_s:g})",
    )
    parser.add_argument(
        "--triton-restart-backoff-max-s", type=_seconds, default=default.backoff_max_s,
        metavar="S", help=f"longest wait between restarts, s (default {default.backoff_max_s:g})",
    )
    parser.add_argument(
        "--triton-healthy-after-s", type=_seconds, default=default.healthy_after_s, metavar="S",
        help="a tritonserver that ran this long after it became ready was healthy: its next "
        f"exit restarts the back-off from the beginning, s (default {default.healthy_after_s:g})",
    )


def restart_policy_from_args(args: argparse.Namespace) -> RestartPolicy:
    """The `RestartPolicy` of the options `add_restart_options` added.

    Raises:
        ValueError: --triton-restart-backoff-max-s below --triton-restart-backoff-s.
    """
    if args.triton_restart_backoff_max_s < args.triton_restart_backoff_s:
        raise ValueError(
            f"--triton-restart-backoff-max-s ({args.triton_restart_backoff_max_s:g}) must be >= "
            f"--triton-restart-backoff-s ({args.triton_restart_backoff_s:g})"
        )
    return RestartPolicy(
        max_restarts=args.triton_max_restarts,
        backoff_initial_s=args.triton_restart_backoff_s,
        backoff_max_s=args.triton_restart_backoff_max_s,
        healthy_after_s=args.triton_healthy_after_s,
    )
