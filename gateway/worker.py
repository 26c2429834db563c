"""One gateway worker process of several (``--workers N``): its entry point, and its link to the
supervisor that started it (`gateway.workers`).

A worker is a whole gateway (`gateway.server.GatewayServer`: gRPC + aiohttp on one event loop,
its own Triton clients, avatars and thread pool) bound with ``SO_REUSEPORT`` to the ports every
worker shares, so the kernel spreads new connections over the workers. What it shares with the
others goes through the supervisor, over one `multiprocessing` pipe, as the messages below:

- to the supervisor: `Serving` once its ports are bound (or `StartFailed`), `Readiness` at
  every change of the gateway's readiness, `Changed` after a ``LoadPackage`` or
  ``UnloadPackage`` it served (it waits for `Replicated` before answering, so every worker
  serves the same avatars once the call returns), `Applied` for each `Apply` it applied;
- from the supervisor: `Apply` (a change another worker made on request), `Replicated`,
  `SupervisorUpdate` (``lipsync up``: the Triton supervisor's status, for /readyz and /metrics,
  `RelayedSupervisorView`).

A worker applies another worker's load with ``replace`` (the worker that served the call
checked the replacement rule), and a started worker applies the supervisor's journal
(`WorkerSpec.changes`) after the packages root, before it binds the ports.

Its metrics go to files in the supervisor's ``PROMETHEUS_MULTIPROC_DIR`` (`gateway.metrics`),
which it sets before any metric exists. It stops gracefully on SIGTERM (the supervisor's stop:
in-flight requests get the grace period), and also when the pipe closes (the supervisor died);
SIGINT is ignored, so Ctrl-C in a terminal stops the workers once, through the supervisor.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from gateway.metrics import MULTIPROC_ENV
from lipsync.subscribers import Subscribers
from lipsync.triton_supervisor import StatusCallback, SupervisorStatus

if TYPE_CHECKING:
    from gateway.config import GatewaySettings
    from gateway.context import GatewayContext
    from gateway.store import AvatarStore

log = logging.getLogger(__name__)

START_FAILED_EXIT = 3
"""Exit status of a worker that could not start (its `StartFailed` says why)."""


# ------------------------------------------------------------------------------- messages
@dataclass(frozen=True)
class SharedLoad:
    """A package loaded on request: its resolved folder and the avatar name it serves under."""

    package_dir: str
    name: str


@dataclass(frozen=True)
class SharedUnload:
    """An avatar unloaded on request."""

    name: str


SharedChange: TypeAlias = SharedLoad | SharedUnload
"""A change of the served avatars made on request, which every worker makes."""


async def apply_change(store: AvatarStore, change: SharedChange) -> None:
    """Make ``change`` (another worker's) in this worker's ``store``, not shared again.

    Raises:
        gateway.errors.GatewayError: the store refused it (e.g. `UnknownAvatar`, `PackageRejected`).
    """
    if isinstance(change, SharedLoad):
        await store.load(change.package_dir, change.name, replace=True, share=False)
    else:
        await store.unload(change.name, share=False)


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker is started with.

    Attributes:
        index: its number, 1 .. N (for logs; a restarted worker keeps it).
        settings: the gateway settings, with the shared ports already chosen (never 0).
        grace_s: how long in-flight requests get when it stops (s).
        metrics_dir: the workers' ``PROMETHEUS_MULTIPROC_DIR``.
        changes: the journal of avatars loaded and unloaded on request so far, in order (a
            started worker applies it after the packages root).
        triton_status: the Triton supervisor's status under ``lipsync up``, else None.
    """

    index: int
    settings: GatewaySettings
    grace_s: float
    metrics_dir: str
    changes: tuple[SharedChange, ...] = ()
    triton_status: SupervisorStatus | None = None


@dataclass(frozen=True)
class Serving:
    """Worker -> supervisor: its ports are bound and it serves."""

    pid: int


@dataclass(frozen=True)
class StartFailed:
    """Worker -> supervisor: it could not start (then exits with `START_FAILED_EXIT`)."""

    message: str


@dataclass(frozen=True)
class Readiness:
    """Worker -> supervisor: the gateway's readiness changed."""

    ready: bool


@dataclass(frozen=True)
class Changed:
    """Worker -> supervisor: it loaded or unloaded an avatar on request; answer with
    `Replicated`."""

    request_id: int
    change: SharedChange


@dataclass(frozen=True)
class Replicated:
    """Supervisor -> worker: every other worker applied the `Changed` ``request_id``; the
    failures, one line each (none expected: they read the same files)."""

    request_id: int
    failures: tuple[str, ...]


@dataclass(frozen=True)
class Apply:
    """Supervisor -> worker: make this change (another worker did); answer `Applied`."""

    request_id: int
    change: SharedChange


@dataclass(frozen=True)
class Applied:
    """Worker -> supervisor: the `Apply` ``request_id`` was made (error: why not)."""

    request_id: int
    error: str | None


@dataclass(frozen=True)
class SupervisorUpdate:
    """Supervisor -> worker: the Triton supervisor's new status (``lipsync up``)."""

    status: SupervisorStatus


# ------------------------------------------------------------------------------- the link
class RelayedSupervisorView:
    """The Triton supervisor as a worker sees it (`lipsync.triton_supervisor.SupervisorView`):
    the last status the workers' supervisor relayed; callbacks run on the worker's loop."""

    def __init__(self, status: SupervisorStatus) -> None:
        self._status = status
        self._subscribers = Subscribers[SupervisorStatus]("the relayed Triton supervisor status", log)

    def status(self) -> SupervisorStatus:
        """The last status relayed."""
        return self._status

    def subscribe(self, callback: StatusCallback) -> Callable[[], None]:
        """Call ``callback(status)`` at every update; returns a function that unsubscribes."""
        return self._subscribers.subscribe(callback)

    def update(self, status: SupervisorStatus) -> None:
        """A new status arrived."""
        self._status = status
        self._subscribers.publish(status)


class SupervisorLink:
    """The worker's end of its pipe, read on the event loop (`loop.add_reader`).

    It is the store's `gateway.store.ChangeSharing` (`loaded`, `unloaded`); `Apply` messages
    wait in a queue until `apply_changes` starts applying them (after the worker's own start-up
    loads, so the order of changes is the supervisor's).

    Args:
        conn: the pipe.
        on_gone: called once when the supervisor's end closes.
        triton_status: the Triton supervisor's status at spawn (None: not ``lipsync up``).
        replicate_timeout_s: how long `loaded` waits for the other workers (s).
    """

    def __init__(
        self,
        conn: Connection,
        on_gone: Callable[[], None],
        triton_status: SupervisorStatus | None,
        replicate_timeout_s: float,
    ) -> None:
        self._conn = conn
        self._on_gone = on_gone
        self.supervisor_view = RelayedSupervisorView(triton_status) if triton_status is not None else None
        self._timeout_s = replicate_timeout_s
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Replicated]] = {}
        self._changes: asyncio.Queue[Apply] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._applier: asyncio.Task[None] | None = None
        self._loop.add_reader(conn.fileno(), self._readable)

    def send(self, message: object) -> None:
        """Send one message to the supervisor (dropped when it is gone)."""
        try:
            self._conn.send(message)
        except OSError:
            log.debug("the supervisor is gone; %r not sent", message)

    def _readable(self) -> None:
        try:
            while self._conn.poll():
                self._dispatch(self._conn.recv())
        except (EOFError, OSError):
            self._loop.remove_reader(self._conn.fileno())
            log.warning("the workers' supervisor is gone: stopping")
            self._on_gone()

    def _dispatch(self, message: object) -> None:
        if isinstance(message, SupervisorUpdate) and self.supervisor_view is not None:
            self.supervisor_view.update(message.status)
        elif isinstance(message, Apply):
            self._changes.put_nowait(message)
        elif isinstance(message, Replicated):
            future = self._waiting.pop(message.request_id, None)
            if future is not None and not future.done():
                future.set_result(message)
        else:
            log.warning("unexpected message from the supervisor: %r", message)

    async def loaded(self, package_dir: Path, name: str) -> None:
        """`gateway.store.ChangeSharing`: have the other workers load it; wait until they did."""
        await self._share(SharedLoad(str(package_dir), name))

    async def unloaded(self, name: str) -> None:
        """`gateway.store.ChangeSharing`: have the other workers unload it; wait until they did."""
        await self._share(SharedUnload(name))

    async def _share(self, change: SharedChange) -> None:
        """Send `Changed`; wait for `Replicated` (at most ``replicate_timeout_s``; a failure or
        the timeout is logged)."""
        request_id = next(self._ids)
        future: asyncio.Future[Replicated] = self._loop.create_future()
        self._waiting[request_id] = future
        self.send(Changed(request_id, change))
        try:
            done = await asyncio.wait_for(future, self._timeout_s)
        except TimeoutError:
            log.warning("%s: the other workers did not confirm it within %.0f s", change, self._timeout_s)
            return
        finally:
            self._waiting.pop(request_id, None)
        for failure in done.failures:
            log.warning("%s: %s", change, failure)

    def apply_changes(self, store: AvatarStore) -> None:
        """Start applying the `Apply` messages to ``store`` (in order, one at a time)."""
        self._applier = asyncio.ensure_future(self._apply(store))

    async def _apply(self, store: AvatarStore) -> None:
        from gateway.errors import GatewayError

        while True:
            message = await self._changes.get()
            error = None
            try:
                await apply_change(store, message.change)
            except GatewayError as exc:
                error = f"worker {os.getpid()}: {exc}"
                log.warning("shared %s failed: %s", message.change, exc)
            self.send(Applied(message.request_id, error))

    def close(self) -> None:
        """Stop reading and applying."""
        if self._applier is not None:
            self._applier.cancel()
        with contextlib.suppress(OSError, ValueError):
            self._loop.remove_reader(self._conn.fileno())


# ------------------------------------------------------------------------------- entry
def use_metrics_dir(folder: str) -> None:
    """Make this process's metric values live in files under ``folder`` (prometheus_client's
    multiprocess mode), whether or not prometheus_client was imported already."""
    os.environ[MULTIPROC_ENV] = folder
    values = sys.modules.get("prometheus_client.values")
    if values is not None:  # it chose its value class at import: choose again
        values.ValueClass = values.get_value_class()  # type: ignore[attr-defined]  # a module's attribute


def worker_main(spec: WorkerSpec, conn: Connection) -> None:
    """The worker process's target (`multiprocessing` spawn): serve until SIGTERM or until the
    supervisor is gone; exit status 0, or `START_FAILED_EXIT` when it could not start."""
    use_metrics_dir(spec.metrics_dir)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the supervisor, which stops us
    from lipsync.log import setup_logging

    setup_logging(prefix=f"worker {spec.index}: ")
    code = asyncio.run(_serve(spec, conn))
    conn.close()
    sys.exit(code)


async def _serve(spec: WorkerSpec, conn: Connection) -> int:
    from gateway.errors import GatewayError
    from gateway.server import GatewayServer

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    link = SupervisorLink(conn, stop.set, spec.triton_status, spec.settings.triton_load_timeout_s)

    async def apply_journal(ctx: GatewayContext) -> None:
        """Before the ports are bound: what the others loaded and unloaded on request before
        this worker started."""
        for change in spec.changes:
            try:
                await apply_change(ctx.store, change)
            except GatewayError as exc:
                log.warning("shared %s failed: %s", change, exc)

    server = GatewayServer(
        spec.settings, grace_s=spec.grace_s, supervisor=link.supervisor_view, reuse_port=True,
        before_serving=apply_journal,
    )
    try:
        try:
            await server.start()
        except (OSError, RuntimeError) as exc:  # grpc raises RuntimeError on a port it cannot bind
            link.send(StartFailed(f"worker {spec.index} could not start: {exc}"))
            return START_FAILED_EXIT
        assert server.ctx is not None
        server.ctx.store.share_changes(link)
        link.apply_changes(server.ctx.store)
        server.ctx.watch_ready(lambda ready: link.send(Readiness(ready)))
        link.send(Serving(os.getpid()))
        await stop.wait()
        log.info("stopping (grace %.1f s) ...", spec.grace_s)
        return 0
    finally:
        link.close()
        await server.stop()
