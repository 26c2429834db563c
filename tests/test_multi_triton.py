"""Two real CPU ``tritonserver``s behind one gateway (issue 12), with the demo avatar over gRPC:
frames flow through both (each Triton's own statistics count inferences), one Triton is
SIGKILLed mid-load and the client sees no failed frame beyond those in flight on it at that
instant (counted on the gateway's event loop, atomically with the kill), the other serves
everything meanwhile and the gateway stays ready, and the killed one, restarted on the same
ports, gets its models from the gateway and serves again without a gateway restart.

CPU Triton takes ~100 ms per frame on 2 cores: the load is 4 callers of one frame each, and
every phase ends as soon as its condition holds (bounded waits, no fixed frame counts).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from lipsync.paths import MODEL_REPOSITORY_CPU
from proto import lipsync_pb2 as pb
from proto import lipsync_pb2_grpc as pbg
from tests.triton_stats import model_counts, settled_counts
from tests.waiting import wait_until

AVATAR = "demo"
MODEL = "lipsync_demo"
CALLERS = 4


@dataclass
class Answer:
    """One frame as the client saw it: when it was sent (monotonic s) and its error, if any."""

    sent: float
    error: str | None


@dataclass
class Load:
    """``CALLERS`` threads calling ``GenerateInference`` one frame at a time until `stop`."""

    stub: Any
    answers: list[Answer] = field(default_factory=list)
    stop_event: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for k in range(CALLERS):
            thread = threading.Thread(target=self._call, args=(k,), daemon=True, name=f"caller-{k}")
            thread.start()
            self.threads.append(thread)

    def _call(self, k: int) -> None:
        i = k
        while not self.stop_event.is_set():
            sent = time.monotonic()
            try:
                r = self.stub.GenerateInference(
                    pb.OptimizedInferenceRequest(model_name=AVATAR, frame_id=i % 50), timeout=60
                )
                error = None if r.success else r.error
            except grpc.RpcError as exc:
                error = f"rpc {exc.code()}: {exc.details()}"
            self.answers.append(Answer(sent, error))
            i += CALLERS

    def stop(self) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(timeout=90)

    def ok_since(self, t: float) -> int:
        return sum(1 for a in list(self.answers) if a.sent >= t and a.error is None)

    def failed(self) -> list[Answer]:
        return [a for a in list(self.answers) if a.error is not None]


def inferences(url: str) -> int:
    return model_counts(url, MODEL)[0]


def readyz(http_url: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"{http_url}/readyz", timeout=10) as resp:
            body: dict[str, Any] = json.load(resp)
    except urllib.error.HTTPError as exc:  # 503 carries the same JSON
        body = json.load(exc)
    return body


@pytest.mark.triton
def test_two_tritons_share_frames_survive_a_kill_and_the_killed_one_rejoins(
    start_triton: Any, start_gateway: Any, gateway_packages_root: Path
) -> None:
    # Only the UNet is loaded at start: the gateway loads the audio encoder on each itself.
    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(
            lambda _: start_triton(MODEL_REPOSITORY_CPU, model_control_mode="explicit", load_models=(MODEL,)),
            range(2),
        )
    gw = start_gateway(f"{first.grpc_url},{second.grpc_url}", gateway_packages_root)
    dead = f"127.0.0.1:{first.grpc_port}"  # localhost resolves to its IPv4 address
    body = readyz(gw.http_url)
    assert body["ready"] and [e["url"] for e in body["endpoints"]] == [dead, f"127.0.0.1:{second.grpc_port}"]
    assert all(
        e["ready"] and e["model_states"] == {MODEL: "ready", "audio_encoder": "ready"}
        for e in body["endpoints"]
    )

    channel = grpc.insecure_channel(gw.grpc_address)
    load = Load(pbg.OptimizedLipSyncServiceStub(channel))
    load.start()
    try:
        # 1. frames flow through both
        wait_until(
            lambda: inferences(first.grpc_url) > 0 and inferences(second.grpc_url) > 0,
            "both Tritons infer",
            timeout_s=120,
            step_s=0.1,
        )
        assert load.failed() == []

        # 2. SIGKILL the first while it has frames in flight; count them at that instant (on the
        # gateway's loop, so no call starts or ends between the count and the kill)
        before_second = settled_counts(second.grpc_url, MODEL)[0]

        async def kill_mid_call() -> int:
            (endpoint,) = [e for e in gw.ctx.lifecycle.endpoints() if e.state.url == dead]
            if endpoint.in_flight and first.pid is not None:
                os.killpg(first.pid, signal.SIGKILL)  # tritonserver and its Python-backend stubs
            return endpoint.in_flight  # the pipeline sends one frame per call

        deadline = time.monotonic() + 60
        while (in_flight_at_kill := gw.call(kill_mid_call)) == 0:
            assert time.monotonic() < deadline, "no frame in flight on the first Triton within 60 s"
            time.sleep(0.01)
        killed_at = time.monotonic()
        first.kill()  # reap it
        wait_until(
            lambda: readyz(gw.http_url)["endpoints"][0]["server"] == "down",
            "the gateway sees it down",
            timeout_s=10,
            step_s=0.1,
        )
        wait_until(lambda: load.ok_since(killed_at) >= 12, "frames after the kill", timeout_s=120, step_s=0.1)
        ok_after_kill = load.ok_since(killed_at)
        assert gw.ctx.ready(), "the other Triton serves every avatar: the gateway stays ready"
        # the other served everything: every frame since the kill was inferred there
        assert (
            settled_counts(second.grpc_url, MODEL, at_least=before_second + ok_after_kill)[0]
            >= before_second + ok_after_kill
        )
        failed_by_kill = len(load.failed())
        assert failed_by_kill <= in_flight_at_kill, (failed_by_kill, in_flight_at_kill, load.failed())

        # 3. restarted on the same ports: the gateway loads its models again and sends it frames
        first.start(timeout_s=180.0)
        wait_until(
            lambda: readyz(gw.http_url)["endpoints"][0]["ready"],
            "the restarted Triton rejoins",
            timeout_s=120,
            step_s=0.1,
        )
        wait_until(
            lambda: inferences(first.grpc_url) > 0,
            "the restarted Triton infers again",
            timeout_s=120,
            step_s=0.1,
        )
    finally:
        load.stop()
        channel.close()

    failed = load.failed()
    assert len(failed) <= in_flight_at_kill, failed
    assert all(a.error is not None and a.error.startswith("triton_unavailable: ") for a in failed), failed
    retries = (
        gw.ctx.metrics.registry.get_sample_value("lipsync_gateway_triton_retries_total", {"endpoint": dead})
        or 0
    )
    print(
        f"\nframes: {len(load.answers)} answered, {len(failed)} failed; "
        f"in flight on the killed Triton at the kill: {in_flight_at_kill}; "
        f"calls retried on the other: {retries:.0f}; frames after the kill before its restart: "
        f"{ok_after_kill}"
    )
