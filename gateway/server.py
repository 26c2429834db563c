"""`GatewayServer`: one gateway process: the gRPC server and the aiohttp app on one event loop.

```python
server = GatewayServer(GatewaySettings(triton_url="localhost:8001"))
await server.start()        # builds the GatewayContext, binds both ports
...                         # server.grpc_address, server.http_url
await server.stop()         # graceful: stops accepting, finishes in-flight frames (grace s)
```
Ports 0 pick free ports; the bound ones are in ``grpc_port`` / ``http_port`` (and
``health_port`` when ``LIPSYNC_HEALTH_PORT`` is set) after `start`. With ``LIPSYNC_TLS_CERT`` /
``LIPSYNC_TLS_KEY`` both ports serve TLS (`gateway.tls`); every call is checked by
`gateway.auth`.
"""
from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable

import grpc
from aiohttp import web

from gateway.auth import warn_if_exposed
from gateway.config import GatewaySettings
from gateway.context import GatewayContext
from gateway.grpc_service import HealthReporter, build_grpc_server
from gateway.http_app import AccessLog, ServerLog, create_app, create_health_app
from gateway.tls import grpc_server_credentials, http_ssl_context, tls_enabled
from gateway.triton_client import TritonClient
from gateway.triton_targets import endpoint_url
from lipsync.triton_supervisor import SupervisorView

log = logging.getLogger(__name__)


class GatewayServer:
    """Runs the gRPC server and the aiohttp app for one `GatewayContext`.

    Args:
        settings: the gateway configuration.
        grace_s: how long `stop` lets in-flight requests finish (s).
        triton_client: the Triton client (default: one on ``settings.triton_url``; the fast
            tests pass an in-process fake).
        supervisor: the supervisor keeping that Triton running (``lipsync up``), None when
            Triton is run by someone else (`GatewayContext.create`).
        reuse_port: bind every port (gRPC, HTTP, health) with ``SO_REUSEPORT`` (a worker of
            several sharing them, `gateway.worker`); the ports must then be given, not 0.
        before_serving: awaited with the context once it is built, before the ports are bound
            (a worker loads there the packages the other workers loaded on request).
    """

    def __init__(
        self,
        settings: GatewaySettings,
        *,
        grace_s: float = 2.0,
        triton_client: TritonClient | None = None,
        supervisor: SupervisorView | None = None,
        reuse_port: bool = False,
        before_serving: Callable[[GatewayContext], Awaitable[None]] | None = None,
    ) -> None:
        self.settings = settings
        self.reuse_port = reuse_port
        self.before_serving = before_serving
        self.grace_s = grace_s
        self.triton_client = triton_client
        self.supervisor = supervisor
        self.ctx: GatewayContext | None = None
        self.grpc_port: int = 0
        self.http_port: int = 0
        self.health_port: int | None = None
        self._grpc: grpc.aio.Server | None = None
        self._health: HealthReporter | None = None
        self._runner: web.AppRunner | None = None
        self._health_runner: web.AppRunner | None = None

    @property
    def http_app(self) -> web.Application:
        """The running aiohttp application (its router lists every route)."""
        assert self._runner is not None, "gateway not started"
        return self._runner.app

    @property
    def grpc_address(self) -> str:
        """``host:port`` a local client dials for gRPC."""
        return f"{self._client_host()}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        """``http(s)://host:port`` of the aiohttp app (web page, WebSocket at ``/ws``)."""
        scheme = "https" if tls_enabled(self.settings) else "http"
        return f"{scheme}://{self._client_host()}:{self.http_port}"

    def _client_host(self) -> str:
        host = self.settings.host
        return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host

    async def start(self) -> None:
        """Build the context (Triton client, avatars), then start gRPC and HTTP.

        Raises:
            OSError: a port cannot be bound.
            gateway.tls.TlsConfigError: a TLS file cannot be used (before anything starts).
        """
        s = self.settings
        warn_if_exposed(s)
        credentials, ssl_context = grpc_server_credentials(s), http_ssl_context(s)
        self.ctx = await GatewayContext.create(s, self.triton_client, self.supervisor)
        try:
            if self.before_serving is not None:
                await self.before_serving(self.ctx)
            self._grpc, self._health = build_grpc_server(self.ctx, reuse_port=self.reuse_port)
            address = endpoint_url(s.host, s.grpc_port)
            self.grpc_port = (
                self._grpc.add_secure_port(address, credentials)
                if credentials is not None
                else self._grpc.add_insecure_port(address)
            )
            if self.grpc_port == 0:
                raise OSError(f"cannot bind the gRPC port {s.host}:{s.grpc_port}")
            await self._grpc.start()
            await self._health.start()

            app = create_app(self.ctx)
            # HTTP handlers still running at stop get grace_s too (aiohttp's default: 60 s)
            self._runner = web.AppRunner(
                app,
                handle_signals=False,
                shutdown_timeout=self.grace_s,
                logger=ServerLog(self.ctx.malformed),  # requests aiohttp could not parse
                access_log_class=AccessLog,  # less the malformed ones, no token
            )
            self.http_port = await self._serve(self._runner, s.http_port, ssl_context)
            if s.health_port is not None:
                self._health_runner = web.AppRunner(
                    create_health_app(self.ctx), handle_signals=False, access_log_class=AccessLog
                )
                self.health_port = await self._serve(self._health_runner, s.health_port, None)
        except BaseException:
            await self.stop()
            raise
        log.info(
            "gateway serving: gRPC %s, HTTP %s (ready=%s)", self.grpc_address, self.http_url, self.ctx.ready()
        )

    async def _serve(self, runner: web.AppRunner, port: int, ssl_context: ssl.SSLContext | None) -> int:
        """Set ``runner`` up on ``host:port``; returns the bound port."""
        await runner.setup()
        site = web.TCPSite(
            runner, self.settings.host, port, ssl_context=ssl_context, reuse_port=self.reuse_port or None
        )
        await site.start()
        addresses = runner.addresses  # bound (host, port, ...) tuples
        return int(addresses[0][1]) if addresses else port

    async def stop(self) -> None:
        """Stop both servers (in-flight requests get ``grace_s``), then the context."""
        if self._health is not None:
            await self._health.stop()
            self._health = None
        if self._grpc is not None:
            await self._grpc.stop(self.grace_s)
            self._grpc = None
        for runner in (self._runner, self._health_runner):
            if runner is not None:
                await runner.cleanup()
        self._runner = self._health_runner = None
        if self.ctx is not None:
            await self.ctx.close()
            self.ctx = None
        log.info("gateway stopped")
