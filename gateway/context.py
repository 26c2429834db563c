"""`GatewayContext`: the objects one gateway process shares between its protocols.

Built once by `GatewayServer` (or a test) inside the running event loop with
`GatewayContext.create(settings)`; both the gRPC service and the aiohttp app
(`gateway.http_app`) receive it. The Triton side is the endpoint pool
(`gateway.endpoint_pool`): per Triton endpoint a stateless client (`gateway.triton_client`), a
model lifecycle (`gateway.model_lifecycle`) and a guarded facade (`gateway.inference`); the
pool routes the pipeline's calls over them and keeps every avatar's model loaded on each.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.audio_features import AudioFeatureExtractor
from gateway.background_cache import SUBFOLDER, BackgroundCache
from gateway.batching import CoalescingInference
from gateway.composite_pool import CompositePool
from gateway.compositor import Compositor, JpegMode
from gateway.config import GatewaySettings
from gateway.crop_cache import CropCache
from gateway.endpoint_pool import ClientFactory, EndpointPool
from gateway.jpeg import RestartIntervalEncoder, make_encoder
from gateway.limits import AuxiliaryWork, ClientLimiter, PeerLimiter
from gateway.live_render import TritonAudioEncoder
from gateway.live_service import LiveSessions
from gateway.malformed import MalformedInput
from gateway.metrics import GatewayMetrics
from gateway.model_lifecycle import LifecycleSnapshot
from gateway.pipeline import AdmissionControl, FramePipeline
from gateway.store import AvatarStore
from gateway.triton_client import InferenceClient, TritonClient, TritonGrpcClient
from gateway.triton_shm import SharedMemoryUnet, StagedInputs
from gateway.triton_supervision import TritonSupervision
from gateway.triton_targets import Resolver, parse_targets, system_resolver
from lipsync.triton_supervisor import SupervisorView

log = logging.getLogger(__name__)

ReadyWatcher = Callable[[bool], None]


@dataclass
class GatewayContext:
    """Shared state of a gateway.

    Attributes:
        settings: the configuration.
        metrics: Prometheus series (own registry).
        lifecycle: the Triton endpoints (`EndpointPool`): their server and model states,
            combined (`EndpointPool.snapshot`) and per endpoint (`EndpointPool.endpoints`); also
            the pipeline's inference client.
        store: loaded avatars.
        pipeline: the frame renderer (the one entry point for frames).
        malformed: where the protocol adapters report input that does not decode.
        supervision: the supervisor of the gateway's tritonserver as the gateway shows it
            (``lipsync up``), None when Triton is run by someone else (``lipsync gateway``).
        live: the live sessions (issue 10), served by both transports.
        executor: the threads for paste back + JPEG (`gateway.composite_pool`).
        started_at: wall-clock start (``time.time()``, s).
        peers: the per-peer in-flight cap (`gateway.limits.PeerLimiter`).
        aux: bounded work beside frame rendering and its pool (`gateway.limits.AuxiliaryWork`).
    """

    settings: GatewaySettings
    metrics: GatewayMetrics
    lifecycle: EndpointPool
    store: AvatarStore
    pipeline: FramePipeline
    malformed: MalformedInput
    supervision: TritonSupervision | None
    live: LiveSessions
    executor: CompositePool
    started_at: float
    peers: PeerLimiter
    aux: AuxiliaryWork
    _ready_watchers: list[ReadyWatcher] = field(default_factory=list, init=False, repr=False)
    _last_ready: bool = field(default=False, init=False, repr=False)

    @classmethod
    async def create(
        cls,
        settings: GatewaySettings,
        client: TritonClient | None = None,
        supervisor: SupervisorView | None = None,
        *,
        connect: ClientFactory | None = None,
        resolver: Resolver | None = system_resolver,
    ) -> GatewayContext:
        """Build and start everything: the Triton endpoints, then load every package.

        Must run inside the event loop that will serve requests. Never fails because Triton
        is down: the gateway starts not-ready and becomes ready when a Triton is. If loading
        the packages fails otherwise (or is cancelled), the endpoints are closed.

        Args:
            settings: the configuration (``triton_url``: the endpoints).
            client: one Triton client to use as the only endpoint, its ``url`` not resolved
                (the fast tests pass an in-process fake); overrides ``connect`` and ``resolver``.
            supervisor: the supervisor that keeps that Triton running (``lipsync up``), if any:
                its restarts go to /metrics and /readyz (`gateway.triton_supervision`).
            connect: makes an endpoint's client from its ``host:port`` (default: a
                `TritonGrpcClient` with the settings' deadlines and control key, wrapped in a
                `SharedMemoryUnet` of its own when ``triton_shm`` is ``system``).
            resolver: resolves the host names of ``triton_url`` (None: every target is one
                endpoint as written).
        """
        metrics = GatewayMetrics()
        targets = settings.triton_targets
        if client is not None:
            targets, resolver, connect = parse_targets(client.url), None, _given_client(client)
        pool = EndpointPool(
            targets,
            connect or _shared_memory_factory(settings, _grpc_client_factory(settings)),
            metrics,
            resolver=resolver,
            dns_interval_s=settings.triton_dns_interval_s,
            drain_timeout_s=settings.triton_timeout_s,
            probe_interval_s=settings.triton_poll_interval_s,
            load_models=settings.triton_load_models,
        )
        pool.subscribe(lambda s: metrics.triton_ready.set(1.0 if s.ready else 0.0))
        compositor = make_compositor(settings)
        cache_dir = settings.crop_cache_dir
        crop_cache = CropCache(cache_dir) if cache_dir is not None else None
        store = AvatarStore(
            settings.packages_root, pool, crop_cache, settings.max_avatar_bytes,
            backgrounds=compositor.backgrounds,
        )
        try:
            await pool.start()
            await store.load_all()
            await pool.register(settings.audio_encoder_model, required=False)
        except BaseException:  # do not leave the probe tasks and the channels behind
            await pool.close()
            raise
        executor = CompositePool(settings.jpeg_threads, "composite", asyncio.get_running_loop())
        aux = AuxiliaryWork.create(settings.aux_threads, settings.max_aux_in_flight, metrics)
        unet: InferenceClient = (
            CoalescingInference(pool, pool.max_batch_size, _stage_in_shared_memory(pool))
            if settings.triton_coalesce
            else pool
        )
        pipeline = FramePipeline(
            store,
            unet,
            AudioFeatureExtractor(pool, settings.audio_encoder_model, aux.executor),
            compositor,
            executor,
            AdmissionControl(settings.max_in_flight_total, metrics),
            metrics,
        )
        live = LiveSessions(
            store,
            pipeline,
            TritonAudioEncoder(pool, settings.audio_encoder_model, settings.live.encoder_timeout_s),
            settings.live,
            metrics,
        )
        supervision = None if supervisor is None else TritonSupervision(supervisor, metrics.scrape_registry)
        ctx = cls(
            settings=settings,
            metrics=metrics,
            lifecycle=pool,
            store=store,
            pipeline=pipeline,
            malformed=MalformedInput(metrics.malformed_requests, settings.malformed_log_interval_s),
            supervision=supervision,
            live=live,
            executor=executor,
            started_at=time.time(),
            peers=PeerLimiter(settings.max_in_flight_per_peer, metrics),
            aux=aux,
        )
        ctx._last_ready = ctx.ready()
        pool.subscribe(ctx._state_changed)
        store.subscribe(lambda: ctx._state_changed(pool.snapshot()))
        if ctx.supervision is not None:
            ctx.watch_ready(ctx.supervision.note_ready)
        encoder = compositor.encoder
        log.info(
            "gateway context ready=%s: %d avatars (%s), Triton %s, JPEG %s (%s) q%d %s",
            ctx.ready(),
            len(store),
            ", ".join(store.names()) or "none",
            settings.triton_url,
            compositor.mode.mode,
            encoder.name,
            settings.jpeg_quality,
            encoder.subsampling,
        )
        return ctx

    def ready(self) -> bool:
        """Gateway readiness (docs/GLOSSARY.md): every avatar's model ready on at least one live
        Triton endpoint (`gateway.endpoint_pool`, "Readiness rule"), and at least one avatar
        loaded."""
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

    def shared_memory(self) -> list[SharedMemoryUnet]:
        """The UNet's shared-memory transports, one per Triton endpoint (`gateway.triton_shm`;
        empty when ``triton_shm`` is ``none`` or ``/dev/shm`` is unusable)."""
        return [c for c in self.lifecycle.clients() if isinstance(c, SharedMemoryUnet)]

    def uptime_s(self) -> float:
        """Seconds since the context was created."""
        return time.time() - self.started_at

    def new_connection_limiter(self, peer: str) -> ClientLimiter:
        """A per-connection in-flight limiter (``max_in_flight_per_connection``) whose every
        slot also holds one of the peer's (``max_in_flight_per_peer``,
        `gateway.limits.ClientLimiter`).

        Args:
            peer: the client's `gateway.limits.peer_address`.
        """
        return ClientLimiter(self.settings.max_in_flight_per_connection, self.peers, peer)

    async def close(self) -> None:
        """Stop following the supervisor, stop the endpoints (probes, DNS, channels), shut the
        thread pools down."""
        if self.supervision is not None:
            self.supervision.close()
        await self.lifecycle.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.aux.close()


def make_compositor(settings: GatewaySettings) -> Compositor:
    """The gateway's compositor: the configured encoder, the restart-interval encoder, splicing
    as set, and the background JPEGs' cache in ``crop_cache_dir``'s ``backgrounds`` folder
    (`gateway.background_cache`; none when ``crop_cache_dir`` is empty)."""
    cache_dir = settings.crop_cache_dir
    return Compositor(
        make_encoder(settings.jpeg_encoder, settings.jpeg_quality, settings.jpeg_subsampling),
        RestartIntervalEncoder(settings.jpeg_quality, settings.jpeg_subsampling, settings.jpeg_restart_px),
        splice=settings.jpeg_splice,
        cache=None if cache_dir is None else BackgroundCache(cache_dir / SUBFOLDER),
    )


def _grpc_client_factory(settings: GatewaySettings) -> ClientFactory:
    """`TritonGrpcClient` per endpoint, with the settings' deadlines and control key."""
    key = settings.triton_control_key

    def connect(url: str) -> TritonClient:
        return TritonGrpcClient(
            url,
            timeout_s=settings.triton_timeout_s,
            probe_timeout_s=settings.triton_probe_timeout_s,
            load_timeout_s=settings.triton_load_timeout_s,
            control_key=key.get_secret_value() if key is not None else None,
            tls=settings.triton_tls,
            tls_ca=str(settings.triton_tls_ca) if settings.triton_tls_ca else None,
        )

    return connect


def _given_client(client: TritonClient) -> ClientFactory:
    """The factory of a pool whose one endpoint is ``client``."""
    return lambda url: client


SHM_SPARE_CELLS = 8
"""Frame cells of each endpoint's shared-memory arena beyond ``max_in_flight_total`` (room for
fragmentation)."""


def _stage_in_shared_memory(pool: EndpointPool) -> Callable[[int], StagedInputs | None]:
    """``stage(n)`` of `gateway.batching.CoalescingInference`: cells of the first endpoint with
    a registered shared-memory arena (the only one with one Triton; with several, a batch
    routed to another endpoint is copied into that one's cells), or None."""

    def stage(n: int) -> StagedInputs | None:
        for client in pool.clients():
            if isinstance(client, SharedMemoryUnet):
                return client.stage(n)
        return None

    return stage


def _shared_memory_factory(settings: GatewaySettings, connect: ClientFactory) -> ClientFactory:
    """``connect`` whose clients carry the UNet's tensors through a shared-memory region of
    their own (`SharedMemoryUnet`, one per endpoint) when ``triton_shm`` is ``system`` and
    ``/dev/shm`` allows it; else ``connect`` itself (plain gRPC, logged). An endpoint on another
    host refuses the region at the first call and gets plain gRPC from its `SharedMemoryUnet`."""
    if settings.triton_shm != "system":
        return connect

    def connect_shm(url: str) -> TritonClient:
        plain = connect(url)
        try:
            return SharedMemoryUnet(
                plain,
                url,
                cells=settings.max_in_flight_total + SHM_SPARE_CELLS,
                timeout_s=settings.triton_timeout_s,
            )
        except OSError as exc:
            log.warning("no shared memory for Triton %s (%s): UNet tensors go over gRPC", url, exc)
            return plain

    return connect_shm
