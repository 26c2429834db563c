"""Every transition of `gateway.model_lifecycle.ModelLifecycle`, and the guarded inference
facade (`gateway.inference.GuardedInference`) that relies on it, against the in-process
`tests.fake_triton.FakeTriton`: no server, no sleeps; each test drives `probe_once` itself and
injects the clock of the load back-off.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import numpy as np
import pytest
from numpy.typing import NDArray

from gateway.errors import TritonUnavailable
from gateway.inference import GuardedInference
from gateway.model_lifecycle import (
    LifecycleSnapshot,
    ModelLifecycle,
    ModelPhase,
    ServerState,
    load_retry_delay,
)
from tests.fake_triton import FakeModel, FakeTriton, Mode, fake_triton, identity_unet

T = TypeVar("T")
UNET = "lipsync_a"
ENCODER = "audio_encoder"


def run(body: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(body())


class Clock:
    """A monotonic clock the test moves by hand (s)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    """A subscriber keeping every snapshot it was given."""

    def __init__(self) -> None:
        self.snapshots: list[LifecycleSnapshot] = []

    def __call__(self, snapshot: LifecycleSnapshot) -> None:
        self.snapshots.append(snapshot)

    def phases(self, model: str) -> list[ModelPhase]:
        return [s.models[model].phase for s in self.snapshots if model in s.models]


def lifecycle(fake: FakeTriton, clock: Clock | None = None, **kwargs: Any) -> ModelLifecycle:
    return ModelLifecycle(fake, clock=clock or Clock(), **kwargs)


def unet_inputs(n: int = 1) -> tuple[NDArray[np.uint8], NDArray[np.float32]]:
    crop = np.random.default_rng(n).integers(0, 256, (n, 320, 320, 3), dtype=np.uint8)
    return crop, np.zeros((n, 16, 512), np.float32)


# ----------------------------------------------------------------------------- server states
def test_unknown_to_live_loads_the_registered_model_and_publishes_each_step() -> None:
    async def body() -> None:
        fake = fake_triton(UNET)
        lc = lifecycle(fake)
        rec = Recorder()
        lc.subscribe(rec)
        assert lc.snapshot().server is ServerState.UNKNOWN and not lc.snapshot().ready
        state = await lc.register(UNET)
        assert state.server is ServerState.LIVE and state.ready and state.model_ready(UNET)
        assert state.models[UNET].max_batch_size == 8 and lc.max_batch_size(UNET) == 8
        assert fake.count("load_model", UNET) == 1
        assert rec.phases(UNET) == [ModelPhase.UNKNOWN, ModelPhase.LOADING, ModelPhase.READY]
        # a probe that finds nothing new publishes nothing and loads nothing
        await lc.probe_once()
        assert len(rec.snapshots) == 3 and fake.count("load_model") == 1

    run(body)


@pytest.mark.parametrize(
    ("mode", "reason"),
    [("refused", "connection refused"), ("not_live", "reports not live")],
)
def test_live_to_down_at_once_aborts_calls_and_resets_models(mode: Mode, reason: str) -> None:
    async def body() -> None:
        fake = fake_triton(UNET)
        lc = lifecycle(fake)
        await lc.register(UNET)
        outage = lc.admit(UNET)
        fake.mode = mode
        await lc.probe_once()  # one probe is enough
        snap = lc.snapshot()
        assert snap.server is ServerState.DOWN and reason in (snap.server_error or "")
        assert snap.models[UNET].phase is ModelPhase.UNKNOWN and snap.models[UNET].max_batch_size is None
        assert outage.done() and reason in outage.result()
        with pytest.raises(TritonUnavailable, match=rf"Triton at {fake.url} is not ready \(.*{reason}"):
            lc.admit(UNET)
        assert snap.reason() is not None and "not ready" in (snap.reason() or "")

    run(body)


def test_one_probe_deadline_is_not_an_outage_two_in_a_row_are() -> None:
    async def body() -> None:
        fake = fake_triton(UNET)
        lc = lifecycle(fake)
        rec = Recorder()
        await lc.register(UNET)
        lc.subscribe(rec)
        outage = lc.admit(UNET)
        fake.mode = "hung"
        await lc.probe_once()
        assert lc.snapshot().server is ServerState.LIVE and lc.snapshot().model_ready(UNET)
        assert not outage.done() and rec.snapshots == []
        # an answer in between resets the count
        fake.mode = "live"
        await lc.probe_once()
        fake.mode = "hung"
        await lc.probe_once()
        assert lc.snapshot().server is ServerState.LIVE
        await lc.probe_once()  # second deadline in a row
        assert lc.snapshot().server is ServerState.DOWN and "DEADLINE_EXCEEDED" in (
            lc.snapshot().server_error or ""
        )
        assert outage.done()
        assert fake.count("load_model") == 1, "a slow server never gets a reload"

    run(body)


def test_a_probe_deadline_before_the_server_was_ever_live_is_down() -> None:
    async def body() -> None:
        fake = fake_triton(UNET)
        fake.mode = "hung"
        lc = lifecycle(fake)
        await lc.register(UNET)
        assert lc.snapshot().server is ServerState.DOWN
        assert fake.count("model_ready") == 0 and fake.count("load_model") == 0

    run(body)


def test_down_to_live_after_a_restart_reloads_the_models() -> None:
    async def body() -> None:
        fake = fake_triton(UNET)
        lc = lifecycle(fake)
        await lc.register(UNET)
        await lc.register(ENCODER, required=False)
        first = lc.admit(UNET)
        fake.mode = "refused"
        await lc.probe_once()
        fake.restart()  # back, with nothing loaded
        await lc.probe_once()
        await lc.wait_loading()
        snap = lc.snapshot()
        assert snap.ready and snap.model_ready(ENCODER)
        assert fake.count("load_model", UNET) == 2 and fake.count("load_model", ENCODER) == 2
        second = lc.admit(UNET)
        assert first.done() and not second.done(), "a new outage signal once live again"

    run(body)


def test_outage_while_loading_cancels_the_load_and_restart_loads_again() -> None:
    async def body() -> None:
        fake = fake_triton(UNET)
        fake.hold_loads = asyncio.Event()
        lc = lifecycle(fake)
        await lc.probe_once()
        register = asyncio.create_task(lc.register(UNET))
        while fake.count("load_model") == 0:
            await asyncio.sleep(0)
        assert lc.snapshot().models[UNET].phase is ModelPhase.LOADING
        with pytest.raises(TritonUnavailable, match=r"model 'lipsync_a' is not loaded in Triton \(loading\)"):
            lc.admit(UNET)
        fake.mode = "refused"
        await lc.probe_once()
        await asyncio.wait_for(register, 5.0)  # the held load was cancelled
        assert lc.snapshot().models[UNET].phase is ModelPhase.UNKNOWN
        fake.hold_loads.set()
        fake.restart()
        await lc.probe_once()
        await lc.wait_loading()
        assert lc.snapshot().model_ready(UNET) and fake.count("load_model") == 2

    run(body)


# ----------------------------------------------------------------------------- model phases
def test_slow_model_probe_keeps_the_phase_and_never_reloads() -> None:
    async def body() -> None:
        fake = fake_triton(UNET)
        lc = lifecycle(fake)
        await lc.register(UNET)
        fake.slow_model_probes = True
        for _ in range(3):
            await lc.probe_once()
        assert lc.snapshot().model_ready(UNET) and fake.count("load_model") == 1
        # nor for a model whose state is not known yet
        await lc.register("lipsync_b")
        assert lc.snapshot().models["lipsync_b"].phase is ModelPhase.UNKNOWN
        assert fake.count("load_model", "lipsync_b") == 0

    run(body)


def test_a_model_unloaded_behind_the_gateways_back_is_loaded_again() -> None:
    async def body() -> None:
        fake = fake_triton(UNET)
        lc = lifecycle(fake)
        await lc.register(UNET)
        fake.loaded.discard(UNET)
        await lc.probe_once()
        await lc.wait_loading()
        assert lc.snapshot().model_ready(UNET) and fake.count("load_model", UNET) == 2

    run(body)


def test_failed_loads_back_off_exponentially_to_30_s() -> None:
    async def body() -> None:
        fake = FakeTriton({UNET: FakeModel(identity_unet, load_error="failed to load 'lipsync_a': bad ONNX")})
        clock = Clock()
        lc = lifecycle(fake, clock)
        state = await lc.register(UNET)
        status = state.models[UNET]
        assert status.phase is ModelPhase.UNAVAILABLE and "bad ONNX" in (status.error or "")
        assert status.retry_at == clock.now + 1.0
        with pytest.raises(TritonUnavailable, match="bad ONNX"):
            lc.admit(UNET)
        delays = []
        for _ in range(7):
            retry_at = lc.snapshot().models[UNET].retry_at
            assert retry_at is not None
            clock.now = retry_at - 0.001
            await lc.probe_once()  # too early: no new load
            loads = fake.count("load_model")
            clock.now = retry_at
            await lc.probe_once()
            await lc.wait_loading()
            assert fake.count("load_model") == loads + 1
            new_retry = lc.snapshot().models[UNET].retry_at
            assert new_retry is not None
            delays.append(new_retry - clock.now)
        assert delays == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
        assert [load_retry_delay(k) for k in (1, 2, 5, 6, 60)] == [1.0, 2.0, 16.0, 30.0, 30.0]

    run(body)


def test_back_off_resets_when_triton_restarts_and_on_registering_again() -> None:
    async def body() -> None:
        fake = FakeTriton({UNET: FakeModel(identity_unet, load_error="no GPU")})
        clock = Clock()
        lc = lifecycle(fake, clock)
        await lc.register(UNET)
        for _ in range(3):  # four failures in all: the next wait is 8 s
            clock.now = lc.snapshot().models[UNET].retry_at or clock.now
            await lc.probe_once()
            await lc.wait_loading()
        assert lc.snapshot().models[UNET].retry_at == clock.now + 8.0
        # registering again retries at once, and the back-off starts over
        state = await lc.register(UNET)
        assert fake.count("load_model") == 5 and state.models[UNET].retry_at == clock.now + 1.0
        # a Triton restart too
        await lc.probe_once()
        await lc.wait_loading()
        clock.now += 2.0
        await lc.probe_once()
        await lc.wait_loading()
        assert lc.snapshot().models[UNET].retry_at == clock.now + 2.0
        fake.mode = "refused"
        await lc.probe_once()
        fake.restart()
        await lc.probe_once()
        await lc.wait_loading()
        assert lc.snapshot().models[UNET].retry_at == clock.now + 1.0

    run(body)


def test_load_answered_but_model_not_ready_is_a_failed_load(monkeypatch: pytest.MonkeyPatch) -> None:
    async def body() -> None:
        fake = fake_triton(UNET)
        real_load = fake.load_model

        async def load_without_effect(model: str) -> None:
            await real_load(model)
            fake.loaded.discard(model)

        monkeypatch.setattr(fake, "load_model", load_without_effect)
        state = await lifecycle(fake).register(UNET)
        status = state.models[UNET]
        assert status.phase is ModelPhase.UNAVAILABLE and "answered but the model is not ready" in (
            status.error or ""
        )

    run(body)


def test_without_model_control_models_are_only_watched() -> None:
    async def body() -> None:
        fake = fake_triton(UNET, ENCODER)
        lc = lifecycle(fake, load_models=False)
        state = await lc.register(UNET)
        assert state.models[UNET].phase is ModelPhase.UNAVAILABLE and state.models[UNET].retry_at is None
        assert fake.count("load_model") == 0
        fake.loaded.add(UNET)  # someone else loads it
        await lc.probe_once()
        assert lc.snapshot().model_ready(UNET)

    run(body)


def test_optional_models_do_not_count_for_ready_and_unregister_forgets() -> None:
    async def body() -> None:
        fake = fake_triton(UNET)
        lc = lifecycle(fake)
        await lc.register(UNET)
        state = await lc.register("missing_encoder", required=False)
        assert state.ready and not state.model_ready("missing_encoder")
        state = await lc.register("lipsync_missing")
        assert not state.ready and "lipsync_missing" in (state.reason() or "")
        lc.unregister("lipsync_missing")
        assert lc.snapshot().ready and "lipsync_missing" not in lc.snapshot().models

    run(body)


def test_max_batch_size_unreadable_is_read_again_later(monkeypatch: pytest.MonkeyPatch) -> None:
    async def body() -> None:
        fake = fake_triton(UNET)
        real = fake.max_batch_size
        answers = iter([TritonUnavailable("config of 'lipsync_a' unavailable"), None])

        async def flaky(model: str) -> int:
            error = next(answers)
            if error is not None:
                raise error
            return await real(model)

        monkeypatch.setattr(fake, "max_batch_size", flaky)
        lc = lifecycle(fake)
        state = await lc.register(UNET)
        assert state.model_ready(UNET) and state.models[UNET].max_batch_size is None
        assert lc.max_batch_size(UNET) == 0
        await lc.probe_once()
        assert lc.max_batch_size(UNET) == 8

    run(body)


# ----------------------------------------------------------------------------- guarded inference
def test_guarded_call_in_flight_is_aborted_promptly_on_outage() -> None:
    async def body() -> None:
        fake = fake_triton(UNET)
        lc = lifecycle(fake)
        await lc.register(UNET)
        inference = GuardedInference(fake, lc)
        fake.hold_inference = asyncio.Event()  # Triton hangs on the call
        call = asyncio.create_task(inference.infer_unet(UNET, *unet_inputs()))
        while fake.count("infer") == 0:
            await asyncio.sleep(0)
        assert not call.done()
        fake.mode = "refused"
        await lc.probe_once()
        with pytest.raises(
            TritonUnavailable, match=r"Triton went down while 'lipsync_a' was inferring: .*refused"
        ):
            await asyncio.wait_for(call, 1.0)

    run(body)


def test_new_calls_fail_at_once_without_touching_the_network() -> None:
    async def body() -> None:
        fake = fake_triton(UNET)
        lc = lifecycle(fake)
        inference = GuardedInference(fake, lc)
        with pytest.raises(TritonUnavailable, match=r"is not ready \(not probed yet\)"):
            await inference.infer_unet(UNET, *unet_inputs())
        await lc.register(UNET)
        fake.mode = "refused"
        await lc.probe_once()
        with pytest.raises(TritonUnavailable, match="not ready"):
            await inference.infer_unet(UNET, *unet_inputs())
        assert fake.count("infer") == 0

    run(body)


def test_guarded_call_returns_the_prediction_and_splits_to_max_batch_size() -> None:
    async def body() -> None:
        fake = fake_triton(UNET)
        fake.loaded.add(ENCODER)
        fake.models[ENCODER].max_batch_size = 4
        lc = lifecycle(fake)
        await lc.register(UNET)
        await lc.register(ENCODER, required=False)
        inference = GuardedInference(fake, lc)
        crop, window = unet_inputs(2)
        np.testing.assert_array_equal(await inference.infer_unet(UNET, crop, window), crop)
        mel = np.random.default_rng(0).standard_normal((10, 80, 16)).astype(np.float32)
        feats = await inference.infer_audio_encoder(ENCODER, mel)
        assert [len(x[0]) for m, x in fake.inputs if m == ENCODER] == [4, 4, 2]
        np.testing.assert_array_equal(feats, mel.reshape(10, -1)[:, :512])

    run(body)


def test_a_failed_call_makes_the_lifecycle_probe_at_once() -> None:
    async def body() -> None:
        fake = fake_triton(UNET)
        lc = lifecycle(fake, probe_interval_s=3600.0)  # the periodic probe never comes in time
        await lc.register(UNET)
        await lc.start()
        try:
            inference = GuardedInference(fake, lc)
            fake.mode = "refused"  # the call fails, then the probe finds Triton down
            with pytest.raises(TritonUnavailable, match="Socket closed"):
                await inference.infer_unet(UNET, *unet_inputs())
            for _ in range(1000):
                if lc.snapshot().server is ServerState.DOWN:
                    break
                await asyncio.sleep(0)
            assert lc.snapshot().server is ServerState.DOWN
        finally:
            await lc.close()

    run(body)


def test_a_failing_subscriber_does_not_stop_the_others() -> None:
    async def body() -> None:
        fake = fake_triton(UNET)
        lc = lifecycle(fake)
        rec = Recorder()

        def broken(snapshot: LifecycleSnapshot) -> None:
            raise RuntimeError("subscriber bug")

        lc.subscribe(broken)
        unsubscribe = lc.subscribe(rec)
        await lc.register(UNET)
        assert rec.snapshots and rec.snapshots[-1].ready
        unsubscribe()
        fake.mode = "refused"
        await lc.probe_once()
        assert rec.snapshots[-1].ready

    run(body)
