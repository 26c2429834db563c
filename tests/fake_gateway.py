"""A whole gateway context against the in-process `tests.fake_triton.FakeTriton`, for the fast
tier: the real store (packages from `make_package`), lifecycle, pipeline, JPEG encoder, metrics
and protocol adapters; only Triton is the fake. `on_server` runs a test body against a whole
`GatewayServer` (gRPC and HTTP on free ports) on the fake.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from gateway.config import GatewaySettings
from gateway.context import GatewayContext
from gateway.server import GatewayServer
from tests.fake_triton import FakeTriton, fake_triton

T = TypeVar("T")

AVATAR = "synthetic"
"""The avatar `on_server` serves: 10 random video frames of 64 x 48 px (seed 0)."""


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


def on_server(
    make_package: Callable[..., Path], body: Callable[[GatewayServer, FakeTriton], Awaitable[T]], **settings: Any
) -> T:
    """Run ``await body(server, fake)`` in a new event loop against a started `GatewayServer`
    whose Triton is a fresh fake (identity UNet for `AVATAR`, the audio encoder loaded), with
    `fake_settings` plus ``settings``; the server is stopped afterwards. Returns what ``body``
    returns."""
    frames = np.random.default_rng(0).integers(0, 256, (10, 48, 64, 3), dtype=np.uint8)
    root = make_package(name=AVATAR, frames=frames).parent
    fake = fake_triton(f"lipsync_{AVATAR}", loaded=("audio_encoder",))

    async def run() -> T:
        server = GatewayServer(fake_settings(root, fake, **settings), grace_s=0.5, triton_client=fake)
        await server.start()
        try:
            return await body(server, fake)
        finally:
            await server.stop()

    return asyncio.run(run())
