"""`EndpointPool`: every Triton endpoint of the gateway behind one `InferenceClient` (issue 12).

**Per-endpoint clients, not gRPC ``round_robin`` over ``dns:///``.** One channel balancing over
a name's addresses would hide which server a call went to: a call could land on a pod that
has not loaded the avatar's model (or is loading it), a failed call could not be sent to
*another* pod (gRPC retries transparently only requests that never left the client), there
would be no per-endpoint metrics, and the control calls (``load_model``) must reach *every*
pod while a balanced channel sends each to one. So the pool resolves names itself and keeps,
per endpoint (``address:port``), a `gateway.triton_client.TritonGrpcClient`, a
`gateway.model_lifecycle.ModelLifecycle` (server and model states, probing, loading) and a
`gateway.inference.GuardedInference`.

**Endpoints and DNS.** ``LIPSYNC_TRITON_URL`` lists targets (`gateway.triton_targets`): an IP
address is one endpoint; a host name is resolved at start, every ``dns_interval_s`` (10 s by
default), and at once when one of the pool's endpoints goes DOWN (at most once per
`DNS_MIN_GAP_S`; a docker-compose Triton recreated with a new address is found in about a
second). Each address of the answer is an endpoint. A new address joins: its lifecycle
registers every model of the pool, probes it and loads what is missing (explicit model
control), and it takes calls once its lifecycle admits them. An address missing from a later
answer leaves: no new call goes to it, its lifecycle stops, its channel closes once its calls
in flight have finished (at most ``drain_timeout_s``) and its metric series are removed. A
failed or empty answer changes nothing: Kubernetes answers NXDOMAIN for a headless Service while
no pod is ready (for instance while every pod loads a new model under ``--strict-readiness``),
and the known endpoints' lifecycles tell better whether they serve.

**Routing.** A call goes to an endpoint whose lifecycle admits the model (live, and the model
READY there: `ModelLifecycle.admit`), the one with the fewest calls in flight, ties taken in
turn (so a lone stream alternates). Nothing is measured beyond the in-flight count.

**Retry rule.** A call that fails with `gateway.errors.TritonEndpointDown` (connection refused
or lost, gRPC ``UNAVAILABLE``, or its endpoint went down during the call) is sent once more, to
another endpoint that admits the model (inference is idempotent: the same inputs give the same
frame). Never retried: a call that got an answer (a Triton error, a tensor of the wrong shape),
a call past its deadline (its time is spent), or a second failure. The failed endpoint's
lifecycle probes at once and stops admitting calls if it is down.

**Registration.** `register` goes to every endpoint (and to every endpoint that joins later),
so each Triton keeps every avatar's model loaded on its own.

**Readiness rule.** The pool's `snapshot` combines the endpoints': live when any endpoint is
live, and each model in the best phase it has on a live endpoint (READY over LOADING over
UNAVAILABLE over UNKNOWN). So the gateway is ready (`LifecycleSnapshot.ready`) when every
avatar's model is READY on at least one live endpoint: exactly when every avatar can be served.
Requiring one endpoint with every model would make the gateway unready (and Kubernetes take it
out of its Service) while every avatar could still be served, in a split where endpoint A
failed to load one model and B another; the lost redundancy shows per endpoint instead
(``/readyz``, ``lipsync_gateway_triton_endpoint_ready``).

**One endpoint** is the simple case: `snapshot` is that endpoint's own snapshot, a call that
no endpoint admits fails with that endpoint's own refusal, and a failed call has nowhere to be
retried: the pool behaves exactly as one `GuardedInference`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from numpy.typing import NDArray

from gateway.errors import TritonDeadline, TritonEndpointDown, TritonUnavailable
from gateway.inference import GuardedInference
from gateway.metrics import GatewayMetrics
from gateway.model_lifecycle import (
    LifecycleSnapshot,
    ModelLifecycle,
    ModelPhase,
    ModelStatus,
    ServerState,
    Subscriber,
)
from gateway.triton_client import InferenceClient, TritonClient
from gateway.triton_targets import Resolver, Target
from lipsync.subscribers import Subscribers

log = logging.getLogger(__name__)

R = TypeVar("R")

ClientFactory = Callable[[str], TritonClient]
"""``connect(url)`` -> the client of endpoint ``url`` (``host:port``)."""

DNS_MIN_GAP_S = 1.0
"""Shortest time between two resolutions (s), however often an endpoint goes down."""
DNS_RETRY_S = 2.0
"""Period of resolution (s) while a host name has never resolved."""
DNS_TIMEOUT_S = 5.0
"""Longest wait for one resolution (s); past it the answer counts as failed."""

_PHASE_RANK = {ModelPhase.UNKNOWN: 0, ModelPhase.UNAVAILABLE: 1, ModelPhase.LOADING: 2, ModelPhase.READY: 3}


def combine_states(
    url: str, states: Sequence[LifecycleSnapshot], models: Mapping[str, bool], no_endpoint: str
) -> LifecycleSnapshot:
    """The pool's state from its endpoints' (readiness rule in the module doc).

    Args:
        url: the pool's targets, for messages.
        states: each endpoint's snapshot.
        models: the registered models, by name: required or not.
        no_endpoint: why there is no endpoint, for the state of an empty pool.

    Returns:
        ``states[0]`` itself for one endpoint; else live when any endpoint is, each model in its
        best phase on a live endpoint (on any endpoint when none is live).
    """
    if len(states) == 1:
        return states[0]
    if not states:
        return LifecycleSnapshot(
            url,
            ServerState.UNKNOWN,
            f"no Triton endpoint: {no_endpoint}",
            {m: ModelStatus(m, required) for m, required in models.items()},
        )
    live = [s for s in states if s.live]
    if live:
        server, error = ServerState.LIVE, None
    else:
        server = (
            ServerState.DOWN if any(s.server is ServerState.DOWN for s in states) else ServerState.UNKNOWN
        )
        error = "; ".join(f"{s.url}: {s.server_error or 'not probed yet'}" for s in states)
    combined: dict[str, ModelStatus] = {}
    for model, required in models.items():
        found = [s.models[model] for s in (live or states) if model in s.models]
        combined[model] = (
            max(found, key=lambda m: _PHASE_RANK[m.phase]) if found else ModelStatus(model, required)
        )
    return LifecycleSnapshot(url, server, error, combined)


def error_kind(exc: TritonUnavailable) -> str:
    """The ``kind`` label of ``lipsync_gateway_triton_errors_total`` for a failed call:
    ``down`` (`TritonEndpointDown`, retried elsewhere), ``deadline`` or ``error``."""
    if isinstance(exc, TritonEndpointDown):
        return "down"
    return "deadline" if isinstance(exc, TritonDeadline) else "error"


@dataclass(frozen=True)
class EndpointStatus:
    """One endpoint as `EndpointPool.endpoints` reports it.

    Attributes:
        state: its lifecycle's snapshot (``state.url`` is the endpoint ``host:port``).
        in_flight: calls in flight on it.
    """

    state: LifecycleSnapshot
    in_flight: int


class Endpoint:
    """One Triton endpoint of the pool: its client, lifecycle, guarded inference, the calls in
    flight on it and its metric series.

    Args:
        url: the endpoint ``host:port``.
        client: its stateless client.
        lifecycle: its model lifecycle (on the same client).
        metrics: the gateway's series (labelled ``endpoint=url`` here).
    """

    def __init__(
        self, url: str, client: TritonClient, lifecycle: ModelLifecycle, metrics: GatewayMetrics
    ) -> None:
        self.url = url
        self.client = client
        self.lifecycle = lifecycle
        self.inference = GuardedInference(client, lifecycle)
        self.in_flight = 0
        self.starting: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._metrics = metrics
        self._calls = metrics.triton_calls.labels(endpoint=url)
        self._latency = metrics.triton_call_latency.labels(endpoint=url)
        self._in_flight = metrics.triton_endpoint_in_flight.labels(endpoint=url)
        self.retried = metrics.triton_retries.labels(endpoint=url)
        self.ready_gauge = metrics.triton_endpoint_ready.labels(endpoint=url)
        self.ready_gauge.set(0.0)

    def refusal(self, model: str) -> TritonUnavailable | None:
        """None when its lifecycle admits a call of ``model`` now, else the lifecycle's error
        (`ModelLifecycle.admit`)."""
        try:
            self.lifecycle.admit(model)
        except TritonUnavailable as exc:
            return exc
        return None

    async def call(self, request: Callable[[InferenceClient], Awaitable[R]]) -> R:
        """Run ``request`` on its `GuardedInference`, counted and timed.

        Raises:
            TritonUnavailable: as `GuardedInference` raises it.
        """
        self.in_flight += 1
        self._in_flight.inc()
        self._idle.clear()
        self._calls.inc()
        t0 = time.perf_counter()
        try:
            result = await request(self.inference)
        except TritonUnavailable as exc:
            self._metrics.triton_errors.labels(endpoint=self.url, kind=error_kind(exc)).inc()
            raise
        finally:
            self.in_flight -= 1
            self._in_flight.dec()
            if self.in_flight == 0:
                self._idle.set()
        self._latency.observe(time.perf_counter() - t0)
        return result

    async def start(self, models: Mapping[str, bool]) -> None:
        """Register ``models`` (name -> required) with its lifecycle (probing it and loading
        them), then start the lifecycle's background probe."""
        await asyncio.gather(*(self.lifecycle.register(m, required=r) for m, r in models.items()))
        await self.lifecycle.start()

    async def close(self, drain_timeout_s: float = 0.0) -> None:
        """Stop its start and lifecycle, let its calls in flight finish for up to
        ``drain_timeout_s`` (s), then close its channel (calls still in flight fail)."""
        if self.starting is not None and not self.starting.done():
            self.starting.cancel()
            await asyncio.gather(self.starting, return_exceptions=True)
        await self.lifecycle.close()
        try:
            if drain_timeout_s > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(drain_timeout_s):
                        await self._idle.wait()
        finally:
            await self.client.close()


class EndpointPool:
    """The gateway's Triton endpoints: an `InferenceClient` that routes and retries, and the
    registry of the models every endpoint keeps loaded (module doc).

    It offers the `ModelLifecycle` calls the rest of the gateway uses (`snapshot`, `subscribe`,
    `register`, `unregister`, `probe_once`, `wait_loading`), on every endpoint at once, with the
    combined state.

    Args:
        targets: the parsed ``LIPSYNC_TRITON_URL`` (`gateway.triton_targets.parse_targets`).
        connect: makes the client of one endpoint from its ``host:port``.
        metrics: the gateway's series (per-endpoint series are kept here).
        resolver: resolves host names (`gateway.triton_targets.system_resolver`); None: every
            target is one endpoint as written (an in-process client given by a test).
        dns_interval_s: period of resolving the host names again (s).
        drain_timeout_s: how long an endpoint that left DNS keeps its calls in flight (s).
        probe_interval_s, load_models: for each endpoint's `ModelLifecycle`.

    Call `start` inside the running event loop and `close` at the end.
    """

    def __init__(
        self,
        targets: Sequence[Target],
        connect: ClientFactory,
        metrics: GatewayMetrics,
        *,
        resolver: Resolver | None,
        dns_interval_s: float = 10.0,
        drain_timeout_s: float = 30.0,
        probe_interval_s: float = 0.5,
        load_models: bool = True,
    ) -> None:
        self.targets = tuple(targets)
        self.url = ",".join(str(t) for t in self.targets)
        self.dns_interval_s = dns_interval_s
        self.drain_timeout_s = drain_timeout_s
        self._connect = connect
        self._metrics = metrics
        self._resolver = resolver
        self._probe_interval_s = probe_interval_s
        self._load_models = load_models
        self._names = [t for t in self.targets if resolver is not None and not t.is_address]
        self._addresses: dict[Target, tuple[str, ...]] = {}  # last good answer per host name
        self._dns_errors: dict[Target, str] = {}
        self._endpoints: dict[str, Endpoint] = {}
        self._leaving: set[asyncio.Task[None]] = set()
        self._models: dict[str, bool] = {}  # registered models: required or not
        self._subscribers = Subscribers[LifecycleSnapshot]("the Triton endpoints' combined state", log)
        self._published: LifecycleSnapshot | None = None
        self._turn = 0
        self._wake = asyncio.Event()
        self._resolved_at = -DNS_MIN_GAP_S
        self._discovery: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ state
    def snapshot(self) -> LifecycleSnapshot:
        """The combined state (readiness rule in the module doc)."""
        return combine_states(
            self.url,
            [e.lifecycle.snapshot() for e in self._endpoints.values()],
            self._models,
            self._no_endpoint(),
        )

    def endpoints(self) -> list[EndpointStatus]:
        """Each endpoint's state and calls in flight, in the order they joined."""
        return [EndpointStatus(e.lifecycle.snapshot(), e.in_flight) for e in self._endpoints.values()]

    def clients(self) -> list[TritonClient]:
        """Each endpoint's client, in the order they joined."""
        return [e.client for e in self._endpoints.values()]

    def max_batch_size(self, model: str) -> int:
        """The smallest ``max_batch_size`` of ``model`` known on an endpoint (0 when none is
        known or the model has no batch axis): a request this long fits every endpoint."""
        sizes = [n for e in self._endpoints.values() if (n := e.lifecycle.max_batch_size(model)) > 0]
        return min(sizes, default=0)

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Call ``subscriber(snapshot)`` with the combined state after every change of it.

        Returns:
            A function that unsubscribes it.
        """
        return self._subscribers.subscribe(subscriber)

    # ------------------------------------------------------------------ InferenceClient
    async def infer_unet(
        self, model: str, crop: NDArray[np.uint8], window: NDArray[np.float32]
    ) -> NDArray[np.uint8]:
        """`InferenceClient.infer_unet` on one endpoint, retried once on another (module doc).

        Raises:
            TritonUnavailable: no endpoint admits ``model`` (with one endpoint: its refusal),
                or the call failed (and its retry, if any).
        """
        return await self._route(model, lambda client: client.infer_unet(model, crop, window))

    async def infer_audio_encoder(self, model: str, mel: NDArray[np.float32]) -> NDArray[np.float32]:
        """`InferenceClient.infer_audio_encoder`, routed and retried as `infer_unet`."""
        return await self._route(model, lambda client: client.infer_audio_encoder(model, mel))

    async def _route(self, model: str, request: Callable[[InferenceClient], Awaitable[R]]) -> R:
        first = self._choose(model, exclude=None)
        if first is None:
            raise self._refusal(model)
        try:
            return await first.call(request)
        except TritonEndpointDown as exc:
            second = self._choose(model, exclude=first)
            if second is None:
                raise
            first.retried.inc()
            log.debug("retrying a call of %s on %s: %s", model, second.url, exc.message)
            return await second.call(request)

    def _choose(self, model: str, exclude: Endpoint | None) -> Endpoint | None:
        """The endpoint admitting ``model`` with the fewest calls in flight (ties in turn)."""
        candidates = [e for e in self._endpoints.values() if e is not exclude and e.refusal(model) is None]
        if not candidates:
            return None
        start = self._turn % len(candidates)
        self._turn += 1
        return min(candidates[start:] + candidates[:start], key=lambda e: e.in_flight)

    def _refusal(self, model: str) -> TritonUnavailable:
        endpoints = list(self._endpoints.values())
        if len(endpoints) == 1 and (own := endpoints[0].refusal(model)) is not None:
            return own
        if not endpoints:
            return TritonUnavailable(f"no Triton endpoint: {self._no_endpoint()}")
        reasons = []
        for e in endpoints:
            state = e.lifecycle.snapshot()
            status = state.models.get(model)
            if not state.live:
                reasons.append(f"{e.url} not ready ({state.server_error or 'not probed yet'})")
            elif status is not None:
                reasons.append(f"{e.url} has not loaded it ({status.error or status.phase.value})")
        return TritonUnavailable(f"no Triton endpoint can serve model {model!r}: {'; '.join(reasons)}")

    # ------------------------------------------------------------------ models on every endpoint
    async def register(self, model: str, *, required: bool = True) -> LifecycleSnapshot:
        """`ModelLifecycle.register` on every endpoint (and on those that join later).

        Returns:
            The combined state after the attempts.
        """
        self._models[model] = self._models.get(model, False) or required
        endpoints = list(self._endpoints.values())
        await asyncio.gather(*(e.lifecycle.register(model, required=required) for e in endpoints))
        return self.snapshot()

    def unregister(self, model: str) -> None:
        """`ModelLifecycle.unregister` on every endpoint."""
        self._models.pop(model, None)
        for e in self._endpoints.values():
            e.lifecycle.unregister(model)
        self._publish()

    async def probe_once(self) -> None:
        """`ModelLifecycle.probe_once` on every endpoint."""
        await asyncio.gather(*(e.lifecycle.probe_once() for e in list(self._endpoints.values())))

    async def wait_loading(self, *models: str) -> None:
        """`ModelLifecycle.wait_loading` on every endpoint."""
        await asyncio.gather(*(e.lifecycle.wait_loading(*models) for e in list(self._endpoints.values())))

    # ------------------------------------------------------------------ endpoints
    async def start(self) -> None:
        """Resolve the targets, start every endpoint (probe, loads), then keep resolving host
        names in the background (when there are any)."""
        await self.refresh()
        if self._names:
            self._discovery = asyncio.create_task(self._discover(), name="triton-dns")

    async def refresh(self, *, wait: bool = True) -> None:
        """Resolve the host names now and apply the answer (module doc).

        Args:
            wait: wait until the endpoints that joined have probed and loaded their models.
        """
        self._resolved_at = asyncio.get_running_loop().time()
        await asyncio.gather(*(self._resolve(t) for t in self._names))
        urls: dict[str, None] = {}
        for t in self.targets:
            for url in self._addresses.get(t, ()) if t in self._names else (str(t),):
                urls[url] = None
        for url in [u for u in self._endpoints if u not in urls]:
            self._leave(url)
        joined = [self._join(url) for url in urls if url not in self._endpoints]
        self._publish()
        if wait and joined:
            await asyncio.gather(*joined, return_exceptions=True)

    async def _resolve(self, target: Target) -> None:
        assert self._resolver is not None
        try:
            async with asyncio.timeout(DNS_TIMEOUT_S):
                answer = await self._resolver(target.host, target.port)
            if not answer:
                raise OSError("the answer has no address")
        except (OSError, TimeoutError) as exc:
            error = str(exc) or type(exc).__name__
            if self._dns_errors.get(target) != error:
                log.warning(
                    "Triton target %s does not resolve (%s): endpoints kept as they are", target, error
                )
            self._dns_errors[target] = error
            return
        self._dns_errors.pop(target, None)
        urls = tuple(dict.fromkeys(target.endpoint(a) for a in answer))
        if urls != self._addresses.get(target):
            log.info("Triton target %s resolves to %s", target, ", ".join(urls))
        self._addresses[target] = urls

    def _no_endpoint(self) -> str:
        errors = [f"{t} does not resolve ({e})" for t, e in self._dns_errors.items()]
        return "; ".join(errors) if errors else f"{self.url} not resolved yet"

    def _join(self, url: str) -> asyncio.Task[None]:
        client = self._connect(url)
        lifecycle = ModelLifecycle(
            client, probe_interval_s=self._probe_interval_s, load_models=self._load_models
        )
        endpoint = Endpoint(url, client, lifecycle, self._metrics)
        self._endpoints[url] = endpoint
        lifecycle.subscribe(lambda state: self._endpoint_changed(endpoint, state))
        endpoint.starting = asyncio.create_task(
            endpoint.start(dict(self._models)), name=f"triton-start-{url}"
        )
        log.info("Triton endpoint %s joined (%d endpoints)", url, len(self._endpoints))
        return endpoint.starting

    def _leave(self, url: str) -> None:
        endpoint = self._endpoints.pop(url)
        log.info(
            "Triton endpoint %s left (no longer in DNS; %d calls in flight finish there)",
            url,
            endpoint.in_flight,
        )
        task = asyncio.create_task(self._retire(endpoint), name=f"triton-leave-{url}")
        self._leaving.add(task)
        task.add_done_callback(self._leaving.discard)

    async def _retire(self, endpoint: Endpoint) -> None:
        try:
            await endpoint.close(self.drain_timeout_s)
        finally:
            if endpoint.url not in self._endpoints:  # not joined again meanwhile
                self._metrics.forget_endpoint(endpoint.url)

    def _endpoint_changed(self, endpoint: Endpoint, state: LifecycleSnapshot) -> None:
        if self._endpoints.get(endpoint.url) is not endpoint:
            return  # it left
        endpoint.ready_gauge.set(1.0 if state.ready else 0.0)
        if state.server is ServerState.DOWN:
            self._wake.set()  # its address may have changed
        self._publish()

    async def _discover(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            resolved = all(t in self._addresses for t in self._names)
            period = self.dns_interval_s if resolved else min(self.dns_interval_s, DNS_RETRY_S)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(period):  # not wait_for (see ModelLifecycle._monitor_loop)
                    await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(max(0.0, self._resolved_at + DNS_MIN_GAP_S - loop.time()))
            try:
                await self.refresh(wait=False)
            except Exception:  # the discovery must survive anything
                log.exception("resolving the Triton targets failed unexpectedly")

    def _publish(self) -> None:
        snapshot = self.snapshot()
        if snapshot == self._published:
            return
        self._published = snapshot
        self._subscribers.publish(snapshot)

    async def close(self) -> None:
        """Stop resolving, close every endpoint (calls in flight fail) and those leaving."""
        if self._discovery is not None:
            self._discovery.cancel()
            await asyncio.gather(self._discovery, return_exceptions=True)
            self._discovery = None
        endpoints = list(self._endpoints.values())
        self._endpoints.clear()
        for endpoint in endpoints:
            await endpoint.close()
        for task in list(self._leaving):
            task.cancel()
        await asyncio.gather(*self._leaving, return_exceptions=True)
