"""Prometheus metrics of one gateway, in a dedicated `CollectorRegistry`.

Each `GatewayMetrics` owns its registry (not the process-global one), so several gateways can
live in one process (tests) and `/metrics` shows exactly this gateway's series (the
``/metrics`` handler of `gateway.http_app` serves `GatewayMetrics.render`).

Several workers (``--workers N``, `gateway.workers`): the supervisor sets
``PROMETHEUS_MULTIPROC_DIR`` for its workers, so every value lives in a file there
(``prometheus_client`` multiprocess mode) and each worker's `render` and `snapshot` aggregate
all the workers' files (`MultiProcessCollector`): counters and histograms are summed, dead
workers' included; each gauge has the ``multiprocess_mode`` its meaning needs (``livesum`` for
what is open or in flight, ``livemin`` for readiness: 1 only when every live worker is ready;
``min`` / ``max`` for the per-avatar extremes). Series computed at scrape time from this
process's state (`add_collector`: the Triton supervisor's) are added to the output as they
are. ``GetStats`` and ``/api/stats`` read the per-avatar series below through `snapshot`, so
they answer for the whole gateway too.

Series (all names prefixed ``lipsync_gateway_``):

- ``requests_total{protocol, outcome}``: frames requested; protocol grpc|ws|http, outcome
  ok|error (a frame cancelled because its client went away is not counted);
- ``errors_total{protocol, code}``: failed frames by `gateway.errors` code;
- ``stage_latency_seconds{stage}``: histogram per stage: prepare | inference | paste | jpeg |
  composite (= paste + jpeg) | total;
- ``in_flight``: frames currently being rendered;
- ``triton_ready``: 1 when every avatar's model is ready on at least one live Triton endpoint,
  else 0 (set by a subscriber of `gateway.endpoint_pool.EndpointPool`);
- per Triton endpoint (label ``endpoint="host:port"``, from `gateway.endpoint_pool`; an
  endpoint's series are removed when it leaves the pool):
  ``triton_calls_total{endpoint}`` (calls sent, each possibly split into several requests),
  ``triton_errors_total{endpoint, kind}`` (failed calls; kind = down: connection refused or
  lost, or the endpoint went down during the call, retried on another endpoint | deadline |
  error: any other failure, a bad answer included), ``triton_retries_total{endpoint}`` (calls
  that failed there as down and were sent to another endpoint), ``triton_call_seconds{endpoint}``
  (latency histogram of successful calls), ``triton_endpoint_ready{endpoint}`` (1 when live
  with every avatar's model ready), ``triton_endpoint_in_flight{endpoint}``;
- ``ws_connections``: open WebSocket connections;
- ``ws_messages_total{kind}``: WebSocket messages received, kind = binary | text | oversized
  (answered with an error) | too_big (over the transport cap: connection closed with 1009);
- ``malformed_requests_total{protocol, method}``: client input that did not decode, by
  protocol and the gRPC method, WebSocket path or HTTP route it was sent to
  (`gateway.malformed`);
- under ``lipsync up`` only: ``triton_restarts_total``, ``triton_supervisor_state`` and
  ``triton_last_exit_info``, added by `gateway.triton_supervision`;
- ``ws_refused_total{reason}``: WebSocket upgrades refused (`gateway.ws_limits`), reason =
  connections (``max_ws_connections`` open: 503) | origin (Origin not allowed: 403);
- ``ws_closed_slow_total{reason}``: WebSocket connections the gateway closed with 1013 because
  the client did not take its replies (`gateway.ws_limits.WsSender`), reason = send_buffer |
  send_timeout;
- ``limit_refusals_total{limit}``: requests refused ``overloaded`` by a per-client limit of
  `gateway.limits`, limit = peer | aux;
- ``live_sessions{transport}``: open live sessions (issue 10), transport grpc | ws;
- ``live_slots_total{transport, kind}``: live frames sent, kind = speaking | idle | late (a
  speaking slot sent idle because its audio encoding or render failed or missed its deadline);
  their speaking renders also count in ``requests_total{protocol="live"}``;
- ``live_first_frame_seconds``: from a session's accepted ``start`` to its first frame sent;
- ``live_audio_to_frame_seconds{kind}``: from the arrival of a slot's own 40 ms of audio to its
  frame being sent (slots that carry audio), kind as above;
- per avatar (``GetStats``, ``/api/stats``): ``avatar_frames_total{avatar, outcome}`` (outcome
  ok | error; a failure after the avatar was found), ``avatar_inference_seconds_total{avatar}``
  (Triton time of its rendered frames), ``avatar_inference_min_seconds{avatar}`` and
  ``avatar_inference_max_seconds{avatar}`` (the extremes of one frame's Triton time).

Outcomes are counted by `gateway.pipeline.FramePipeline`, once per request.
"""
from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""Environment variable naming the folder of the workers' metric files (prometheus_client)."""

_LATENCY_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0,
)
"""Histogram bucket bounds (s): fine below the 40 ms frame slot, coarse for CPU inference."""

_LIVE_LATENCY_BUCKETS_S = (0.1, 0.2, 0.3, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)
"""Audio-to-frame bounds (s): a speaking slot cannot go out before its 412.5 ms of lookahead."""

STAGES = ("prepare", "inference", "paste", "jpeg", "composite", "total")
TRITON_ERROR_KINDS = ("down", "deadline", "error")
"""Values of the ``kind`` label of ``triton_errors_total`` (module doc)."""


Labels = tuple[tuple[str, str], ...]


class MetricsSnapshot:
    """The samples of a gateway's series at one instant (`GatewayMetrics.snapshot`)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._values: dict[tuple[str, Labels], float] = {}
        for family in registry.collect():
            for sample in family.samples:
                self._values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

    def value(self, name: str, **labels: str) -> float | None:
        """The sample ``name{labels}`` (all its labels given), None when absent."""
        return self._values.get((name, tuple(sorted(labels.items()))))


@dataclass(frozen=True)
class AvatarTotals:
    """One avatar's rendered-frame counters (``GetStats``, ``/api/stats``), for the whole gateway.

    Attributes:
        frames: frames rendered.
        errors: frames that failed after the avatar was found.
        inference_ms_sum: Triton time of the rendered frames (ms).
        inference_ms_min: the shortest (ms); 0 before the first frame.
        inference_ms_max: the longest (ms); 0 before the first frame.
    """

    frames: int = 0
    errors: int = 0
    inference_ms_sum: float = 0.0
    inference_ms_min: float = 0.0
    inference_ms_max: float = 0.0

    @property
    def avg_inference_ms(self) -> float:
        """Mean Triton time of a rendered frame (ms); 0 before the first frame."""
        return self.inference_ms_sum / self.frames if self.frames else 0.0


class AvatarSeries:
    """One avatar's series in this process (`GatewayMetrics.avatar`); thread-safe."""

    def __init__(self, metrics: GatewayMetrics, avatar: str) -> None:
        self._ok = metrics.avatar_frames.labels(avatar=avatar, outcome="ok")
        self._error = metrics.avatar_frames.labels(avatar=avatar, outcome="error")
        self._seconds = metrics.avatar_inference.labels(avatar=avatar)
        self._min_gauge = metrics.avatar_inference_min
        self._max_gauge = metrics.avatar_inference_max
        self._avatar = avatar
        self._lock = threading.Lock()
        self._min_s = float("inf")
        self._max_s = 0.0

    def record(self, inference_ms: float) -> None:
        """Count one rendered frame and its Triton time (ms)."""
        seconds = inference_ms / 1000.0
        self._ok.inc()
        self._seconds.inc(seconds)
        with self._lock:
            if seconds < self._min_s:  # a gauge's child is made at its first value
                self._min_s = seconds
                self._min_gauge.labels(avatar=self._avatar).set(seconds)
            if seconds > self._max_s:
                self._max_s = seconds
                self._max_gauge.labels(avatar=self._avatar).set(seconds)

    def record_error(self) -> None:
        """Count one frame that failed after the avatar was found."""
        self._error.inc()


def multiprocess_dir() -> str | None:
    """The workers' metric folder when this process is a worker (`MULTIPROC_ENV`), else None."""
    return os.environ.get(MULTIPROC_ENV) or None


class GatewayMetrics:
    """The gateway's Prometheus series, registered in ``self.registry``.

    Attributes:
        registry: this gateway's series (one process's values).
        scrape_registry: what `render` and `snapshot` read: ``registry`` itself, or in a worker
            the workers' files aggregated; `add_collector` adds to it.
        multiprocess: whether this process is one of several workers (module doc).
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        folder = multiprocess_dir()
        self.multiprocess = folder is not None
        if folder is None:
            self.scrape_registry = self.registry
        else:
            self.scrape_registry = CollectorRegistry()
            MultiProcessCollector(self.scrape_registry, path=folder)
        self.requests = Counter(
            "lipsync_gateway_requests",
            "Frames requested, by protocol and outcome",
            ["protocol", "outcome"],
            registry=self.registry,
        )
        self.errors = Counter(
            "lipsync_gateway_errors",
            "Failed frames, by protocol and error code",
            ["protocol", "code"],
            registry=self.registry,
        )
        self.stage_latency = Histogram(
            "lipsync_gateway_stage_latency_seconds",
            "Per-frame latency of each pipeline stage (s)",
            ["stage"],
            buckets=_LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "lipsync_gateway_in_flight",
            "Frames currently being rendered",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.triton_ready = Gauge(
            "lipsync_gateway_triton_ready",
            "1 when Triton is ready with every avatar model loaded, else 0",
            registry=self.registry,
            multiprocess_mode="livemin",
        )
        self.triton_calls = Counter(
            "lipsync_gateway_triton_calls",
            "Calls sent to each Triton endpoint",
            ["endpoint"],
            registry=self.registry,
        )
        self.triton_errors = Counter(
            "lipsync_gateway_triton_errors",
            "Failed calls per Triton endpoint, by kind (down | deadline | error)",
            ["endpoint", "kind"],
            registry=self.registry,
        )
        self.triton_retries = Counter(
            "lipsync_gateway_triton_retries",
            "Calls that failed on this endpoint as down and were retried on another",
            ["endpoint"],
            registry=self.registry,
        )
        self.triton_call_latency = Histogram(
            "lipsync_gateway_triton_call_seconds",
            "Latency of successful calls per Triton endpoint (s)",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.triton_endpoint_ready = Gauge(
            "lipsync_gateway_triton_endpoint_ready",
            "1 when the Triton endpoint is live with every avatar model ready, else 0",
            ["endpoint"],
            registry=self.registry,
            multiprocess_mode="livemin",
        )
        self.triton_endpoint_in_flight = Gauge(
            "lipsync_gateway_triton_endpoint_in_flight",
            "Calls in flight on each Triton endpoint",
            ["endpoint"],
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.ws_connections = Gauge(
            "lipsync_gateway_ws_connections",
            "Open WebSocket connections",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.ws_messages = Counter(
            "lipsync_gateway_ws_messages",
            "WebSocket messages received, by kind",
            ["kind"],
            registry=self.registry,
        )
        self.malformed_requests = Counter(
            "lipsync_gateway_malformed_requests",
            "Client input that did not decode, by protocol and method (gRPC method, WebSocket "
            "path or HTTP route)",
            ["protocol", "method"],
            registry=self.registry,
        )

        self.ws_refused = Counter(
            "lipsync_gateway_ws_refused",
            "WebSocket upgrades refused, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.ws_closed_slow = Counter(
            "lipsync_gateway_ws_closed_slow",
            "WebSocket connections closed (1013) because the client did not take its replies",
            ["reason"],
            registry=self.registry,
        )
        self.limit_refusals = Counter(
            "lipsync_gateway_limit_refusals",
            "Requests refused overloaded by a per-client limit",
            ["limit"],
            registry=self.registry,
        )
        self.live_sessions = Gauge(
            "lipsync_gateway_live_sessions", "Open live sessions, by transport", ["transport"],
            registry=self.registry, multiprocess_mode="livesum",
        )
        self.live_slots = Counter(
            "lipsync_gateway_live_slots",
            "Live-session frames sent, by transport and kind (speaking | idle | late)",
            ["transport", "kind"],
            registry=self.registry,
        )
        self.live_first_frame = Histogram(
            "lipsync_gateway_live_first_frame_seconds",
            "Live sessions: accepted start to first frame sent (s)",
            buckets=_LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.live_audio_to_frame = Histogram(
            "lipsync_gateway_live_audio_to_frame_seconds",
            "Live sessions: a slot's own audio arrived to its frame sent (s), by kind",
            ["kind"],
            buckets=_LIVE_LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        # labelled children bound once: a label lookup per frame costs more than the update
        self._stage_children = {stage: self.stage_latency.labels(stage=stage) for stage in STAGES}
        self._ok_children: dict[str, Counter] = {}

        self.avatar_frames = Counter(
            "lipsync_gateway_avatar_frames",
            "Frames of each avatar, by outcome (ok | error)",
            ["avatar", "outcome"],
            registry=self.registry,
        )
        self.avatar_inference = Counter(
            "lipsync_gateway_avatar_inference_seconds",
            "Triton time of each avatar's rendered frames (s)",
            ["avatar"],
            registry=self.registry,
        )
        self.avatar_inference_min = Gauge(
            "lipsync_gateway_avatar_inference_min_seconds",
            "Shortest Triton time of one of the avatar's frames (s)",
            ["avatar"],
            registry=self.registry,
            multiprocess_mode="min",
        )
        self.avatar_inference_max = Gauge(
            "lipsync_gateway_avatar_inference_max_seconds",
            "Longest Triton time of one of the avatar's frames (s)",
            ["avatar"],
            registry=self.registry,
            multiprocess_mode="max",
        )
        self._avatars: dict[str, AvatarSeries] = {}
        self._avatars_lock = threading.Lock()

    def add_collector(self, collector: Collector) -> None:
        """Add series computed at scrape time (`scrape_registry`)."""
        self.scrape_registry.register(collector)

    def avatar(self, name: str) -> AvatarSeries:
        """The series of avatar ``name`` (made at the first call)."""
        series = self._avatars.get(name)
        if series is None:
            with self._avatars_lock:
                series = self._avatars.setdefault(name, AvatarSeries(self, name))
        return series

    def snapshot(self) -> MetricsSnapshot:
        """Every sample now, for the whole gateway (all workers with ``--workers N``)."""
        return MetricsSnapshot(self.scrape_registry)

    def observe_stage(self, stage: str, ms: float) -> None:
        """Record one stage duration given in milliseconds."""
        child = self._stage_children.get(stage) or self.stage_latency.labels(stage=stage)
        child.observe(ms / 1000.0)

    def record_outcome(self, protocol: str, error_code: str | None) -> None:
        """Count one finished frame request; ``error_code`` None means success."""
        if error_code is None:
            ok = self._ok_children.get(protocol)
            if ok is None:
                ok = self._ok_children[protocol] = self.requests.labels(protocol=protocol, outcome="ok")
            ok.inc()
        else:
            self.requests.labels(protocol=protocol, outcome="error").inc()
            self.errors.labels(protocol=protocol, code=error_code).inc()

    def forget_endpoint(self, endpoint: str) -> None:
        """Remove every series of a Triton endpoint that left the pool (a Kubernetes pod's
        address is not reused, so its series would only accumulate). Not in a worker:
        prometheus_client cannot remove a series from the workers' files."""
        if self.multiprocess:
            return
        for metric in (
            self.triton_calls, self.triton_retries, self.triton_call_latency,
            self.triton_endpoint_ready, self.triton_endpoint_in_flight,
        ):
            with contextlib.suppress(KeyError):
                metric.remove(endpoint)
        for kind in TRITON_ERROR_KINDS:
            with contextlib.suppress(KeyError):
                self.triton_errors.remove(endpoint, kind)

    def endpoint_totals(self, endpoint: str, snapshot: MetricsSnapshot) -> dict[str, int | float]:
        """``calls``, ``errors`` (all kinds), ``retries`` and ``avg_call_ms`` (successful calls,
        ms, 2 decimals) of one Triton endpoint, read back from its series in ``snapshot`` (for
        ``/api/stats``)."""
        value = snapshot.value
        ok = value("lipsync_gateway_triton_call_seconds_count", endpoint=endpoint) or 0.0
        seconds = value("lipsync_gateway_triton_call_seconds_sum", endpoint=endpoint) or 0.0
        errors = (
            value("lipsync_gateway_triton_errors_total", endpoint=endpoint, kind=k)
            for k in TRITON_ERROR_KINDS
        )
        return {
            "calls": int(value("lipsync_gateway_triton_calls_total", endpoint=endpoint) or 0),
            "errors": int(sum(e or 0.0 for e in errors)),
            "retries": int(value("lipsync_gateway_triton_retries_total", endpoint=endpoint) or 0),
            "avg_call_ms": round(seconds / ok * 1e3, 2) if ok else 0.0,
        }

    @staticmethod
    def avatar_totals(name: str, snapshot: MetricsSnapshot) -> AvatarTotals:
        """Avatar ``name``'s counters read back from its series in ``snapshot``."""
        def value(series: str, **labels: str) -> float:
            return snapshot.value(f"lipsync_gateway_avatar_{series}", avatar=name, **labels) or 0.0

        return AvatarTotals(
            frames=int(value("frames_total", outcome="ok")),
            errors=int(value("frames_total", outcome="error")),
            inference_ms_sum=value("inference_seconds_total") * 1e3,
            inference_ms_min=value("inference_min_seconds") * 1e3,
            inference_ms_max=value("inference_max_seconds") * 1e3,
        )

    def render(self) -> bytes:
        """`scrape_registry` in Prometheus text exposition format."""
        return generate_latest(self.scrape_registry)
