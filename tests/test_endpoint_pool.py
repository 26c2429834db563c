"""`gateway.endpoint_pool.EndpointPool` over several in-process fakes (`tests.fake_triton`), one
per endpoint, with an injected resolver: routing only to endpoints where the model is ready,
one retry on another endpoint when an endpoint dies mid-call (never for an answer or a
deadline), rejoining after recovery, DNS changes adding and removing endpoints, the readiness
rule, per-endpoint metrics; and `gateway.triton_targets` (parsing, the system resolver).
No server, no sleeps beyond the DNS gap of one test; periodic probes are off (each test probes).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer
from numpy.typing import NDArray

from gateway import endpoint_pool
from gateway.context import GatewayContext
from gateway.endpoint_pool import EndpointPool, combine_states
from gateway.errors import TritonDeadline, TritonEndpointDown, TritonUnavailable
from gateway.frame_request import FrameRequest
from gateway.http_app import create_app
from gateway.inference import GuardedInference
from gateway.metrics import GatewayMetrics
from gateway.model_lifecycle import ModelLifecycle, ModelPhase, ServerState
from gateway.triton_targets import Target, parse_targets, system_resolver
from tests.fake_gateway import fake_settings
from tests.fake_triton import FakeTriton, fake_triton
from tests.waiting import until

T = TypeVar("T")
UNET = "lipsync_a"
OTHER = "lipsync_b"
ENCODER = "audio_encoder"
A, B, C = "10.0.0.1:8001", "10.0.0.2:8001", "10.0.0.3:8001"


def run(body: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(body())  # type: ignore[arg-type]


def unet_inputs(n: int = 1, seed: int = 0) -> tuple[NDArray[np.uint8], NDArray[np.float32]]:
    crop = np.random.default_rng(seed).integers(0, 256, (n, 320, 320, 3), dtype=np.uint8)
    return crop, np.zeros((n, 16, 512), np.float32)


class Fleet:
    """Fake Tritons by endpoint ``host:port``, a DNS table the test edits, and the pool on them.

    Args:
        urls: the fakes (any endpoint the DNS table may name needs one).
        url: ``LIPSYNC_TRITON_URL`` of the pool (default: every fake, as addresses).
        dns: host name -> addresses.
    """

    def __init__(
        self,
        *urls: str,
        url: str | None = None,
        dns: dict[str, list[str]] | None = None,
        models: tuple[str, ...] = (UNET, OTHER),
    ) -> None:
        self.fakes = {u: fake_triton(*models, loaded=(ENCODER,), url=u) for u in urls}
        self.dns = dns or {}
        self.metrics = GatewayMetrics()
        self.resolutions = 0
        self.pool = EndpointPool(
            parse_targets(url or ",".join(urls)),
            self.connect,
            self.metrics,
            resolver=self.resolve,
            dns_interval_s=3600.0,
            drain_timeout_s=5.0,
            probe_interval_s=3600.0,
        )

    def __getitem__(self, url: str) -> FakeTriton:
        return self.fakes[url]

    def connect(self, url: str) -> FakeTriton:
        return self.fakes[url]

    async def resolve(self, host: str, port: int) -> Sequence[str]:
        self.resolutions += 1
        if host not in self.dns:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self.dns[host]

    async def start(self, *models: str) -> EndpointPool:
        await self.pool.start()
        for model in models or (UNET,):
            await self.pool.register(model)
        await self.pool.register(ENCODER, required=False)
        return self.pool

    def infers(self) -> dict[str, int]:
        return {u: f.count("infer") for u, f in self.fakes.items()}

    def sample(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(f"lipsync_gateway_{name}", labels)


# ----------------------------------------------------------------------------- targets
def test_targets_parse_and_refuse_precisely() -> None:
    assert parse_targets(" triton:8001 , 10.0.0.5:8001,[fd00::5]:8002,triton:8001") == (
        Target("triton", 8001),
        Target("10.0.0.5", 8001),
        Target("fd00::5", 8002),
    )
    assert [t.is_address for t in parse_targets("triton:1,10.0.0.5:1,[::1]:1")] == [False, True, True]
    assert str(Target("fd00::5", 8002)) == "[fd00::5]:8002" and Target("h", 1).endpoint("::1") == "[::1]:1"
    for value, message in [
        ("", "no Triton target"),
        ("triton", "is not host:port"),
        ("triton:x", "port 'x' is not a number"),
        ("triton:0", "outside 1..65535"),
        ("dns:///triton:8001", "without a scheme"),
        ("fd00::5:8001", "IPv6 address in brackets"),
        (":8001", "is not host:port"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_targets(value)


def test_system_resolver_keeps_one_address_family() -> None:
    # localhost has 127.0.0.1 and often ::1: two endpoints would be one server twice
    assert run(lambda: system_resolver("localhost", 8001)) == ["127.0.0.1"]
    assert run(lambda: system_resolver("::1", 8001)) == ["::1"]
    with pytest.raises(OSError):
        run(lambda: system_resolver("no-such-host.invalid", 8001))


# ----------------------------------------------------------------------------- routing
def test_calls_go_only_where_the_model_is_ready_and_alternate() -> None:
    async def body() -> None:
        fleet = Fleet(A, B)
        fleet[B].models[UNET].load_error = "failed to load 'lipsync_a': no GPU"
        pool = await fleet.start(UNET, OTHER)
        assert [e.state.model_ready(UNET) for e in pool.endpoints()] == [True, False]
        crop, window = unet_inputs()
        for _ in range(4):
            np.testing.assert_array_equal(await pool.infer_unet(UNET, crop, window), crop)
        assert fleet.infers() == {A: 4, B: 0}
        # a model ready on both: a lone caller alternates
        for _ in range(4):
            await pool.infer_unet(OTHER, crop, window)
        assert fleet.infers() == {A: 6, B: 2}
        # concurrent calls go to the endpoint with fewer in flight
        for fake in fleet.fakes.values():
            fake.hold_inference = asyncio.Event()
        calls = [asyncio.create_task(pool.infer_unet(OTHER, crop, window)) for _ in range(6)]
        await until(lambda: sum(fleet.infers().values()) == 14, "six calls sent", timeout_s=5, step_s=0.001)
        assert fleet.infers() == {A: 9, B: 5} and [e.in_flight for e in pool.endpoints()] == [3, 3]
        assert fleet.sample("triton_endpoint_in_flight", endpoint=A) == 3.0
        for fake in fleet.fakes.values():
            assert fake.hold_inference is not None
            fake.hold_inference.set()
        await asyncio.gather(*calls)
        assert fleet.sample("triton_calls_total", endpoint=A) == 9.0
        assert fleet.sample("triton_calls_total", endpoint=B) == 5.0
        assert fleet.sample("triton_call_seconds_count", endpoint=B) == 5.0
        assert fleet.sample("triton_endpoint_ready", endpoint=A) == 1.0
        assert fleet.sample("triton_endpoint_ready", endpoint=B) == 0.0, "lipsync_a is not loaded there"
        await pool.close()

    run(body)


def test_coalesced_batches_fit_the_smallest_max_batch_size_of_the_endpoints() -> None:
    """`EndpointPool.max_batch_size` (what `gateway.batching.CoalescingInference` fills a request
    up to): the smallest an endpoint's config gave, so a batch fits whichever gets it."""

    async def body() -> None:
        fleet = Fleet(A, B)
        fleet[B].models[UNET].max_batch_size = 3
        assert fleet.pool.max_batch_size(UNET) == 0, "unknown before any endpoint answered"
        pool = await fleet.start(UNET)
        assert pool.max_batch_size(UNET) == 3 and pool.max_batch_size("lipsync_nobody") == 0
        assert pool.clients() == [fleet[A], fleet[B]]
        crop, window = unet_inputs()
        batch = await pool.infer_unet(UNET, np.repeat(crop, 3, axis=0), np.repeat(window, 3, axis=0))
        assert batch.shape[0] == 3
        await pool.close()

    run(body)


@pytest.mark.parametrize("how", ["connection lost", "outage signal"])
@pytest.mark.parametrize("kind", ["unet", "audio_encoder"])
def test_a_call_whose_endpoint_dies_is_retried_once_on_another(how: str, kind: str) -> None:
    async def body() -> None:
        fleet = Fleet(A, B)
        pool = await fleet.start()
        hold = fleet[A].hold_inference = asyncio.Event()  # A takes the first call and hangs on it
        crop, window = unet_inputs()
        mel = np.random.default_rng(0).standard_normal((3, 80, 16)).astype(np.float32)
        sent, expected = (
            (pool.infer_unet(UNET, crop, window), crop)
            if kind == "unet"
            else (pool.infer_audio_encoder(ENCODER, mel), mel.reshape(3, -1)[:, :512])
        )
        call: asyncio.Task[NDArray[Any]] = asyncio.create_task(sent)
        await until(lambda: fleet[A].count("infer") == 1, "the call reached A", timeout_s=5, step_s=0.001)
        fleet[A].mode = "refused"
        if how == "connection lost":  # A answers the call with UNAVAILABLE
            hold.set()
        else:  # A keeps hanging; its probe finds it down, which aborts the call
            await pool.probe_once()
        np.testing.assert_array_equal(await asyncio.wait_for(call, 5.0), expected)
        assert fleet.infers() == {A: 1, B: 1}
        assert fleet.sample("triton_retries_total", endpoint=A) == 1.0
        assert fleet.sample("triton_errors_total", endpoint=A, kind="down") == 1.0
        assert fleet.sample("triton_calls_total", endpoint=B) == 1.0
        hold.set()
        await pool.close()

    run(body)


def test_an_outage_after_a_call_answered_leaves_the_callers_task_alone() -> None:
    """The outage race runs in the caller's task (no task per call): once the call answered,
    Triton going down must not cancel that task later; a call during the outage is refused."""
    async def body() -> None:
        fleet = Fleet(A)
        pool = await fleet.start()
        crop, window = unet_inputs()

        async def caller() -> NDArray[Any]:
            out = await pool.infer_unet(UNET, crop, window)
            fleet[A].mode = "refused"
            await pool.probe_once()  # A's outage signal resolves now
            await asyncio.sleep(0.05)  # a cancellation would land here
            with pytest.raises(TritonUnavailable):
                await pool.infer_unet(UNET, crop, window)
            return out

        task = asyncio.create_task(caller())
        np.testing.assert_array_equal(await asyncio.wait_for(task, 5.0), crop)
        assert task.cancelling() == 0
        await pool.close()

    run(body)


def test_no_retry_for_an_answer_or_a_deadline_nor_a_second_time() -> None:
    async def body() -> None:
        fleet = Fleet(A, B)
        pool = await fleet.start()
        crop, window = unet_inputs()
        # A answers "unknown model" (unloaded behind the gateway's back): an answer, not retried
        fleet[A].loaded.discard(UNET)
        with pytest.raises(TritonUnavailable, match="NOT_FOUND") as info:
            await pool.infer_unet(UNET, crop, window)
        assert not isinstance(info.value, TritonEndpointDown) and fleet.infers() == {A: 1, B: 0}
        await pool.probe_once()  # A loads it again
        await pool.wait_loading()

        # a deadline: its time is spent
        def late(crop: Any, window: Any) -> Any:
            raise TritonDeadline(f"Triton inference on {UNET!r} failed: StatusCode.DEADLINE_EXCEEDED")

        fleet[B].models[UNET].fn = late
        probes = fleet[B].count("server_live")
        with pytest.raises(TritonDeadline):
            await pool.infer_unet(UNET, crop, window)
        assert fleet.infers() == {A: 1, B: 1}
        await until(lambda: fleet[B].count("server_live") > probes,
                    "the failed call woke B's probe", timeout_s=5, step_s=0.001)
        assert fleet.sample("triton_errors_total", endpoint=A, kind="error") == 1.0
        assert fleet.sample("triton_errors_total", endpoint=B, kind="deadline") == 1.0
        assert fleet.sample("triton_retries_total", endpoint=A) == 0.0

        # both die: one retry, then the error
        for fake in fleet.fakes.values():
            fake.mode = "refused"
        with pytest.raises(TritonEndpointDown, match="Socket closed"):
            await pool.infer_unet(UNET, crop, window)
        assert sum(fleet.infers().values()) == 4
        await pool.close()

    run(body)


def test_an_endpoint_that_comes_back_gets_its_models_and_rejoins() -> None:
    async def body() -> None:
        fleet = Fleet(A, B)
        pool = await fleet.start()
        fleet[A].mode = "refused"
        await pool.probe_once()
        assert [e.state.server for e in pool.endpoints()] == [ServerState.DOWN, ServerState.LIVE]
        assert pool.snapshot().ready, "B serves everything"
        crop, window = unet_inputs()
        for _ in range(3):
            await pool.infer_unet(UNET, crop, window)
        assert fleet.infers() == {A: 0, B: 3}, "no call sent to the dead endpoint"
        assert fleet.sample("triton_endpoint_ready", endpoint=A) == 0.0
        fleet[A].restart()  # nothing loaded
        await pool.probe_once()
        await pool.wait_loading()
        assert fleet[A].count("load_model", UNET) == 2 and fleet[A].count("load_model", ENCODER) == 1
        assert pool.endpoints()[0].state.ready and fleet.sample("triton_endpoint_ready", endpoint=A) == 1.0
        for _ in range(4):
            await pool.infer_unet(UNET, crop, window)
        assert fleet.infers()[A] == 2, "A serves again"
        await pool.close()

    run(body)


# ----------------------------------------------------------------------------- readiness
def test_ready_when_every_model_is_ready_on_some_live_endpoint() -> None:
    async def body() -> None:
        fleet = Fleet(A, B)
        fleet[A].models[OTHER].load_error = "bad ONNX"
        fleet[B].models[UNET].load_error = "bad ONNX"
        pool = await fleet.start(UNET, OTHER)
        assert [e.state.ready for e in pool.endpoints()] == [False, False]
        snap = pool.snapshot()
        assert snap.ready and snap.model_ready(UNET) and snap.model_ready(OTHER) and snap.url == f"{A},{B}"
        crop, window = unet_inputs()
        await pool.infer_unet(UNET, crop, window)
        await pool.infer_unet(OTHER, crop, window)
        assert fleet.infers() == {A: 1, B: 1}
        # B down: OTHER is nowhere, the reason names the best state of each model
        fleet[B].mode = "refused"
        await pool.probe_once()
        snap = pool.snapshot()
        assert snap.live and not snap.ready
        assert (
            snap.reason()
            == f"model {OTHER!r} is not loaded in Triton "
            f"(load_model({OTHER!r}) failed: StatusCode.INTERNAL: bad ONNX)"
        )
        with pytest.raises(
            TritonUnavailable,
            match=rf"no Triton endpoint can serve model '{OTHER}': {A} has not loaded it \(.*bad ONNX\); "
            rf"{B} not ready \(.*connection refused\)",
        ):
            await pool.infer_unet(OTHER, crop, window)
        fleet[A].mode = "refused"
        await pool.probe_once()
        snap = pool.snapshot()
        reason = snap.reason() or ""
        assert snap.server is ServerState.DOWN
        assert reason.startswith(f"Triton at {A},{B} is not ready ({A}: Triton at {A} unreachable")
        assert f"; {B}: Triton at {B} unreachable" in reason and reason.count("connection refused") == 2
        await pool.close()

    run(body)


def test_a_pool_of_one_is_its_endpoint() -> None:
    """State, refusals and failures as one `GuardedInference` on the same fake."""

    async def body() -> None:
        fleet = Fleet(A)
        pool = await fleet.start()
        assert pool.snapshot() == pool.endpoints()[0].state
        alone = ModelLifecycle(fleet[A])
        await alone.register(UNET)
        guarded = GuardedInference(fleet[A], alone)
        crop, window = unet_inputs()
        fleet[A].mode = "refused"
        for client in (pool, guarded):  # the failing call: no other endpoint to retry on
            with pytest.raises(TritonEndpointDown, match=r"Socket closed"):
                await client.infer_unet(UNET, crop, window)
        await pool.probe_once()
        await alone.probe_once()
        messages = []
        for client in (pool, guarded):
            with pytest.raises(TritonUnavailable) as info:
                await client.infer_unet(UNET, crop, window)
            messages.append(str(info.value))
        assert messages[0] == messages[1] and f"Triton at {A} is not ready" in messages[0]
        assert (
            pool.snapshot() == pool.endpoints()[0].state
            and pool.snapshot().reason() == alone.snapshot().reason()
        )
        await alone.close()
        await pool.close()

    run(body)


def test_combined_state_of_no_endpoint() -> None:
    snap = combine_states("triton:8001", [], {UNET: True, ENCODER: False}, "triton:8001 does not resolve (x)")
    assert snap.server is ServerState.UNKNOWN and not snap.ready
    assert snap.models[UNET].phase is ModelPhase.UNKNOWN and not snap.models[ENCODER].required
    assert (
        snap.reason()
        == "Triton at triton:8001 is not ready (no Triton endpoint: triton:8001 does not resolve (x))"
    )


# ----------------------------------------------------------------------------- DNS
def test_dns_changes_add_and_remove_endpoints() -> None:
    async def body() -> None:
        fleet = Fleet(A, B, C, url="triton:8001", dns={"triton": ["10.0.0.1"]})
        pool = await fleet.start()
        assert [e.state.url for e in pool.endpoints()] == [A] and pool.snapshot().ready
        # a second pod: it joins with every registered model loaded
        fleet.dns["triton"] = ["10.0.0.1", "10.0.0.2"]
        await pool.refresh()
        assert [e.state.url for e in pool.endpoints()] == [A, B]
        assert fleet[B].count("load_model", UNET) == 1 and pool.endpoints()[1].state.ready
        crop, window = unet_inputs()
        await pool.infer_unet(UNET, crop, window)
        await pool.infer_unet(UNET, crop, window)
        assert fleet.infers() == {A: 1, B: 1, C: 0}
        # A leaves DNS with a call in flight: the call finishes there, then A's channel closes
        hold = fleet[A].hold_inference = asyncio.Event()
        held = asyncio.create_task(pool.infer_unet(UNET, crop, window))
        await until(lambda: fleet[A].count("infer") == 2, "a call in flight on A", timeout_s=5, step_s=0.001)
        fleet.dns["triton"] = ["10.0.0.2", "10.0.0.3"]
        await pool.refresh()
        assert [e.state.url for e in pool.endpoints()] == [B, C]
        assert not fleet[A].closed
        hold.set()
        np.testing.assert_array_equal(await held, crop)
        await until(lambda: fleet[A].closed, "A's channel closed once drained", timeout_s=5, step_s=0.001)
        assert fleet.sample("triton_calls_total", endpoint=A) is None, "A's series removed"
        for _ in range(4):
            await pool.infer_unet(UNET, crop, window)
        assert fleet.infers() == {A: 2, B: 3, C: 2}
        # a failed or empty answer changes nothing
        del fleet.dns["triton"]
        await pool.refresh()
        fleet.dns["triton"] = []
        await pool.refresh()
        assert [e.state.url for e in pool.endpoints()] == [B, C] and pool.snapshot().ready
        await pool.close()
        assert fleet[B].closed and fleet[C].closed

    run(body)


def test_a_name_that_does_not_resolve_yet_joins_when_it_does() -> None:
    async def body() -> None:
        fleet = Fleet(A, url="triton:8001")
        pool = await fleet.start()
        assert pool.endpoints() == [] and not pool.snapshot().ready
        with pytest.raises(
            TritonUnavailable, match=r"no Triton endpoint: triton:8001 does not resolve \(.*not known\)"
        ):
            await pool.infer_unet(UNET, *unet_inputs())
        fleet.dns["triton"] = ["10.0.0.1"]
        await pool.refresh()
        assert pool.snapshot().ready, "the models registered before it joined are loaded on it"
        await pool.infer_unet(UNET, *unet_inputs())
        await pool.close()

    run(body)


def test_an_endpoint_going_down_makes_the_name_resolve_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A docker-compose Triton recreated with a new address: found without waiting for the
    periodic resolution (one hour here)."""
    monkeypatch.setattr(endpoint_pool, "DNS_MIN_GAP_S", 0.01)

    async def body() -> None:
        fleet = Fleet(A, B, url="triton:8001", dns={"triton": ["10.0.0.1"]})
        pool = await fleet.start()
        resolutions = fleet.resolutions
        fleet.dns["triton"] = ["10.0.0.2"]
        await asyncio.sleep(0.05)
        assert fleet.resolutions == resolutions, "no resolution without a reason"
        fleet[A].mode = "refused"
        await pool.probe_once()
        await until(lambda: [e.state.url for e in pool.endpoints()] == [B],
                    "B replaced A", timeout_s=5, step_s=0.001)
        await until(lambda: pool.snapshot().ready, "B loaded the models", timeout_s=5, step_s=0.001)
        await pool.close()

    run(body)


# ----------------------------------------------------------------------------- gateway
def test_readyz_stats_and_metrics_show_each_endpoint(make_package: Callable[..., Path]) -> None:
    root = make_package(name="synthetic").parent

    async def body() -> None:
        fleet = Fleet(A, B, models=("lipsync_synthetic",))
        settings = fake_settings(root, fleet[A], triton_url=f"{A},{B}")
        ctx = await GatewayContext.create(settings, connect=fleet.connect, resolver=None)
        try:
            async with TestClient(TestServer(create_app(ctx))) as http:

                async def get(path: str) -> tuple[int, Any]:
                    resp = await http.get(path)
                    return resp.status, await resp.json()

                status, ready = await get("/readyz")
                assert status == 200 and ready["triton"]["url"] == f"{A},{B}"
                assert [(e["url"], e["server"], e["ready"]) for e in ready["endpoints"]] == [
                    (A, "live", True),
                    (B, "live", True),
                ]
                assert ready["endpoints"][1]["model_states"] == {
                    "lipsync_synthetic": "ready",
                    ENCODER: "ready",
                }
                for frame_id in range(3):
                    await ctx.pipeline.render(FrameRequest("synthetic", frame_id), protocol="http")
                assert fleet.infers() == {A: 2, B: 1}

                fleet[B].mode = "refused"
                await ctx.lifecycle.probe_once()
                status, ready = await get("/readyz")
                assert status == 200 and ctx.ready(), "A serves every avatar"
                assert [(e["server"], e["ready"]) for e in ready["endpoints"]] == [
                    ("live", True),
                    ("down", False),
                ]
                assert "connection refused" in ready["endpoints"][1]["server_error"]
                _, stats = await get("/api/stats")
                assert [
                    (e["url"], e["calls"], e["errors"], e["retries"]) for e in stats["triton_endpoints"]
                ] == [
                    (A, 2, 0, 0),
                    (B, 1, 0, 0),
                ]
                assert stats["triton_endpoints"][0]["avg_call_ms"] > 0
                metrics = (await (await http.get("/metrics")).read()).decode()
                assert f'lipsync_gateway_triton_endpoint_ready{{endpoint="{B}"}} 0.0' in metrics
                assert f'lipsync_gateway_triton_endpoint_ready{{endpoint="{A}"}} 1.0' in metrics
                assert "lipsync_gateway_triton_ready 1.0" in metrics

                fleet[A].mode = "refused"
                await ctx.lifecycle.probe_once()
                status, ready = await get("/readyz")
                assert status == 503 and not ctx.ready()
                assert ready["reason"].startswith(f"Triton at {A},{B} is not ready ({A}: ")
        finally:
            await ctx.close()

    run(body)
