"""Reading an in-process gateway's Prometheus samples (its `gateway.metrics.GatewayMetrics`
registry, what ``/metrics`` exposes) in tests.

- `sample`: a sample's value, 0 when the registry has none (a labelled counter or gauge
  that was never touched reads as 0, as a scraper's ``rate``/``sum`` would take it);
- `sample_or_none`: the same, None when the registry has no such sample, for tests that
  assert a metric is absent.
"""
from __future__ import annotations

from gateway.server import GatewayServer


def sample_or_none(server: GatewayServer, name: str, **labels: str) -> float | None:
    """The value of the sample ``name{labels}`` of ``server``'s registry, None if it has none.

    Args:
        server: a started `GatewayServer` (its context exists).
        name: the sample name as exposed (``lipsync_gateway_requests_total``).
        labels: every label of the sample, by name.
    """
    assert server.ctx is not None, "the gateway is not started"
    return server.ctx.metrics.registry.get_sample_value(name, labels)


def sample(server: GatewayServer, name: str, **labels: str) -> float:
    """`sample_or_none`, 0.0 when the registry has no such sample."""
    return sample_or_none(server, name, **labels) or 0.0
