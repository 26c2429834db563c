"""What the gateway shows of `lipsync up`'s Triton supervisor (issue 15, gateway side): the real
`TritonSupervisor` on an in-process fake tritonserver (`tests.fake_supervised`), the real
gateway on the in-process fake Triton that goes down and comes back with it. Restarts are in
/metrics, /readyz says "model server restarting" (with the restart count and the last exit's
reason) while it restarts, and the WebSocket gets frames again on the same connection.

The real processes (`lipsync up`, SIGKILL of its tritonserver) are tests/test_up_recovery.py.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from gateway.server import GatewayServer
from gateway.ws_protocol import ErrorReply, FrameReply, decode_reply, encode_request
from lipsync.triton_supervisor import RestartPolicy, SupervisorState, TritonSupervisor
from tests.fake_gateway import fake_settings
from tests.fake_supervised import FakeServer, TritonFollows
from tests.fake_triton import FakeTriton, fake_triton
from tests.gateway_metrics import sample_or_none
from tests.waiting import until

AVATAR = "synthetic"
S = SupervisorState


async def readyz(session: aiohttp.ClientSession, server: GatewayServer) -> tuple[int, Any]:
    async with session.get(f"{server.http_url}/readyz") as resp:
        return resp.status, await resp.json()


@dataclass
class Supervised:
    """A gateway on the fake Triton, under `lipsync up`'s supervisor of a fake tritonserver."""

    gateway: GatewayServer
    supervisor: TritonSupervisor
    follows: TritonFollows
    fake: FakeTriton


@asynccontextmanager
async def supervised_gateway(root: Path, policy: RestartPolicy) -> AsyncIterator[Supervised]:
    """As `lipsync up` does it: the supervisor starts tritonserver, then the gateway starts with
    the supervisor; both stopped at the end."""
    fake = fake_triton(f"lipsync_{AVATAR}", loaded=("audio_encoder",))
    process = FakeServer("run", "run")
    supervisor = TritonSupervisor(process, policy, poll_interval_s=0.01)
    follows = TritonFollows(supervisor, process, fake, asyncio.get_running_loop())
    supervisor.start()
    supervisor.wait_running()
    gateway = GatewayServer(
        fake_settings(root, fake, triton_poll_interval_s=0.05), grace_s=0.5, triton_client=fake,
        supervisor=supervisor,
    )
    await gateway.start()
    try:
        yield Supervised(gateway, supervisor, follows, fake)
    finally:
        await gateway.stop()
        supervisor.stop()


def test_restarts_in_metrics_and_readyz_and_frames_again(make_package: Callable[..., Path]) -> None:
    root = make_package(name=AVATAR).parent

    async def body() -> None:
        async with supervised_gateway(root, RestartPolicy(backoff_initial_s=0.5, max_restarts=3)) as up:
            gateway, supervisor, follows = up.gateway, up.supervisor, up.follows
            async with aiohttp.ClientSession() as session, session.ws_connect(f"{gateway.http_url}/ws") as ws:

                async def frame(i: int) -> FrameReply | ErrorReply:
                    await ws.send_bytes(encode_request(AVATAR, i))
                    return decode_reply((await ws.receive(timeout=10)).data)

                status, body = await readyz(session, gateway)
                assert status == 200, body
                sup = body["triton_supervisor"]
                assert (sup["state"], sup["restarts"], sup["restarting"]) == ("running", 0, False)
                assert sup["last_exit"] is None
                assert sample_or_none(gateway, "lipsync_gateway_triton_restarts_total") == 0
                assert sample_or_none(gateway, "lipsync_gateway_triton_supervisor_state",
                                      lipsync_gateway_triton_supervisor_state="running") == 1
                assert isinstance(await frame(1), FrameReply)

                follows.crash()  # SIGKILL
                await until(lambda: supervisor.status().state is S.BACKING_OFF, "backing off", timeout_s=20)
                status, body = await readyz(session, gateway)
                assert status == 503
                assert body["reason"].startswith(
                    "model server restarting (backing_off: tritonserver (pid 1001) was killed by SIGKILL "
                ), body["reason"]
                sup = body["triton_supervisor"]
                assert sup["restarting"] and sup["state"] == "backing_off"
                assert sup["last_exit"]["returncode"] == -9 and "SIGKILL" in sup["last_exit"]["reason"]
                assert sample_or_none(gateway, "lipsync_gateway_triton_supervisor_state",
                                      lipsync_gateway_triton_supervisor_state="backing_off") == 1
                await until(lambda: gateway.ctx is not None and not gateway.ctx.ready(),
                            "the gateway to see Triton down", timeout_s=20)
                down = await frame(2)
                assert isinstance(down, ErrorReply) and down.code == "triton_unavailable"

                await until(lambda: gateway.ctx is not None and gateway.ctx.ready(),
                            "ready again", timeout_s=20)
                assert isinstance(await frame(3), FrameReply), "frames again on the same connection"
                status, body = await readyz(session, gateway)
                assert status == 200 and body["reason"] is None
                sup = body["triton_supervisor"]
                assert (sup["state"], sup["restarts"], sup["restarting"]) == ("running", 1, False)
                assert "SIGKILL" in sup["last_exit"]["reason"], "the last reason stays"
                assert sample_or_none(gateway, "lipsync_gateway_triton_restarts_total") == 1
                info = sample_or_none(
                    gateway,
                    "lipsync_gateway_triton_last_exit_info",
                    reason=supervisor.status().last_exit.reason,  # type: ignore[union-attr]
                    returncode="-9",
                )
                assert info == 1
            assert follows.server.starts == 2

    asyncio.run(body())


def test_readyz_while_restarting_and_after(make_package: Callable[..., Path]) -> None:
    """The restarting window lasts until the gateway is ready again, through the reload of the
    avatars' models into the new tritonserver; a supervisor that gave up says so."""
    root = make_package(name=AVATAR).parent

    async def body() -> None:
        async with supervised_gateway(root, RestartPolicy(backoff_initial_s=0.05, max_restarts=1)) as up:
            gateway, supervisor, follows, fake = up.gateway, up.supervisor, up.follows, up.fake
            assert gateway.ctx is not None and gateway.ctx.supervision is not None
            supervision = gateway.ctx.supervision
            fake.hold_loads = asyncio.Event()  # the new Triton's model loads wait
            follows.crash()
            await until(lambda: supervisor.status().restarts == 1 and supervisor.status().state is S.RUNNING,
                        "running again", timeout_s=20)
            await until(lambda: fake.count("load_model", f"lipsync_{AVATAR}") >= 2,
                        "reloading the model", timeout_s=20)
            assert not gateway.ctx.ready()
            assert supervision.restarting(False), "running again, models not loaded yet: still restarting"
            reason = supervision.reason(False)
            assert reason is not None and reason.startswith("model server restarting (running: ")
            fake.hold_loads.set()
            await until(gateway.ctx.ready, "ready again", timeout_s=20)
            assert not supervision.restarting(False), "ready since the last exit"
            assert supervision.reason(True) is None

            follows.crash()  # the second quick failure: max_restarts=1 gives up
            await until(lambda: supervisor.status().state is S.GIVEN_UP, "given up", timeout_s=20)
            await until(lambda: gateway.ctx is not None and not gateway.ctx.ready(),
                        "the gateway not ready", timeout_s=20)
            reason = supervision.reason(False)
            assert reason is not None and reason.startswith("model server not restarted: gave up on ")
            assert not supervision.restarting(False)

    asyncio.run(body())


def test_lipsync_gateway_without_a_supervisor_shows_none(make_package: Callable[..., Path]) -> None:
    root = make_package(name=AVATAR).parent
    fake = fake_triton(f"lipsync_{AVATAR}", loaded=("audio_encoder",))

    async def body() -> None:
        gateway = GatewayServer(fake_settings(root, fake), grace_s=0.5, triton_client=fake)
        await gateway.start()
        try:
            async with aiohttp.ClientSession() as session:
                status, ready = await readyz(session, gateway)
            assert status == 200 and "triton_supervisor" not in ready
            assert sample_or_none(gateway, "lipsync_gateway_triton_restarts_total") is None
        finally:
            await gateway.stop()

    asyncio.run(body())
