"""Gateway fixtures: a real `GatewayServer` on free ports against the real CPU Triton.

- `gateway_server` (session): the gateway serving a private packages root holding a copy of the
  demo avatar, against B's session `triton_server`, JPEG quality 95 (so image comparisons
  measure the pipeline, not the encoder).
- `start_gateway` (function): a factory for tests that need their own gateway (for instance
  against their own Triton from `start_triton`, to kill it); stopped at teardown.
- `served_gateway` (session, parametrized ``1worker`` / ``2workers``): the protocol tests'
  gateway, once as `gateway_server` (one process, in this one) and once as ``lipsync gateway
  --workers 2`` in a subprocess with the same settings (`WorkersGateway`), so every test that
  uses it runs against both. Tests that inspect the gateway's context use `gateway_server`.

The gateway runs in a background thread with its own event loop, so tests can use blocking
gRPC/HTTP clients; `RunningGateway.call(coro_fn)` runs a coroutine on the gateway's loop to
inspect its context.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from gateway.config import GatewaySettings
from gateway.context import GatewayContext
from gateway.server import GatewayServer
from tests.fixtures_triton import alive
from tests.up_process import ENV, GatewayProcess, start_gateway_process, worker_pids

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


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """gRPC metadata that presents ``token`` to a gateway: ``authorization: Bearer <token>``
    (the form `gateway.auth` reads, for ``LIPSYNC_AUTH_TOKEN`` and ``LIPSYNC_ADMIN_TOKEN``)."""
    return (("authorization", f"Bearer {token}"),)


ADMIN_TOKEN = "test-admin-token-0f1e2d3c4b5a"
"""The admin token of the test gateways (admin calls: LoadPackage)."""
CLIENT_TOKEN = "test-client-token-5f0c1e9a7b3d"
"""A client token, for tests of gateways that require one (``LIPSYNC_AUTH_TOKEN``)."""
ADMIN_METADATA = bearer(ADMIN_TOKEN)
"""gRPC metadata of an admin call to a test gateway."""


def gateway_settings(triton_url: str, packages_root: Path, **overrides: Any) -> GatewaySettings:
    """Test settings: loopback, free ports, JPEG quality 95, `ADMIN_TOKEN`, plus ``overrides``."""
    values: dict[str, Any] = dict(
        triton_url=triton_url,
        host="127.0.0.1",
        grpc_port=0,
        http_port=0,
        packages_root=packages_root,
        jpeg_quality=95,
        admin_token=ADMIN_TOKEN,
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


class WorkersGateway:
    """``lipsync gateway --workers N`` as a subprocess, with the attributes the protocol tests
    use of a `RunningGateway` (``grpc_address``, ``http_url``, ``settings``).

    Args:
        process: the running ``lipsync gateway``.
        settings: the settings it runs with (its ports included; with TLS and a client token,
            `stats` uses them).
        tmp_dir: its ``TMPDIR``, where its supervisor makes the workers' metrics folder
            (``lipsync-metrics-*``, removed at stop: `stop` asserts it); None: not checked.
        client_ssl: what `stats` trusts when it serves TLS.
    """

    def __init__(
        self,
        process: GatewayProcess,
        settings: GatewaySettings,
        tmp_dir: Path | None = None,
        client_ssl: ssl.SSLContext | None = None,
    ) -> None:
        self.process = process
        self.settings = settings
        self.tmp_dir = tmp_dir
        self.client_ssl = client_ssl

    def metrics_dirs(self) -> list[Path]:
        """The ``lipsync-metrics-*`` folders in its ``TMPDIR`` now ([] when not known)."""
        return sorted(self.tmp_dir.glob("lipsync-metrics-*")) if self.tmp_dir is not None else []

    @property
    def grpc_address(self) -> str:
        """``127.0.0.1:PORT`` of the shared gRPC port."""
        return f"127.0.0.1:{self.process.grpc_port}"

    @property
    def http_url(self) -> str:
        """``http(s)://127.0.0.1:PORT`` of the shared HTTP port."""
        scheme = "https" if self.settings.tls_cert is not None else "http"
        return f"{scheme}://127.0.0.1:{self.process.http}"

    def worker_pids(self) -> list[int]:
        """Process ids of its workers now."""
        return worker_pids(self.process.proc.pid)

    def stats(self) -> dict[str, Any]:
        """``/api/stats`` on a new connection (so from whichever worker the kernel picks)."""
        token = self.settings.auth_token
        headers = {"Authorization": f"Bearer {token.get_secret_value()}"} if token is not None else {}
        request = urllib.request.Request(f"{self.http_url}/api/stats", headers=headers)
        with urllib.request.urlopen(request, timeout=10, context=self.client_ssl) as resp:
            return dict(json.load(resp))

    def wait_ready(self, timeout_s: float = _START_TIMEOUT_S) -> list[int]:
        """Wait until every worker has answered ``/api/stats`` as ready; returns their pids.

        Raises:
            AssertionError: it exited, or not every worker was ready in time (with its log).
        """
        deadline = time.monotonic() + timeout_s
        ready: set[int] = set()
        while time.monotonic() < deadline and self.process.proc.poll() is None:
            pids = set(self.worker_pids())
            if len(pids) == self.settings.workers and pids <= ready:
                return sorted(pids)
            try:
                stats = self.stats()
                if stats["ready"]:
                    ready.add(stats["worker"]["pid"])
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        log = self.process.log_path.read_text()
        code = self.process.proc.poll()
        raise AssertionError(f"not every worker ready (exit {code}, ready {ready}):\n{log}")

    def stop(self) -> int:
        """SIGTERM it; returns its exit status (no worker and no metrics folder is left:
        asserted)."""
        pids = self.worker_pids()
        code = self.process.stop()
        running = [p for p in pids if alive(p)]
        assert not running, f"workers left behind: {running}"
        assert not self.metrics_dirs(), f"metrics folder left behind: {self.metrics_dirs()}"
        return code


def start_workers_gateway(
    tmp_path: Path,
    triton_url: str,
    packages_root: Path,
    workers: int,
    client_ssl: ssl.SSLContext | None = None,
    **overrides: Any,
) -> WorkersGateway:
    """Start ``lipsync gateway --workers N`` with `gateway_settings` (free ports, JPEG quality
    95, `ADMIN_TOKEN`, ``TMPDIR`` a fresh ``tmp_path/tmp``) plus ``overrides`` (settings
    values, passed as ``LIPSYNC_*`` variables) and wait until every worker is ready
    (``client_ssl``: what it trusts when it serves TLS)."""
    tmp_dir = tmp_path / "tmp"
    tmp_dir.mkdir()
    env = {**ENV, "TMPDIR": str(tmp_dir), "LIPSYNC_ADMIN_TOKEN": ADMIN_TOKEN}
    env.update({f"LIPSYNC_{key.upper()}": str(value) for key, value in overrides.items()})
    process = start_gateway_process(
        tmp_path, triton_url, packages_root, env, "--workers", str(workers), "--jpeg-quality", "95"
    )
    settings = gateway_settings(
        triton_url, packages_root, grpc_port=process.grpc_port, http_port=process.http, workers=workers,
        **overrides,
    )
    running = WorkersGateway(process, settings, tmp_dir, client_ssl)
    try:
        running.wait_ready()
        assert len(running.metrics_dirs()) == 1, f"one metrics folder while serving: {running.metrics_dirs()}"
    except BaseException:
        process.stop()
        raise
    return running


@pytest.fixture(scope="session", params=[1, 2], ids=["1worker", "2workers"])
def served_gateway(
    request: pytest.FixtureRequest,
    triton_server: Any,
    gateway_packages_root: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningGateway | WorkersGateway]:
    """The gateway of the protocol tests: `gateway_server`, then ``--workers 2`` (module doc)."""
    if request.param == 1:
        yield request.getfixturevalue("gateway_server")
        return
    running = start_workers_gateway(
        tmp_path_factory.mktemp("workers"), triton_server.grpc_url, gateway_packages_root, request.param
    )
    try:
        yield running
    finally:
        running.stop()
