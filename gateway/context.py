"""`GatewayContext`: the objects one gateway process shares between its protocols.

Built once by `GatewayServer` (or a test) inside the running event loop with
`GatewayContext.create(settings)`; both the gRPC service and the aiohttp app
(`gateway.http_app`) receive it.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from gateway.audio_features import AudioFeatureExtractor
from gateway.config import GatewaySettings
from gateway.jpeg import make_encoder
from gateway.metrics import GatewayMetrics
from gateway.pipeline import AdmissionControl, ConnectionLimiter, FramePipeline
from gateway.store import AvatarStore
from gateway.triton import TritonClient

log = logging.getLogger(__name__)


@dataclass
class GatewayContext:
    """Shared state of a gateway.

    Attributes:
        settings: the configuration.
        metrics: Prometheus series (own registry).
        triton: async Triton client with its readiness monitor.
        store: loaded avatars.
        pipeline: the frame renderer.
        audio: live-audio feature extractor (Triton ``audio_encoder``).
        executor: thread pool for paste back + JPEG.
        started_at: wall-clock start (``time.time()``, s).
    """

    settings: GatewaySettings
    metrics: GatewayMetrics
    triton: TritonClient
    store: AvatarStore
    pipeline: FramePipeline
    audio: AudioFeatureExtractor
    executor: ThreadPoolExecutor
    started_at: float

    @classmethod
    async def create(cls, settings: GatewaySettings) -> "GatewayContext":
        """Build and start everything: Triton client + monitor, then load every package.

        Must run inside the event loop that will serve requests. Never fails because Triton
        is down: the gateway starts not-ready and becomes ready when Triton is. If loading
        the packages fails otherwise (or is cancelled), the Triton client is closed again.
        """
        metrics = GatewayMetrics()
        triton = TritonClient(
            settings.triton_url,
            timeout_s=settings.triton_timeout_s,
            probe_timeout_s=settings.triton_probe_timeout_s,
            load_timeout_s=settings.triton_load_timeout_s,
            poll_interval_s=settings.triton_poll_interval_s,
            load_models=settings.triton_load_models,
            metrics=metrics,
        )
        await triton.start()
        store = AvatarStore(settings.packages_root, triton)
        try:
            await store.load_all()
            await triton.register_model(settings.audio_encoder_model, required=False)
        except BaseException:  # do not leave the monitor task and the channel behind
            await triton.close()
            raise
        executor = ThreadPoolExecutor(max_workers=settings.jpeg_threads, thread_name_prefix="composite")
        encoder = make_encoder(settings.jpeg_encoder, settings.jpeg_quality, settings.jpeg_subsampling)
        admission = AdmissionControl(settings.max_in_flight_total, metrics)
        pipeline = FramePipeline(store, triton, encoder, executor, admission, metrics)
        ctx = cls(
            settings=settings,
            metrics=metrics,
            triton=triton,
            store=store,
            pipeline=pipeline,
            audio=AudioFeatureExtractor(triton, settings.audio_encoder_model),
            executor=executor,
            started_at=time.time(),
        )
        log.info(
            "gateway context ready=%s: %d avatars (%s), Triton %s, JPEG %s q%d %s",
            ctx.ready(), len(store), ", ".join(store.names()) or "none",
            settings.triton_url, encoder.name, settings.jpeg_quality, encoder.subsampling,
        )
        return ctx

    def ready(self) -> bool:
        """True when Triton is ready with every avatar model loaded and an avatar is served."""
        return self.triton.ready and len(self.store) > 0

    def uptime_s(self) -> float:
        """Seconds since the context was created."""
        return time.time() - self.started_at

    def new_connection_limiter(self) -> ConnectionLimiter:
        """A per-connection in-flight limiter (``max_in_flight_per_connection``)."""
        return ConnectionLimiter(self.settings.max_in_flight_per_connection)

    async def close(self) -> None:
        """Stop the Triton monitor, close the channel, shut the thread pool down."""
        await self.triton.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
