"""An in-process `lipsync.triton_supervisor.SupervisedServer` for the fast tier: `FakeServer`
(scripted starts, a crash on demand), and `TritonFollows`, which makes the in-process fake
Triton (`tests.fake_triton.FakeTriton`) go down when the fake server crashes and come back when
the supervisor has started it again, so a gateway on that fake sees what `lipsync up` shows.
"""
from __future__ import annotations

import asyncio
import threading

from lipsync.triton_local import TritonStartCancelled, TritonStartError
from lipsync.triton_supervisor import SupervisorState, SupervisorStatus, TritonSupervisor
from tests.fake_triton import FakeTriton


class FakeServer:
    """`SupervisedServer` in process. Each `start` takes the next scripted outcome: "fail"
    (raises like an early exit), "run" (ready until `crash()`), "hang" (loads until
    cancelled); "fail" once the script is used up."""

    def __init__(self, *outcomes: str, check_error: str | None = None) -> None:
        self.outcomes = list(outcomes)
        self.check_error = check_error
        self.starts = 0
        self.stops = 0
        self.starting = threading.Event()
        self._pid: int | None = None
        self._code: int | None = None

    @property
    def pid(self) -> int | None:
        return self._pid

    def check(self) -> list[str]:
        if self.check_error:
            raise TritonStartError(self.check_error)
        return ["model"]

    def start(self, timeout_s: float = 1.0, *, cancel: threading.Event | None = None) -> None:
        self.starts += 1
        self._pid, self._code = 1000 + self.starts, None
        outcome = self.outcomes.pop(0) if self.outcomes else "fail"
        if outcome == "fail":
            self._code = 1
            raise TritonStartError(
                "tritonserver exited with status 1 before it was ready.",
                "E0101 failed to load 'model'",
            )
        if outcome == "hang":
            self.starting.set()
            assert cancel is not None and cancel.wait(30), "start was never cancelled"
            self._code = -15
            raise TritonStartCancelled("cancelled")

    def crash(self, code: int = -9) -> None:
        self._code = code

    def poll(self) -> int | None:
        return self._code

    def stop(self, timeout_s: float = 15.0) -> None:
        self.stops += 1
        if self._code is None:
            self._code = -15

    def failure_report(self) -> str:
        return "Its log ends with:\nI0101 last line"


class TritonFollows:
    """Ties a `FakeTriton` to a `TritonSupervisor` of a `FakeServer`: `crash` kills the server
    and takes the fake Triton down (connection refused); when the supervisor reports RUNNING
    again the fake Triton is back, nothing loaded (`FakeTriton.restart`). Changes to the fake
    Triton run on ``loop`` (where the gateway reads it).
    """

    def __init__(self, supervisor: TritonSupervisor, server: FakeServer, triton: FakeTriton,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.supervisor, self.server, self.triton, self.loop = supervisor, server, triton, loop
        self._down = False
        supervisor.subscribe(self._on_status)

    def _on_status(self, status: SupervisorStatus) -> None:
        if status.state is SupervisorState.RUNNING and self._down:
            self._down = False
            self.loop.call_soon_threadsafe(self.triton.restart)

    def crash(self) -> None:
        """SIGKILL of tritonserver, as far as the supervisor and the gateway can tell."""
        self._down = True
        self.loop.call_soon_threadsafe(setattr, self.triton, "mode", "refused")
        self.server.crash()
