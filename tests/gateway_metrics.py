"""Reading the gateway's Prometheus samples in tests.

From an in-process gateway's registry (`gateway.metrics.GatewayMetrics`, what ``/metrics``
exposes):

- `sample`: a sample's value, 0 when the registry has none (a labelled counter or gauge
  that was never touched reads as 0, as a scraper's ``rate``/``sum`` would take it);
- `sample_or_none`: the same, None when the registry has no such sample, for tests that
  assert a metric is absent.

From a ``/metrics`` page (a gateway in another process, or one of several workers):

- `exposition_samples`: the text exposition as `Samples`; `scrape`: GET and parse it.
"""
from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from gateway.server import GatewayServer

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
"""Sample values by ``(sample name, its labels sorted by name)``:
``samples[("lipsync_gateway_requests_total", (("outcome", "ok"), ("protocol", "grpc")))]``."""


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


def exposition_samples(text: str) -> Samples:
    """Every sample of a Prometheus text exposition (a ``/metrics`` body), by name and labels.

    Raises:
        ValueError: ``text`` is not a valid exposition (`prometheus_client.parser`).
    """
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(http_url: str, timeout_s: float = 10.0) -> Samples:
    """`exposition_samples` of ``GET {http_url}/metrics``.

    Raises:
        urllib.error.URLError: the page could not be fetched (an HTTPError for a non-200).
    """
    with urllib.request.urlopen(f"{http_url}/metrics", timeout=timeout_s) as resp:
        return exposition_samples(resp.read().decode())
