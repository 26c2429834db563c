"""Gateway fixtures: a real `GatewayServer` on free ports against the real CPU Triton.

- `gateway_server` (session): the gateway serving a private packages root holding a copy of the
  demo avatar, against B's session `triton_server`, JPEG quality 95 (so image comparisons
  measure the pipeline, not the encoder).
- `start_gateway` (function): a factory for tests that need their own gateway (for instance
  against their own Triton from `start_triton`, to kill it); stopped at teardown.

The gateway runs in a background thread with its own event loop, so tests can use blocking
gRPC/HTTP clients; `RunningGateway.call(coro_fn)` runs a coroutine on the gateway's loop to
inspect its context.
"""
from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from gateway.config import GatewaySettings
from gateway.context import GatewayContext
from gateway.server import GatewayServer

T = TypeVar("T")

_START_TIMEOUT_S = 180.0


class RunningGateway:
    """A `GatewayServer` running on its own event loop in a daemon thread.

    Args:
        settings: its `GatewaySettings` (ports as requested, usually 0).
        server_options: more `GatewayServer` keyword arguments (``triton_client``,
            ``supervisor``).

    Attributes:
        settings: its `GatewaySettings`.
        server: the `GatewayServer` (bound ports in ``server.grpc_port`` / ``http_port``).
    """

    def __init__(self, settings: GatewaySettings, **server_options: Any) -> None:
        self.settings = settings
        self.server = GatewayServer(settings, grace_s=0.5, **server_options)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="gateway-loop", daemon=True)

    @property
    def grpc_address(self) -> str:
        """``127.0.0.1:PORT`` of the gRPC server."""
        return self.server.grpc_address

    @property
    def http_url(self) -> str:
        """``http://127.0.0.1:PORT`` of the aiohttp app."""
        return self.server.http_url

    @property
    def ctx(self) -> GatewayContext:
        """The live `GatewayContext` (touch it only through `call` for anything async)."""
        assert self.server.ctx is not None, "gateway not started"
        return self.server.ctx

    def call(self, fn: Callable[[], Coroutine[Any, Any, T]], timeout_s: float = 60.0) -> T:
        """Run ``fn()`` on the gateway's event loop and return its result."""
        return asyncio.run_coroutine_threadsafe(fn(), self.loop).result(timeout_s)

    def start(self) -> RunningGateway:
        """Start the loop thread and the server; returns self."""
        self._thread.start()
        self.call(self.server.start, timeout_s=_START_TIMEOUT_S)
        return self

    def stop(self) -> None:
        """Stop the server, the loop and the thread."""
        if not self._thread.is_alive():
            return
        try:
            self.call(self.server.stop, timeout_s=30.0)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10.0)
            self.loop.close()


def make_packages_root(demo_root: Path, dest: Path) -> Path:
    """A private packages root holding a copy of the demo package (as ``dest/demo``)."""
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / demo_root.name
    if not target.exists():
        shutil.copytree(demo_root, target)
    return dest


def gateway_settings(triton_url: str, packages_root: Path, **overrides: Any) -> GatewaySettings:
    """Test settings: loopback, free ports, JPEG quality 95, plus ``overrides``."""
    values: dict[str, Any] = dict(
        triton_url=triton_url,
        host="127.0.0.1",
        grpc_port=0,
        http_port=0,
        packages_root=packages_root,
        jpeg_quality=95,
    )
    values.update(overrides)
    return GatewaySettings(**values)


@pytest.fixture(scope="session")
def gateway_packages_root(demo_package: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A packages root (tmp) holding a copy of the demo avatar as ``demo``."""
    return make_packages_root(Path(demo_package.root), tmp_path_factory.mktemp("packages"))


@pytest.fixture(scope="session")
def gateway_server(triton_server: Any, gateway_packages_root: Path) -> Iterator[RunningGateway]:
    """The gateway on free ports against the session Triton, demo avatar, JPEG quality 95."""
    running = RunningGateway(gateway_settings(triton_server.grpc_url, gateway_packages_root)).start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def start_gateway() -> Iterator[Callable[..., RunningGateway]]:
    """Factory: ``start_gateway(triton_url, packages_root, **settings)`` -> `RunningGateway`."""
    started: list[RunningGateway] = []

    def _start(triton_url: str, packages_root: Path, **overrides: Any) -> RunningGateway:
        running = RunningGateway(gateway_settings(triton_url, packages_root, **overrides))
        started.append(running)
        return running.start()

    yield _start
    for running in reversed(started):
        running.stop()
