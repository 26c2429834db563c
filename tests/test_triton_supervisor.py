"""`lipsync.triton_supervisor.TritonSupervisor`: keeps the local tritonserver running.

Logic (an in-process fake behind `SupervisedServer`, back-offs of milliseconds):
- the back-off doubles up to its cap, and failure `max_restarts + 1` in a row gives up with a
  message naming the count and the last failure;
- a crash is restarted; a run that lasted `healthy_after_s` resets the back-off;
- a failing check is raised by `start()` at once (nothing retried);
- stop during a back-off or during a start is prompt and ends in STOPPED;
- `serve_until_given_up` cancels the coroutine it runs when the supervisor gives up;
- `lipsync up`'s restart options are read back into the policy, bad values refused by name.

The real tritonserver (untrained model repository, free ports):
- SIGKILL: the supervisor reaps it (no zombie, its process group gone), logs the signal and
  its log tail, starts it again on the same ports, and it serves inference again;
- a repository that cannot load: tritonserver exits at every start, the back-off is in the
  log, then GIVEN_UP with the clear message and no process left;
- stop during a back-off and during a start is prompt and leaves no process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from numpy.typing import NDArray

from lipsync.cli import build_parser
from lipsync.triton_local import (
    TritonServer,
    TritonStartCancelled,
    TritonStartError,
    free_ports,
    port_in_use,
)
from lipsync.triton_supervisor import (
    FINAL_STATES,
    RestartPolicy,
    SupervisorState,
    SupervisorStatus,
    TritonGaveUp,
    TritonSupervisor,
    restart_policy_from_args,
    serve_until_given_up,
)
from tests.fake_supervised import FakeServer
from tests.fixtures_triton import group_gone, reaped

S = SupervisorState


def _record(supervisor: TritonSupervisor) -> list[SupervisorStatus]:
    seen: list[SupervisorStatus] = []
    supervisor.subscribe(seen.append)
    return seen


def _final(supervisor: TritonSupervisor, timeout_s: float = 30.0) -> SupervisorStatus:
    status = supervisor.wait_for(lambda s: s.state in FINAL_STATES, timeout_s)
    assert status.state in FINAL_STATES, f"still {status.state} after {timeout_s} s"
    return status


def _wait_state(
    supervisor: TritonSupervisor, state: SupervisorState, timeout_s: float, **fields: object
) -> SupervisorStatus:
    status = supervisor.wait_for(
        lambda s: s.state is state and all(getattr(s, k) == v for k, v in fields.items()),
        timeout_s,
    )
    assert status.state is state, f"{status.state} ({status.message}), expected {state}"
    return status


def test_backoff_doubles_from_1_s_to_30_s() -> None:
    policy = RestartPolicy()
    assert [policy.backoff_s(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 30, 30, 30]
    assert policy.backoff_s(10_000) == 30
    with pytest.raises(ValueError, match="backoff_max_s"):
        RestartPolicy(backoff_initial_s=2.0, backoff_max_s=1.0)
    with pytest.raises(ValueError, match="max_restarts"):
        RestartPolicy(max_restarts=-1)


def test_backoff_doubles_to_its_cap_then_it_gives_up() -> None:
    policy = RestartPolicy(max_restarts=4, backoff_initial_s=0.01, backoff_max_s=0.04)
    server = FakeServer()
    supervisor = TritonSupervisor(server, policy, poll_interval_s=0.01)
    seen = _record(supervisor)
    supervisor.start()
    final = _final(supervisor)

    assert final.state is S.GIVEN_UP and server.starts == 5
    assert [s.backoff_s for s in seen if s.state is S.BACKING_OFF] == [0.01, 0.02, 0.04, 0.04]
    assert [s.failures_in_a_row for s in seen if s.state is S.BACKING_OFF] == [1, 2, 3, 4]
    assert final.restarts == 4 and final.failures_in_a_row == 5
    assert final.message.startswith("gave up on tritonserver after 5 quick failures in a row")
    assert "at most 4 restarts" in final.message
    assert "tritonserver exited with status 1 before it was ready" in final.message
    assert final.last_exit is not None and final.last_exit.returncode == 1
    assert "failed to load 'model'" in final.last_exit.report
    with pytest.raises(TritonGaveUp, match="after 5 quick failures"):
        supervisor.wait_running()
    assert supervisor.stop().state is S.GIVEN_UP  # stop after giving up: nothing to do


def test_crash_is_restarted_and_a_healthy_run_resets_the_backoff() -> None:
    policy = RestartPolicy(backoff_initial_s=0.01, backoff_max_s=1.0, healthy_after_s=2.0)
    server = FakeServer("run", "run", "run", "run")
    supervisor = TritonSupervisor(server, policy, poll_interval_s=0.01)
    seen = _record(supervisor)
    with supervisor:
        for restarts in range(2):  # two quick crashes: 0.01 s, then 0.02 s
            _wait_state(supervisor, S.RUNNING, 10, restarts=restarts)
            server.crash()
        _wait_state(supervisor, S.RUNNING, 10, restarts=2, failures_in_a_row=0)  # after 2 s
        server.crash(code=-11)
        _wait_state(supervisor, S.RUNNING, 10, restarts=3)
    assert supervisor.status().state is S.STOPPED
    backoffs = [s for s in seen if s.state is S.BACKING_OFF]
    assert [s.backoff_s for s in backoffs] == [0.01, 0.02, 0.01]
    assert [s.failures_in_a_row for s in backoffs] == [1, 2, 1]
    last = backoffs[-1].last_exit
    assert last is not None and last.returncode == -11 and last.ran_s is not None
    assert "was killed by SIGSEGV after running" in last.reason
    assert [s.state for s in seen[-2:]] == [S.STOPPING, S.STOPPED] and server.stops >= 1


def test_a_failing_check_is_raised_at_once() -> None:
    server = FakeServer(check_error="model repository /x does not exist")
    supervisor = TritonSupervisor(server)
    with pytest.raises(TritonStartError, match="does not exist"):
        supervisor.start()
    assert server.starts == 0 and supervisor.status().state is S.STOPPED


def test_stop_during_a_backoff_is_prompt() -> None:
    supervisor = TritonSupervisor(FakeServer(), RestartPolicy(backoff_initial_s=600.0, backoff_max_s=600.0))
    supervisor.start()
    status = _wait_state(supervisor, S.BACKING_OFF, 10)
    assert status.next_start_at is not None and status.next_start_at - time.time() > 500
    t0 = time.monotonic()
    assert supervisor.stop().state is S.STOPPED
    assert time.monotonic() - t0 < 5.0, "stop waited for the back-off"


def test_stop_during_a_start_cancels_it() -> None:
    server = FakeServer("hang")
    supervisor = TritonSupervisor(server)
    seen = _record(supervisor)
    supervisor.start()
    assert server.starting.wait(10)
    assert supervisor.stop(timeout_s=10).state is S.STOPPED
    assert [s.state for s in seen] == [S.STARTING, S.STOPPING, S.STOPPED]
    with pytest.raises(TritonStartCancelled):
        supervisor.wait_running()


def test_serve_until_given_up_cancels_what_it_runs() -> None:
    stopped = asyncio.Event()

    async def gateway() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            stopped.set()  # the gateway's cleanup ran

    async def body(supervisor: TritonSupervisor) -> None:
        with pytest.raises(TritonGaveUp, match="after 1 quick failure in a row"):
            await serve_until_given_up(gateway(), supervisor)
        assert stopped.is_set()

    supervisor = TritonSupervisor(FakeServer(), RestartPolicy(max_restarts=0))
    supervisor.start()
    asyncio.run(body(supervisor))

    async def quick() -> str:
        return "done"

    running = TritonSupervisor(FakeServer("run"))
    with running:
        assert asyncio.run(serve_until_given_up(quick(), running)) == "done"


def test_lipsync_up_restart_options(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    assert restart_policy_from_args(parser.parse_args(["up"])) == RestartPolicy()
    args = parser.parse_args([
        "up", "--triton-max-restarts", "2", "--triton-restart-backoff-s", "0.5",
        "--triton-restart-backoff-max-s", "4", "--triton-healthy-after-s", "10",
    ])
    assert restart_policy_from_args(args) == RestartPolicy(2, 0.5, 4.0, 10.0)
    for flag, value, error in [
        ("--triton-max-restarts", "-1", "must be >= 0, not -1"),
        ("--triton-restart-backoff-s", "0", "must be > 0 s, not 0"),
        ("--triton-healthy-after-s", "nan", "must be > 0 s, not nan"),
    ]:
        with pytest.raises(SystemExit):
            parser.parse_args(["up", flag, value])
        assert f"argument {flag}: {error}" in capsys.readouterr().err
    args = parser.parse_args(["up", "--triton-restart-backoff-s", "5", "--triton-restart-backoff-max-s", "2"])
    with pytest.raises(ValueError, match=r"--triton-restart-backoff-max-s \(2\) must be >= "):
        restart_policy_from_args(args)


# ------------------------------------------------------------------------- real tritonserver
def _server(repo: Path, tmp_path: Path, **kwargs: Any) -> TritonServer:
    http_port, grpc_port, metrics_port = free_ports(3)
    return TritonServer(
        repo, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
        log_file=tmp_path / "triton.log", **kwargs,
    )


def _encode(url: str) -> NDArray[np.float32]:
    mel = np.zeros((1, 80, 16), dtype=np.float32)
    with grpcclient.InferenceServerClient(url) as client:
        mel_in = grpcclient.InferInput("mel", list(mel.shape), "FP32")
        mel_in.set_data_from_numpy(mel)
        result = client.infer("audio_encoder", [mel_in])
    feature = result.as_numpy("feature")
    assert feature is not None
    return feature


@pytest.mark.triton
def test_sigkill_is_reaped_and_restarted_on_the_same_ports(
    untrained_model_repo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lipsync.triton_supervisor")
    server = _server(untrained_model_repo, tmp_path, load_models=("audio_encoder",))
    ports = (server.http_port, server.grpc_port, server.metrics_port)
    with TritonSupervisor(server, RestartPolicy(backoff_initial_s=0.5), start_timeout_s=180) as sup:
        first = sup.wait_running()
        assert first.pid is not None
        before = _encode(server.grpc_url)

        killed_at = time.monotonic()
        os.kill(first.pid, signal.SIGKILL)  # as the OOM killer would
        back = sup.wait_for(lambda s: s.state is S.RUNNING and s.pid != first.pid, 180)
        took = time.monotonic() - killed_at
        assert back.state is S.RUNNING, back.message
        print(f"SIGKILL -> ready again: {took:.1f} s")

        assert reaped(first.pid), "the killed tritonserver was left a zombie"
        assert group_gone(first.pid), "its Python-backend stubs outlived it"
        assert back.restarts == 1 and back.failures_in_a_row == 1
        assert back.last_exit is not None and back.last_exit.returncode == -signal.SIGKILL
        assert back.last_exit.reason.startswith(f"tritonserver (pid {first.pid}) was killed by SIGKILL")
        assert (server.http_port, server.grpc_port, server.metrics_port) == ports
        np.testing.assert_array_equal(_encode(server.grpc_url), before)
    assert back.pid is not None and sup.status().state is S.STOPPED and group_gone(back.pid)
    assert not any(port_in_use(p) for p in ports)
    logged = caplog.text
    assert "was killed by SIGKILL after running" in logged and "Its log ends with:" in logged
    assert "restarting it in 0.5 s (quick failure 1 in a row; gives up at 6)" in logged


@pytest.mark.triton
def test_a_repository_that_cannot_load_backs_off_then_gives_up(
    broken_model_repo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lipsync.triton_supervisor")
    server = _server(broken_model_repo, tmp_path)
    policy = RestartPolicy(max_restarts=2, backoff_initial_s=0.2)
    supervisor = TritonSupervisor(server, policy, start_timeout_s=180)
    seen = _record(supervisor)
    supervisor.start()
    with pytest.raises(TritonGaveUp) as info:
        supervisor.wait_running()
    final = supervisor.status()
    assert final.state is S.GIVEN_UP and final.restarts == 2
    assert str(info.value).startswith("gave up on tritonserver after 3 quick failures in a row")
    assert "tritonserver exited with status 1 before it was ready" in str(info.value)
    assert final.last_exit is not None and "failed to load 'lipsync_broken'" in final.last_exit.report
    logged = caplog.text
    assert "restarting it in 0.2 s (quick failure 1 in a row; gives up at 3)" in logged
    assert "restarting it in 0.4 s (quick failure 2 in a row; gives up at 3)" in logged
    pids = {s.last_exit.pid for s in seen if s.last_exit is not None and s.last_exit.pid}
    assert len(pids) == 3 and all(reaped(p) and group_gone(p) for p in pids)
    assert supervisor.stop().state is S.GIVEN_UP


@pytest.mark.triton
def test_stop_during_a_backoff_or_a_start_leaves_no_process(
    broken_model_repo: Path, untrained_model_repo: Path, tmp_path: Path
) -> None:
    policy = RestartPolicy(backoff_initial_s=300.0, backoff_max_s=300.0)
    supervisor = TritonSupervisor(_server(broken_model_repo, tmp_path), policy, start_timeout_s=180)
    supervisor.start()
    backing_off = _wait_state(supervisor, S.BACKING_OFF, 180)
    t0 = time.monotonic()
    assert supervisor.stop().state is S.STOPPED
    assert time.monotonic() - t0 < 5.0, "stop waited for the back-off"
    assert backing_off.last_exit is not None and backing_off.last_exit.pid is not None
    assert reaped(backing_off.last_exit.pid) and group_gone(backing_off.last_exit.pid)

    server = _server(untrained_model_repo, tmp_path / "2", load_models=("*",))
    supervisor = TritonSupervisor(server, start_timeout_s=180)
    supervisor.start()
    deadline = time.monotonic() + 60  # stop it while it loads its models
    while "loading: " not in server.log_tail(60) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.pid is not None and supervisor.status().state is S.STARTING, "not loading"
    t0 = time.monotonic()
    assert supervisor.stop().state is S.STOPPED
    print(f"stop during a start took {time.monotonic() - t0:.2f} s")
    assert reaped(server.pid) and group_gone(server.pid)
    assert not any(port_in_use(p) for p in (server.http_port, server.grpc_port, server.metrics_port))
