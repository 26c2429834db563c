"""`GatewayServer`: one gateway process: the gRPC server and the aiohttp app on one event loop.

```python
server = GatewayServer(GatewaySettings(triton_url="localhost:8001"))
await server.start()        # builds the GatewayContext, binds both ports
...                         # server.grpc_address, server.http_url
await server.stop()         # graceful: stops accepting, finishes in-flight frames (grace s)
```
Ports 0 pick free ports; the bound ones are in ``grpc_port`` / ``http_port`` after `start`.
"""
from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import grpc
from aiohttp import web

from gateway.config import GatewaySettings
from gateway.context import GatewayContext
from gateway.grpc_service import HealthReporter, build_grpc_server
from gateway.http_app import AccessLog, ServerLog, create_app
from gateway.triton_client import TritonClient
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
        reuse_port: bind both ports with ``SO_REUSEPORT`` (a worker of several sharing them,
            `gateway.worker`); the ports must then be given, not 0.
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
        self._grpc: grpc.aio.Server | None = None
        self._health: HealthReporter | None = None
        self._runner: web.AppRunner | None = None

    @property
    def grpc_address(self) -> str:
        """``host:port`` a local client dials for gRPC."""
        return f"{self._client_host()}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        """``http://host:port`` of the aiohttp app (web page, WebSocket at ``/ws``)."""
        return f"http://{self._client_host()}:{self.http_port}"

    def _client_host(self) -> str:
        host = self.settings.host
        return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host

    async def start(self) -> None:
        """Build the context (Triton client, avatars), then start gRPC and HTTP.

        Raises:
            OSError: a port cannot be bound.
        """
        s = self.settings
        self.ctx = await GatewayContext.create(s, self.triton_client, self.supervisor)
        try:
            if self.before_serving is not None:
                await self.before_serving(self.ctx)
            self._grpc, self._health = build_grpc_server(self.ctx, reuse_port=self.reuse_port)
            host = f"[{s.host}]" if ":" in s.host else s.host  # an IPv6 address in brackets
            self.grpc_port = self._grpc.add_insecure_port(f"{host}:{s.grpc_port}")
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
                access_log_class=AccessLog,  # less the malformed ones
            )
            await self._runner.setup()
            site = web.TCPSite(self._runner, s.host, s.http_port, reuse_port=self.reuse_port or None)
            await site.start()
            addresses = self._runner.addresses  # bound (host, port, ...) tuples
            self.http_port = int(addresses[0][1]) if addresses else s.http_port
        except BaseException:
            await self.stop()
            raise
        log.info(
            "gateway serving: gRPC %s, HTTP %s (ready=%s)", self.grpc_address, self.http_url, self.ctx.ready()
        )

    async def stop(self) -> None:
        """Stop both servers (in-flight requests get ``grace_s``), then the context."""
        if self._health is not None:
            await self._health.stop()
            self._health = None
        if self._grpc is not None:
            await self._grpc.stop(self.grace_s)
            self._grpc = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.ctx is not None:
            await self.ctx.close()
            self.ctx = None
        log.info("gateway stopped")
