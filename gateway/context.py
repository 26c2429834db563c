"""`GatewayContext`: the objects one gateway process shares between its protocols.

Built once by `GatewayServer` (or a test) inside the running event loop with
`GatewayContext.create(settings)`; both the gRPC service and the aiohttp app
(`gateway.http_app`) receive it. The Triton side is three objects (docs/ARCHITECTURE.md):
the stateless client (`gateway.triton_client`), the model lifecycle
(`gateway.model_lifecycle`) and the guarded facade the pipeline calls (`gateway.inference`).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from gateway.audio_features import AudioFeatureExtractor
from gateway.batching import CoalescingInference
from gateway.compositor import Compositor, JpegMode
from gateway.config import GatewaySettings
from gateway.inference import GuardedInference
from gateway.jpeg import RestartIntervalEncoder, make_encoder
from gateway.live_render import TritonAudioEncoder
from gateway.live_service import LiveSessions
from gateway.metrics import GatewayMetrics
from gateway.model_lifecycle import LifecycleSnapshot, ModelLifecycle
from gateway.pipeline import AdmissionControl, ConnectionLimiter, FramePipeline
from gateway.store import AvatarStore
from gateway.triton_client import InferenceClient, TritonClient, TritonGrpcClient
from gateway.triton_shm import SharedMemoryUnet

log = logging.getLogger(__name__)

ReadyWatcher = Callable[[bool], None]


@dataclass
class GatewayContext:
    """Shared state of a gateway.

    Attributes:
        settings: the configuration.
        metrics: Prometheus series (own registry).
        client: the stateless Triton client (`TritonGrpcClient`: one channel).
        lifecycle: Triton's server and model states.
        store: loaded avatars.
        pipeline: the frame renderer (the one entry point for frames).
        live: the live sessions (issue 10), served by both transports.
        executor: thread pool for paste back + JPEG.
        started_at: wall-clock start (``time.time()``, s).
        triton_shm: the UNet's shared-memory transport (`gateway.triton_shm`), None when off.
    """

    settings: GatewaySettings
    metrics: GatewayMetrics
    client: TritonClient
    lifecycle: ModelLifecycle
    store: AvatarStore
    pipeline: FramePipeline
    live: LiveSessions
    executor: ThreadPoolExecutor
    started_at: float
    triton_shm: SharedMemoryUnet | None = None
    _ready_watchers: list[ReadyWatcher] = field(default_factory=list, init=False, repr=False)
    _last_ready: bool = field(default=False, init=False, repr=False)

    @classmethod
    async def create(cls, settings: GatewaySettings, client: TritonClient | None = None) -> GatewayContext:
        """Build and start everything: Triton client and lifecycle, then load every package.

        Must run inside the event loop that will serve requests. Never fails because Triton
        is down: the gateway starts not-ready and becomes ready when Triton is. If loading
        the packages fails otherwise (or is cancelled), the lifecycle and client are closed.

        Args:
            settings: the configuration.
            client: the Triton client to use (default: a `TritonGrpcClient` on
                ``settings.triton_url``; the fast tests pass an in-process fake).
        """
        metrics = GatewayMetrics()
        own_client = client is None
        if client is None:
            key = settings.triton_control_key
            client = TritonGrpcClient(
                settings.triton_url,
                timeout_s=settings.triton_timeout_s,
                probe_timeout_s=settings.triton_probe_timeout_s,
                load_timeout_s=settings.triton_load_timeout_s,
                control_key=key.get_secret_value() if key is not None else None,
            )
        lifecycle = ModelLifecycle(
            client, probe_interval_s=settings.triton_poll_interval_s, load_models=settings.triton_load_models
        )
        lifecycle.subscribe(lambda s: metrics.triton_ready.set(1.0 if s.ready else 0.0))
        compositor = Compositor(
            make_encoder(settings.jpeg_encoder, settings.jpeg_quality, settings.jpeg_subsampling),
            RestartIntervalEncoder(settings.jpeg_quality, settings.jpeg_subsampling, settings.jpeg_restart_px),
            splice=settings.jpeg_splice,
        )
        store = AvatarStore(settings.packages_root, lifecycle, compositor.backgrounds)
        try:
            await lifecycle.start()
            await store.load_all()
            await lifecycle.register(settings.audio_encoder_model, required=False)
        except BaseException:  # do not leave the probe task and the channel behind
            await lifecycle.close()
            await client.close()
            raise
        executor = ThreadPoolExecutor(max_workers=settings.jpeg_threads, thread_name_prefix="composite")
        triton_shm = _shared_memory_unet(settings, client) if own_client else None
        inference = GuardedInference(triton_shm or client, lifecycle)
        unet: InferenceClient = (
            CoalescingInference(inference, lifecycle.max_batch_size) if settings.triton_coalesce else inference
        )
        pipeline = FramePipeline(
            store,
            unet,
            AudioFeatureExtractor(inference, settings.audio_encoder_model),
            compositor,
            executor,
            AdmissionControl(settings.max_in_flight_total, metrics),
            metrics,
        )
        live = LiveSessions(
            store,
            pipeline,
            TritonAudioEncoder(inference, settings.audio_encoder_model, settings.live.encoder_timeout_s),
            settings.live,
            metrics,
        )
        ctx = cls(
            settings=settings,
            metrics=metrics,
            client=client,
            lifecycle=lifecycle,
            store=store,
            pipeline=pipeline,
            live=live,
            executor=executor,
            started_at=time.time(),
            triton_shm=triton_shm,
        )
        ctx._last_ready = ctx.ready()
        lifecycle.subscribe(ctx._state_changed)
        store.subscribe(lambda: ctx._state_changed(lifecycle.snapshot()))
        encoder = compositor.encoder
        log.info(
            "gateway context ready=%s: %d avatars (%s), Triton %s, JPEG %s (%s) q%d %s",
            ctx.ready(), len(store), ", ".join(store.names()) or "none", settings.triton_url,
            compositor.mode.mode, encoder.name, settings.jpeg_quality, encoder.subsampling,
        )
        return ctx

    def ready(self) -> bool:
        """Gateway readiness (docs/GLOSSARY.md): Triton ready with every avatar's model, and at
        least one avatar loaded."""
        return self.lifecycle.snapshot().ready and len(self.store) > 0

    def watch_ready(self, watcher: ReadyWatcher) -> Callable[[], None]:
        """Call ``watcher(ready)`` now and whenever `ready` changes (Triton's state or the set
        of avatars), on the event loop.

        Returns:
            A function that stops the calls.
        """
        self._ready_watchers.append(watcher)
        watcher(self.ready())
        return lambda: self._ready_watchers.remove(watcher)

    def _state_changed(self, snapshot: LifecycleSnapshot) -> None:
        ready = snapshot.ready and len(self.store) > 0
        if ready == self._last_ready:
            return
        self._last_ready = ready
        for watcher in list(self._ready_watchers):
            watcher(ready)

    def jpeg_mode(self) -> JpegMode:
        """How full frames are encoded now (``spliced`` or ``full`` and why; `gateway.compositor`)."""
        return self.pipeline.compositor.mode

    def uptime_s(self) -> float:
        """Seconds since the context was created."""
        return time.time() - self.started_at

    def new_connection_limiter(self) -> ConnectionLimiter:
        """A per-connection in-flight limiter (``max_in_flight_per_connection``)."""
        return ConnectionLimiter(self.settings.max_in_flight_per_connection)

    async def close(self) -> None:
        """Stop the lifecycle's probe, close the channel, shut the thread pool down."""
        await self.lifecycle.close()
        if self.triton_shm is not None:
            await self.triton_shm.close()
        await self.client.close()
        self.executor.shutdown(wait=False, cancel_futures=True)


SHM_SPARE_CELLS = 8
"""Frame cells of the shared-memory arena beyond ``max_in_flight_total`` (room for fragmentation)."""


def _shared_memory_unet(settings: GatewaySettings, client: TritonClient) -> SharedMemoryUnet | None:
    """The UNet's shared-memory transport when ``triton_shm`` is ``system`` and ``/dev/shm``
    allows it (else None: plain gRPC, logged)."""
    if settings.triton_shm != "system":
        return None
    try:
        return SharedMemoryUnet(
            client, settings.triton_url, cells=settings.max_in_flight_total + SHM_SPARE_CELLS,
            timeout_s=settings.triton_timeout_s,
        )
    except OSError as exc:
        log.warning("no shared memory for Triton (%s): UNet tensors go over gRPC", exc)
        return None
