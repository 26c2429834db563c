"""The per-client limit objects on their own (`gateway.limits`, `gateway.ws_limits`): peer
addresses, the per-peer cap shared by connections, the bounded work beside rendering, the
Origin rule and the gRPC server options. Their effect on a running gateway is tested in
tests/test_client_limits.py."""
from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.config import GatewaySettings
from gateway.errors import Overloaded
from gateway.limits import AuxiliaryWork, ClientLimiter, PeerLimiter, grpc_server_options, peer_address
from gateway.metrics import GatewayMetrics
from gateway.ws_limits import origin_allowed


def refusals(metrics: GatewayMetrics, limit: str) -> float | None:
    return metrics.registry.get_sample_value("lipsync_gateway_limit_refusals_total", {"limit": limit})


@pytest.mark.parametrize(
    ("peer", "address"),
    [
        ("ipv4:10.0.0.7:51234", "ipv4:10.0.0.7"),
        ("ipv6:[::1]:51234", "ipv6:[::1]"),
        ("ipv6:%5B::1%5D:51234", "ipv6:[::1]"),
        ("ipv6:%5Bfe80::1%5D:443", "ipv6:[fe80::1]"),
        ("unix:/run/gw.sock", "unix:/run/gw.sock"),
        ("10.0.0.7", "ipv4:10.0.0.7"),  # aiohttp's request.remote
        ("::1", "ipv6:[::1]"),
        ("", "unknown"),
    ],
)
def test_peer_address_drops_the_port_and_names_both_protocols_alike(peer: str, address: str) -> None:
    assert peer_address(peer) == address


def test_peer_limiter_caps_one_peer_across_connections() -> None:
    async def body() -> None:
        metrics = GatewayMetrics()
        peers = PeerLimiter(3, metrics)
        a1, a2 = (ClientLimiter(2, peers, "ipv4:1.1.1.1") for _ in range(2))
        b = ClientLimiter(2, peers, "ipv4:2.2.2.2")
        await a1.acquire(wait=False)
        await a1.acquire(wait=False)
        await a2.acquire(wait=False)  # the peer's 3rd slot on its 2nd connection
        with pytest.raises(Overloaded, match="your address already has 3 frames in flight"):
            await a2.acquire(wait=False)
        assert a2.in_flight == 1, "the connection's slot was given back when the peer's was refused"
        await b.acquire(wait=False)  # another peer is not affected
        assert peers.in_flight("ipv4:1.1.1.1") == 3 and peers.in_flight("ipv4:2.2.2.2") == 1
        waiting = asyncio.ensure_future(a2.acquire(wait=True))  # a stream waits instead
        await asyncio.sleep(0)
        assert not waiting.done()
        a1.release()
        await asyncio.wait_for(waiting, 1)
        for limiter in (a1, a2, a2, b):
            limiter.release()
        assert peers.peers() == 0, "no entry is kept for a peer with nothing in flight"
        assert refusals(metrics, "peer") == 1

    asyncio.run(body())


def test_a_waiter_that_is_cancelled_leaves_no_slot_behind() -> None:
    async def body() -> None:
        peers = PeerLimiter(1)
        holder = ClientLimiter(4, peers, "p")
        await holder.acquire()
        waiter = ClientLimiter(4, peers, "p")
        task = asyncio.ensure_future(waiter.acquire(wait=True))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert waiter.in_flight == 0 and peers.in_flight("p") == 1
        holder.release()
        assert peers.peers() == 0

    asyncio.run(body())


def test_auxiliary_work_refuses_past_its_cap() -> None:
    async def body() -> None:
        metrics = GatewayMetrics()
        aux = AuxiliaryWork.create(threads=1, limit=2, metrics=metrics)
        try:
            with (
                aux.slot("GetVideoFrame"),
                aux.slot("GetVideoFrame"),
                pytest.raises(Overloaded, match="GetVideoFrame: the gateway already runs 2 jobs"),
                aux.slot("GetVideoFrame"),
            ):
                pass
            assert aux.in_flight == 0
            assert await aux.run(sum, [1, 2, 3]) == 6
        finally:
            aux.close()
        assert refusals(metrics, "aux") == 1

    asyncio.run(body())


@pytest.mark.parametrize(
    ("origin", "host", "allowed", "ok"),
    [
        (None, "gw:8085", (), True),
        ("http://gw:8085", "gw:8085", (), True),
        ("https://gw", "gw", (), True),  # default port on both sides
        ("https://gw:443", "gw", (), True),
        ("http://GW:8085", "gw:8085", (), True),
        ("http://gw:8085", "gw:8086", (), False),
        ("http://evil.example", "gw:8085", (), False),
        ("http://evil.example", "gw:8085", ("http://evil.example",), True),
        ("http://evil.example", "gw:8085", ("*",), True),
        ("null", "gw:8085", (), False),
        ("file://", "gw:8085", (), False),
        ("http://[::1]:8085", "[::1]:8085", (), True),
        ("http://gw:99999", "gw:8085", (), False),  # unparsable port
    ],
)
def test_origin_rule(origin: str | None, host: str, allowed: tuple[str, ...], ok: bool) -> None:
    assert origin_allowed(origin, host, allowed) is ok


def settings(**values: Any) -> GatewaySettings:
    return GatewaySettings(**values)


def test_grpc_server_options_from_settings() -> None:
    options = dict(grpc_server_options(settings(
        grpc_max_streams_per_connection=7, grpc_keepalive_time_s=30, grpc_keepalive_timeout_s=5,
        grpc_max_connection_idle_s=60, grpc_max_connection_age_s=600,
    )))
    assert options == {
        "grpc.max_concurrent_streams": 7,
        "grpc.keepalive_time_ms": 30_000,
        "grpc.keepalive_timeout_ms": 5_000,
        "grpc.max_connection_idle_ms": 60_000,
        "grpc.max_connection_age_ms": 600_000,
        "grpc.max_connection_age_grace_ms": 2**31 - 1,  # unset: calls run until they end
    }
    assert dict(grpc_server_options(settings(grpc_max_connection_age_grace_s=30)))[
        "grpc.max_connection_age_grace_ms"] == 30_000


def test_allowed_origins_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIPSYNC_WS_ALLOWED_ORIGINS", "https://a.example, https://b.example/")
    assert settings().ws_allowed_origins == ["https://a.example", "https://b.example"]
