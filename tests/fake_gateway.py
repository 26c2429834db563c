"""A whole gateway context against the in-process `tests.fake_triton.FakeTriton`, for the fast
tier: the real store (packages from `make_package`), lifecycle, pipeline, JPEG encoder, metrics
and protocol adapters; only Triton is the fake.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from gateway.config import GatewaySettings
from gateway.context import GatewayContext
from gateway.server import GatewayServer
from tests.fake_triton import FakeTriton

T = TypeVar("T")


def fake_settings(packages_root: Path, fake: FakeTriton, **overrides: Any) -> GatewaySettings:
    """Settings for a gateway on the fake: loopback, free ports, JPEG q95, no periodic probe
    (tests call `ModelLifecycle.probe_once` themselves), plus ``overrides``."""
    values: dict[str, Any] = dict(
        triton_url=fake.url,
        host="127.0.0.1",
        grpc_port=0,
        http_port=0,
        packages_root=packages_root,
        jpeg_quality=95,
        triton_poll_interval_s=3600.0,
    )
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


def on_fake_server(
    root: Path, fake: FakeTriton, body: Callable[[GatewayServer, FakeTriton], Awaitable[T]], **overrides: Any
) -> T:
    """Run ``body(server, fake)`` on a fresh event loop with a `GatewayServer` (loopback ports)
    over the fake; stopped after."""

    async def run() -> T:
        server = GatewayServer(fake_settings(root, fake, **overrides), grace_s=0.5, triton_client=fake)
        await server.start()
        try:
            return await body(server, fake)
        finally:
            await server.stop()

    return asyncio.run(run())
