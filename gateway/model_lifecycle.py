"""`ModelLifecycle`: the state of one Triton endpoint and of the models the gateway keeps loaded.

Triton pushes nothing, so the lifecycle probes it (every ``probe_interval_s``, and at once after
a failed inference call) through a `gateway.triton_client.ControlClient`, keeps explicit states,
and publishes an immutable `LifecycleSnapshot` to its subscribers whenever the state changes
(the ``triton_ready`` gauge, the gateway's readiness behind ``/readyz`` and ``grpc.health.v1``).
The guarded inference facade (`gateway.inference.GuardedInference`) asks it before each call
(`admit`) and races the call against the outage signal it returns.

Server states (`ServerState`) and their transitions, all in the "transitions" section below::

    UNKNOWN --live-------------------------------------------> LIVE   (new outage signal)
    LIVE    --refused / error / "not live"-------------------> DOWN   (calls in flight aborted)
    LIVE    --probe deadline, 1st in a row-------------------> LIVE   (a busy server is slow)
    LIVE    --probe deadline, 2nd in a row-------------------> DOWN
    UNKNOWN, DOWN --deadline / refused / error---------------> DOWN
    DOWN    --live-------------------------------------------> LIVE

Entering DOWN also resets every model to UNKNOWN, cancels ``load_model`` calls in flight and
clears the load back-off (a restarted Triton in explicit model-control mode has nothing
loaded, and deserves a fresh try). New inference calls fail at once without touching the
network while the server is not LIVE.

Model phases (`ModelPhase`), probed only while the server is LIVE::

    UNKNOWN, UNAVAILABLE, READY --ready------------------------------> READY (config read once)
    UNKNOWN, UNAVAILABLE, READY --not ready, back-off over-----------> LOADING (load_model)
    LOADING --loaded and ready---------------------------------------> READY (back-off reset)
    LOADING --load failed (deadline included)------------------------> UNAVAILABLE(error, retry_at)
    any     --probe deadline---------------------------------------> unchanged, never a load_model
    UNAVAILABLE --not ready, before retry_at-------------------------> unchanged
    any     --not ready, ``load_models`` off-------------------------> UNAVAILABLE(error)

The back-off between failed loads of one model is 1 s doubling to 30 s (`load_retry_delay`);
registering a model again resets it. A probe deadline on a model never triggers a
``load_model``: on a busy server a slow answer is not a model gone, and loading a loaded model
would reload it.
"""
from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from gateway.errors import TritonDeadline, TritonUnavailable
from gateway.triton_client import ControlClient
from lipsync.subscribers import Subscribers

log = logging.getLogger(__name__)

LOAD_RETRY_BASE_S = 1.0
"""Wait after the first failed ``load_model`` of a model (s); doubles per failure."""
LOAD_RETRY_MAX_S = 30.0
"""Longest wait between ``load_model`` attempts of one model (s)."""
DEADLINES_FOR_OUTAGE = 2
"""Liveness probes past their deadline, in a row, that make a live server DOWN."""


def load_retry_delay(failures: int) -> float:
    """Wait (s) after ``failures`` >= 1 failed loads in a row: 1, 2, 4, ... capped at 30."""
    return min(LOAD_RETRY_MAX_S, LOAD_RETRY_BASE_S * 2.0 ** (failures - 1))


class ServerState(enum.Enum):
    """Liveness of the Triton server, as last probed."""

    UNKNOWN = "unknown"
    """Not probed yet."""
    LIVE = "live"
    """The server answers its liveness probe."""
    DOWN = "down"
    """Refused, failed, reported not live, or missed two probe deadlines in a row."""


class ModelPhase(enum.Enum):
    """Where one registered model stands in Triton."""

    UNKNOWN = "unknown"
    """Not probed since the server became live."""
    LOADING = "loading"
    """A ``load_model`` call is in flight."""
    READY = "ready"
    """Loaded and serving."""
    UNAVAILABLE = "unavailable"
    """Not ready; `ModelStatus.error` says why, `ModelStatus.retry_at` when loading is retried."""


@dataclass(frozen=True)
class ModelStatus:
    """One registered model.

    Attributes:
        model: Triton model name.
        required: counts for `LifecycleSnapshot.ready` (avatar UNets) or not (the audio encoder).
        phase: see `ModelPhase`.
        error: why it is UNAVAILABLE (Triton's message), else None.
        retry_at: clock time (s) from which the next ``load_model`` may start, or None.
        max_batch_size: the model config's ``max_batch_size`` once read (0: no batch axis),
            None while unknown.
    """

    model: str
    required: bool
    phase: ModelPhase = ModelPhase.UNKNOWN
    error: str | None = None
    retry_at: float | None = None
    max_batch_size: int | None = None


@dataclass(frozen=True)
class LifecycleSnapshot:
    """The endpoint's state at one moment; what subscribers receive.

    Attributes:
        url: the Triton endpoint ``host:port``.
        server: see `ServerState`.
        server_error: why the server is not LIVE, else None.
        models: every registered model by Triton model name.
    """

    url: str
    server: ServerState
    server_error: str | None
    models: Mapping[str, ModelStatus] = field(default_factory=dict)

    @property
    def live(self) -> bool:
        """The server is LIVE."""
        return self.server is ServerState.LIVE

    @property
    def ready(self) -> bool:
        """The server is LIVE and every required model READY."""
        return self.live and all(
            m.phase is ModelPhase.READY for m in self.models.values() if m.required
        )

    def model_ready(self, model: str) -> bool:
        """The server is LIVE and ``model`` is registered and READY."""
        status = self.models.get(model)
        return self.live and status is not None and status.phase is ModelPhase.READY

    def reason(self) -> str | None:
        """Why the endpoint is not `ready` (None when it is)."""
        if not self.live:
            return f"Triton at {self.url} is not ready ({self.server_error or 'not probed yet'})"
        for m in self.models.values():
            if m.required and m.phase is not ModelPhase.READY:
                return f"model {m.model!r} is not loaded in Triton ({m.error or m.phase.value})"
        return None


Subscriber = Callable[[LifecycleSnapshot], None]


class ModelLifecycle:
    """Explicit server and model states of one Triton endpoint (module doc).

    Args:
        control: the endpoint's control-plane client.
        probe_interval_s: period of the background probe (s).
        load_models: issue ``load_model`` for registered models that are not ready (Triton in
            explicit model-control mode); when False only their readiness is watched.
        clock: monotonic clock (s) for the load back-off; tests inject their own.

    Call `start` inside the running event loop and `close` at the end; tests may instead drive
    `probe_once` directly.
    """

    def __init__(
        self,
        control: ControlClient,
        *,
        probe_interval_s: float = 0.5,
        load_models: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.control = control
        self.url = control.url
        self.probe_interval_s = probe_interval_s
        self.load_models = load_models
        self._clock = clock
        self._server = ServerState.UNKNOWN
        self._server_error: str | None = None
        self._deadlines = 0  # liveness probes past their deadline, in a row
        self._models: dict[str, ModelStatus] = {}
        self._failures: dict[str, int] = {}  # failed load_model calls in a row, per model
        self._loading: dict[str, asyncio.Task[None]] = {}
        self._outage: asyncio.Future[str] | None = None  # resolved when LIVE is left
        self._subscribers = Subscribers[LifecycleSnapshot](f"Triton at {self.url}'s state", log)
        self._published: LifecycleSnapshot | None = None
        self._probe_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._monitor: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ reading the state
    def snapshot(self) -> LifecycleSnapshot:
        """The current state (an immutable copy)."""
        return LifecycleSnapshot(self.url, self._server, self._server_error, dict(self._models))

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Call ``subscriber(snapshot)`` after every change of state, on the event loop.

        Returns:
            A function that unsubscribes it.
        """
        return self._subscribers.subscribe(subscriber)

    def admit(self, model: str) -> asyncio.Future[str]:
        """Check that ``model`` may be called now; return the outage signal to race the call with.

        Models that are not registered are allowed while the server is LIVE (Triton answers
        for them).

        Returns:
            A future resolved with the reason when the server leaves LIVE.

        Raises:
            TritonUnavailable: the server is not LIVE, or ``model`` is registered and not READY.
        """
        if self._server is not ServerState.LIVE or self._outage is None:
            raise TritonUnavailable(
                f"Triton at {self.url} is not ready ({self._server_error or 'not probed yet'})"
            )
        status = self._models.get(model)
        if status is not None and status.phase is not ModelPhase.READY:
            raise TritonUnavailable(
                f"model {model!r} is not loaded in Triton ({status.error or status.phase.value})"
            )
        return self._outage

    def max_batch_size(self, model: str) -> int:
        """The model's ``max_batch_size`` once read (0 when unknown or unbatched)."""
        status = self._models.get(model)
        if status is None or status.max_batch_size is None:
            return 0
        return status.max_batch_size

    def wake(self) -> None:
        """Probe now rather than at the next tick (an inference call failed)."""
        self._wake.set()

    # ------------------------------------------------------------------ registration
    async def register(self, model: str, *, required: bool = True) -> LifecycleSnapshot:
        """Keep ``model`` loaded from now on; probe, and wait for its load if one starts.

        ``required`` models count for `LifecycleSnapshot.ready`; registering again makes a model
        required if either registration was, and retries a failed load at once. Never raises for
        Triton trouble: the background probe keeps trying.

        Returns:
            The state after this attempt.
        """
        status = self._models.get(model)
        if status is None:
            self._models[model] = ModelStatus(model, required)
        else:
            self._models[model] = replace(status, required=status.required or required, retry_at=None)
            self._failures.pop(model, None)
        await self.probe_once()
        await self.wait_loading(model)
        return self.snapshot()

    def unregister(self, model: str) -> None:
        """Stop keeping ``model`` loaded (it no longer counts for `LifecycleSnapshot.ready`)."""
        self._models.pop(model, None)
        self._failures.pop(model, None)
        self._publish()

    async def wait_loading(self, *models: str) -> None:
        """Wait for the ``load_model`` calls in flight (of ``models``, or all)."""
        tasks = [t for m, t in self._loading.items() if not models or m in models]
        if tasks:
            await asyncio.gather(*(asyncio.shield(t) for t in tasks), return_exceptions=True)

    # ------------------------------------------------------------------ running
    async def start(self) -> None:
        """Probe once (loading models), wait for the loads, then probe in the background."""
        await self.probe_once()
        await self.wait_loading()
        self._monitor = asyncio.create_task(self._monitor_loop(), name=f"triton-lifecycle-{self.url}")

    async def close(self) -> None:
        """Stop the background probe and cancel the loads in flight."""
        if self._monitor is not None:
            self._monitor.cancel()
            await asyncio.gather(self._monitor, return_exceptions=True)
            self._monitor = None
        self._cancel_loads()

    async def _monitor_loop(self) -> None:
        while True:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation that
            # arrives as the wake event is set, and `close` would then wait forever
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.probe_interval_s):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.probe_once()
            except Exception:  # the probe must survive anything
                log.exception("probing Triton at %s failed unexpectedly", self.url)

    async def probe_once(self) -> None:
        """One probe: the server's liveness, then (when LIVE) each model not being loaded."""
        async with self._probe_lock:
            try:
                live = await self.control.server_live()
            except TritonDeadline as exc:
                self._server_slow(exc.message)
            except TritonUnavailable as exc:
                self._server_down(exc.message)
            else:
                if live:
                    self._server_live()
                else:
                    self._server_down(f"Triton at {self.url} reports not live")
            if self._server is ServerState.LIVE:
                for model in list(self._models):
                    if model not in self._loading:
                        await self._probe_model(model)

    async def _probe_model(self, model: str) -> None:
        try:
            ready = await self.control.model_ready(model)
            error = None if ready else "Triton reports it not ready"
        except TritonDeadline:
            log.debug("slow readiness probe of %s on a busy Triton: state kept", model)
            return
        except TritonUnavailable as exc:
            ready, error = False, exc.message
        status = self._models.get(model)
        if status is None or self._server is not ServerState.LIVE:
            return  # unregistered, or the server went down, meanwhile
        if ready:
            await self._model_ready(model)
        elif not self.load_models:
            self._model_unavailable(model, error or "not ready", retry_at=None)
        elif status.retry_at is None or self._clock() >= status.retry_at:
            self._model_loading(model)

    async def _load(self, model: str) -> None:
        t0 = time.perf_counter()
        try:
            await self.control.load_model(model)
            if not await self.control.model_ready(model):
                raise TritonUnavailable(f"load_model({model!r}) answered but the model is not ready")
        except TritonUnavailable as exc:
            if model in self._models:
                self._model_load_failed(model, exc.message)
        else:
            if model in self._models:
                log.info("Triton loaded model %s in %.0f ms", model, (time.perf_counter() - t0) * 1e3)
                await self._model_ready(model)
        finally:
            if self._loading.get(model) is asyncio.current_task():
                del self._loading[model]

    # ------------------------------------------------------------------ transitions
    def _server_live(self) -> None:
        self._deadlines = 0
        if self._server is not ServerState.LIVE:
            self._server, self._server_error = ServerState.LIVE, None
            self._outage = asyncio.get_running_loop().create_future()
        self._publish()

    def _server_slow(self, error: str) -> None:
        self._deadlines += 1
        if self._server is ServerState.LIVE and self._deadlines < DEADLINES_FOR_OUTAGE:
            log.debug("slow Triton liveness probe (%s): not an outage yet", error)
            return
        self._server_down(error)

    def _server_down(self, error: str) -> None:
        if self._outage is not None and not self._outage.done():
            self._outage.set_result(error)  # aborts the inference calls in flight
        self._server, self._server_error = ServerState.DOWN, error
        self._cancel_loads()
        self._failures.clear()
        self._models = {m: ModelStatus(m, s.required) for m, s in self._models.items()}
        self._publish()

    async def _model_ready(self, model: str) -> None:
        max_batch = self._models[model].max_batch_size
        if max_batch is None:
            try:
                max_batch = await self.control.max_batch_size(model)
            except TritonUnavailable as exc:
                log.warning(
                    "could not read the config of %s (read again at the next probe): %s", model, exc.message
                )
        status = self._models.get(model)
        if status is None or self._server is not ServerState.LIVE:
            return
        self._failures.pop(model, None)
        self._models[model] = replace(
            status, phase=ModelPhase.READY, error=None, retry_at=None, max_batch_size=max_batch
        )
        self._publish()

    def _model_loading(self, model: str) -> None:
        self._models[model] = replace(self._models[model], phase=ModelPhase.LOADING)
        self._loading[model] = asyncio.create_task(self._load(model), name=f"triton-load-{model}")
        self._publish()

    def _model_load_failed(self, model: str, error: str) -> None:
        failures = self._failures.get(model, 0) + 1
        self._failures[model] = failures
        delay = load_retry_delay(failures)
        log.log(logging.WARNING if failures == 1 else logging.DEBUG, "%s (retry in %.0f s)", error, delay)
        self._model_unavailable(model, error, retry_at=self._clock() + delay)

    def _model_unavailable(self, model: str, error: str, *, retry_at: float | None) -> None:
        self._models[model] = replace(
            self._models[model], phase=ModelPhase.UNAVAILABLE, error=error, retry_at=retry_at
        )
        self._publish()

    # ------------------------------------------------------------------ helpers
    def _cancel_loads(self) -> None:
        for task in self._loading.values():
            task.cancel()
        self._loading.clear()

    def _publish(self) -> None:
        """Tell the subscribers, if the state differs from the last one published."""
        snapshot = self.snapshot()
        previous, self._published = self._published, snapshot
        if snapshot == previous:
            return
        if snapshot.ready and (previous is None or not previous.ready):
            log.info("Triton at %s is ready (%d models)", self.url, len(snapshot.models))
        elif previous is not None and previous.ready and not snapshot.ready:
            lost = not snapshot.live or any(
                previous.model_ready(m) and not snapshot.model_ready(m) for m in snapshot.models
            )  # else: a model was added and is loading, which is no loss
            log.log(logging.WARNING if lost else logging.INFO, "Triton not ready: %s", snapshot.reason())
        self._subscribers.publish(snapshot)
