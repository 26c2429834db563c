"""Prometheus metrics of one gateway, in a dedicated `CollectorRegistry`.

Each `GatewayMetrics` owns its registry (not the process-global one), so several gateways can
live in one process (tests) and `/metrics` shows exactly this gateway's series (the
``/metrics`` handler of `gateway.http_app` serves `GatewayMetrics.render`).

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
  frame being sent (slots that carry audio), kind as above.

Outcomes are counted by `gateway.pipeline.FramePipeline`, once per request.
"""
from __future__ import annotations

import contextlib

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_LATENCY_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0,
)
"""Histogram bucket bounds (s): fine below the 40 ms frame slot, coarse for CPU inference."""

_LIVE_LATENCY_BUCKETS_S = (0.1, 0.2, 0.3, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)
"""Audio-to-frame bounds (s): a speaking slot cannot go out before its 412.5 ms of lookahead."""

STAGES = ("prepare", "inference", "paste", "jpeg", "composite", "total")
TRITON_ERROR_KINDS = ("down", "deadline", "error")
"""Values of the ``kind`` label of ``triton_errors_total`` (module doc)."""


class GatewayMetrics:
    """The gateway's Prometheus series, registered in ``self.registry``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
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
        )
        self.triton_ready = Gauge(
            "lipsync_gateway_triton_ready",
            "1 when Triton is ready with every avatar model loaded, else 0",
            registry=self.registry,
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
        )
        self.triton_endpoint_in_flight = Gauge(
            "lipsync_gateway_triton_endpoint_in_flight",
            "Calls in flight on each Triton endpoint",
            ["endpoint"],
            registry=self.registry,
        )
        self.ws_connections = Gauge(
            "lipsync_gateway_ws_connections", "Open WebSocket connections", registry=self.registry
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
            registry=self.registry,
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
        address is not reused, so its series would only accumulate)."""
        for metric in (
            self.triton_calls, self.triton_retries, self.triton_call_latency,
            self.triton_endpoint_ready, self.triton_endpoint_in_flight,
        ):
            with contextlib.suppress(KeyError):
                metric.remove(endpoint)
        for kind in TRITON_ERROR_KINDS:
            with contextlib.suppress(KeyError):
                self.triton_errors.remove(endpoint, kind)

    def endpoint_totals(self, endpoint: str) -> dict[str, int | float]:
        """``calls``, ``errors`` (all kinds), ``retries`` and ``avg_call_ms`` (successful calls,
        ms, 2 decimals) of one Triton endpoint, read back from its series (for ``/api/stats``)."""
        value = self.registry.get_sample_value
        label = {"endpoint": endpoint}
        ok = value("lipsync_gateway_triton_call_seconds_count", label) or 0.0
        seconds = value("lipsync_gateway_triton_call_seconds_sum", label) or 0.0
        errors = (
            value("lipsync_gateway_triton_errors_total", {**label, "kind": k}) for k in TRITON_ERROR_KINDS
        )
        return {
            "calls": int(value("lipsync_gateway_triton_calls_total", label) or 0),
            "errors": int(sum(e or 0.0 for e in errors)),
            "retries": int(value("lipsync_gateway_triton_retries_total", label) or 0),
            "avg_call_ms": round(seconds / ok * 1e3, 2) if ok else 0.0,
        }

    def render(self) -> bytes:
        """The registry in Prometheus text exposition format."""
        return generate_latest(self.registry)
