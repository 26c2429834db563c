"""A whole gateway against the in-process `tests.fake_triton.FakeTriton`, for the fast tier: the
real store (packages from `make_package`), lifecycle, pipeline, JPEG encoder, metrics and
protocol adapters; only Triton is the fake.

- `fake_settings` / `fake_context`: in the test's own event loop; `on_fake_context`: a context in
  a loop of its own, running a test body;
- `on_fake_server` / `serve_on_fake`: a real `GatewayServer` on loopback ports in a loop of
  its own, running a test body;
- `FakeGatewayProcess` (``python -m tests.fake_gateway PACKAGES_ROOT HOST``): the same gateway in a
  process of its own, for tests that measure it from outside (its RSS from ``/proc``, whether
  it crashed) while clients misbehave. ``LIPSYNC_*`` variables of its environment set the
  other settings.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Self, TypeVar

import numpy as np

from gateway.config import GatewaySettings
from gateway.context import GatewayContext
from gateway.server import GatewayServer
from lipsync.contract import AUDIO_ENCODER_MODEL, MANIFEST_NAME, avatar_model_name
from lipsync.paths import REPO_ROOT
from tests.fake_triton import FakeTriton, fake_triton
from tests.gateway_metrics import scrape

T = TypeVar("T")
SYNTHETIC_AVATAR = "synthetic"
_START_TIMEOUT_S = 60.0


def synthetic_avatar(
    make_package: Callable[..., Path], *, unet_loaded: bool = False
) -> tuple[Path, FakeTriton]:
    """A packages root holding the avatar `SYNTHETIC_AVATAR` (10 video frames of 64x48 noise, so
    that the resize round trip of the composite changes pixels; a gradient would not) and a fake
    Triton serving its model, the audio encoder loaded (and its UNet with ``unet_loaded``)."""
    frames = np.random.default_rng(0).integers(0, 256, (10, 48, 64, 3), dtype=np.uint8)
    root = make_package(name=SYNTHETIC_AVATAR, frames=frames).parent
    unet = avatar_model_name(SYNTHETIC_AVATAR)
    loaded = (AUDIO_ENCODER_MODEL, unet) if unet_loaded else (AUDIO_ENCODER_MODEL,)
    return root, fake_triton(unet, loaded=loaded)


def on_fake_server(
    make_package: Callable[..., Path],
    body: Callable[[GatewayServer, FakeTriton], Awaitable[T]],
    *,
    unet_loaded: bool = False,
    **settings: Any,
) -> T:
    """Run ``body(server, fake)`` on a real `GatewayServer` (loopback, free ports, settings from
    `fake_settings` plus ``settings``) over the fake with the `synthetic_avatar`."""
    root, fake = synthetic_avatar(make_package, unet_loaded=unet_loaded)
    return serve_on_fake(root, fake, body, **settings)


def serve_on_fake(
    root: Path, fake: FakeTriton, body: Callable[[GatewayServer, FakeTriton], Awaitable[T]], **settings: Any
) -> T:
    """`on_fake_server` for the packages under ``root`` and the fake given (`fake_triton_for`)."""

    async def run() -> T:
        server = GatewayServer(fake_settings(root, fake, **settings), grace_s=0.5, triton_client=fake)
        await server.start()
        try:
            return await body(server, fake)
        finally:
            await server.stop()

    return asyncio.run(run())

def fake_settings(packages_root: Path, fake: FakeTriton, **overrides: Any) -> GatewaySettings:
    """Settings for a gateway on the fake: loopback, free ports, JPEG q95, no periodic probe
    (tests call `ModelLifecycle.probe_once` themselves), plus ``overrides``."""
    values: dict[str, Any] = {
        "triton_url": fake.url,
        "host": "127.0.0.1",
        "grpc_port": 0,
        "http_port": 0,
        "packages_root": packages_root,
        "jpeg_quality": 95,
        "triton_poll_interval_s": 3600.0,
    }
    values.update(overrides)
    return GatewaySettings(**values)


async def fake_context(packages_root: Path, fake: FakeTriton, **overrides: Any) -> GatewayContext:
    """`GatewayContext.create` on the fake (inside the running loop; `close` it at the end)."""
    return await GatewayContext.create(fake_settings(packages_root, fake, **overrides), fake)


def on_fake_context(
    root: Path, fake: FakeTriton, body: Callable[[GatewayContext, FakeTriton], Awaitable[T]], **overrides: Any
) -> T:
    """Run ``body(ctx, fake)`` on a fresh event loop with a context over the fake; closed after."""

    async def run() -> T:
        ctx = await fake_context(root, fake, **overrides)
        try:
            return await body(ctx, fake)
        finally:
            await ctx.close()

    return asyncio.run(run())


def fake_triton_for(packages_root: Path) -> FakeTriton:
    """A fake serving the model of every package folder under ``packages_root``."""
    manifests = sorted(packages_root.glob(f"*/{MANIFEST_NAME}"))
    models = [json.loads(manifest.read_text())["model_name"] for manifest in manifests]
    return fake_triton(*models, loaded=(AUDIO_ENCODER_MODEL,))


class FakeGatewayProcess:
    """``python -m tests.fake_gateway PACKAGES_ROOT HOST`` as a child process (module doc).

    Args:
        packages_root: the avatars it serves.
        env: extra environment (``LIPSYNC_*`` settings).
        host: the address it binds (``::`` for IPv4 and IPv6 loopback both).
        log_path: where its stderr (its log) goes; None: this process's stderr.

    Attributes:
        proc: the child; ``grpc_address`` (``127.0.0.1:PORT``) and ``http_url`` once started.
    """

    def __init__(
        self,
        packages_root: Path,
        env: Mapping[str, str] | None = None,
        *,
        host: str = "127.0.0.1",
        log_path: Path | None = None,
    ) -> None:
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("LIPSYNC_")}
        child_env.update(env or {})
        self.log_path = log_path
        self._log = log_path.open("wb") if log_path is not None else None
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fake_gateway", str(packages_root), host],
            cwd=REPO_ROOT,
            env=child_env,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # the ports, once serving (or "" if it died)
        if not line:
            self.proc.wait(timeout=_START_TIMEOUT_S)
            raise RuntimeError(f"fake gateway exited {self.proc.returncode} before serving")
        ports = json.loads(line)
        self.grpc_port: int = ports["grpc_port"]
        self.http_port: int = ports["http_port"]
        self.grpc_address = f"127.0.0.1:{self.grpc_port}"
        self.http_url = f"http://127.0.0.1:{self.http_port}"

    @property
    def pid(self) -> int:
        """Its process id."""
        return self.proc.pid

    def alive(self) -> bool:
        """Still running (no crash)."""
        return self.proc.poll() is None

    def status(self, field: str) -> int:
        """A ``/proc/PID/status`` size field in bytes (``VmRSS``, ``VmHWM``)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
        raise KeyError(field)

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample of its ``/metrics`` (summed over the labels not given; 0 if
        absent)."""
        given = labels.items()
        return sum(
            value
            for (sample, have), value in scrape(self.http_url).items()
            if sample == name and given <= set(have)
        )

    def reset_peak_rss(self) -> None:
        """Set ``VmHWM`` (peak RSS) to the current RSS (``/proc/PID/clear_refs``, Linux)."""
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")

    def stop(self) -> int:
        """SIGTERM, wait (SIGKILL after 20 s); returns the exit status (0 = clean stop)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if self._log is not None:
            self._log.close()
        return self.proc.returncode

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def _serve(packages_root: Path, host: str) -> None:
    fake = fake_triton_for(packages_root)
    fake.keep_inputs = False  # its RSS is what the tests measure
    server = GatewayServer(fake_settings(packages_root, fake, host=host), grace_s=0.5, triton_client=fake)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(json.dumps({"grpc_port": server.grpc_port, "http_port": server.http_port}), flush=True)
    try:
        await stop.wait()
    finally:
        await server.stop()


if __name__ == "__main__":
    asyncio.run(_serve(Path(sys.argv[1]), sys.argv[2]))
