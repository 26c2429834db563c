"""A whole gateway context against the in-process `tests.fake_triton.FakeTriton`, for the fast
tier: the real store (packages from `make_package`), lifecycle, pipeline, JPEG encoder, metrics
and protocol adapters; only Triton is the fake.
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
from lipsync.contract import AUDIO_ENCODER_MODEL, avatar_model_name
from tests.fake_triton import FakeTriton, fake_triton

T = TypeVar("T")
SYNTHETIC_AVATAR = "synthetic"


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
