"""Async Triton client of the gateway: inference calls, readiness monitor, model (re)loading.

One `TritonClient` per gateway wraps ``tritonclient.grpc.aio.InferenceServerClient``. Every
frame is its own concurrent ``infer`` call (batch 1); with many frames in flight from all
streams, Triton's dynamic batcher merges them into one model execution. There is no lock
around calls: concurrency is bounded by the gateway's admission limits, not here.

Failure handling (issue 4 item 6):
- a background task probes server liveness every `poll_interval_s` (deadline
  `probe_timeout_s`) and the readiness of each registered model (`ready` = live and every
  required model ready); a refused connection marks Triton down
  at once, probe deadlines must fail twice in a row (a busy CPU Triton can be slow to answer);
- when Triton goes down, every call in flight is aborted with `TritonUnavailable` (so a killed
  or hung server gives callers an error within about one probe period + probe deadline, never
  a hang), and new calls fail at once without touching the network;
- each call also carries its own deadline (`timeout_s`), generous because it includes queueing
  in Triton (on CPU, 100 ms per frame times the frames in flight);
- when Triton is back (a restarted server in explicit model-control mode has no model loaded)
  the monitor re-issues ``load_model`` for every registered model, so the gateway recovers by
  itself; the gRPC channel's reconnect back-off is capped at 1 s so a restart is seen quickly.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import tritonclient.grpc.aio as grpcclient
from numpy.typing import NDArray
from tritonclient.utils import InferenceServerException

from gateway.errors import TritonUnavailable
from gateway.metrics import GatewayMetrics
from lipsync.contract import ENCODER_FEATURE, ENCODER_MEL, FEATURE_DIM, UNET_AUDIO, UNET_CROP, UNET_PRED

log = logging.getLogger(__name__)


_MAX_MESSAGE = 256 * 1024 * 1024
_LOAD_RETRY_BASE_S = 1.0
_LOAD_RETRY_MAX_S = 30.0
"""Back-off between failed ``load_model`` calls of one model (s), reset when Triton restarts."""


@dataclass
class _ModelState:
    name: str
    required: bool
    loaded: bool = False
    max_batch_size: int = 0
    last_error: str | None = None
    failures: int = 0  # consecutive failed load_model calls
    retry_at: float = 0.0  # time.monotonic() before which no new load_model is issued


@dataclass
class TritonStatus:
    """Snapshot for health endpoints: server reachability and per-model state."""

    server_ready: bool
    ready: bool
    url: str
    models: dict[str, bool] = field(default_factory=dict)
    last_error: str | None = None


class TritonClient:
    """Async Triton gRPC client with a readiness monitor and automatic model (re)loading.

    Args:
        url: Triton gRPC endpoint ``host:port``.
        timeout_s: deadline of each inference call, queueing in Triton included (s).
        probe_timeout_s: deadline of each readiness probe (s).
        load_timeout_s: deadline of each ``load_model`` call (s).
        poll_interval_s: readiness monitor period (s).
        load_models: whether to issue ``load_model`` (explicit model-control mode). When False
            the monitor only checks that the models are ready.
        metrics: where the ``triton_ready`` gauge lives (optional).

    Call `start()` inside the running event loop and `close()` at the end.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 30.0,
        probe_timeout_s: float = 1.0,
        load_timeout_s: float = 120.0,
        poll_interval_s: float = 0.5,
        load_models: bool = True,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.probe_timeout_s = probe_timeout_s
        self.load_timeout_s = load_timeout_s
        self.poll_interval_s = poll_interval_s
        self.load_models = load_models
        self._metrics = metrics
        self._client: grpcclient.InferenceServerClient | None = None
        self._models: dict[str, _ModelState] = {}
        self._server_ready = False
        self._last_error: str | None = "not started"
        self._monitor: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._sync_lock = asyncio.Lock()  # serialises (re)loading, never inference
        self._probe_timeouts = 0
        self._outage: asyncio.Future[str] | None = None  # resolved when Triton goes down
        self._loading: dict[str, asyncio.Task[None]] = {}

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Open the channel, run one readiness check (loading models), start the monitor."""
        channel_args = [
            ("grpc.max_send_message_length", _MAX_MESSAGE),
            ("grpc.max_receive_message_length", _MAX_MESSAGE),
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 1000),
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 2_000),
        ]
        self._client = grpcclient.InferenceServerClient(self.url, channel_args=channel_args)
        self._wake = asyncio.Event()
        self._outage = asyncio.get_running_loop().create_future()
        await self.sync()
        await self.wait_loading()
        self._monitor = asyncio.create_task(self._monitor_loop(), name="triton-monitor")

    async def close(self) -> None:
        """Stop the monitor and close the channel."""
        if self._monitor is not None:
            self._monitor.cancel()
            try:
                await self._monitor
            except asyncio.CancelledError:
                pass
            self._monitor = None
        for task in list(self._loading.values()):
            task.cancel()
        await asyncio.gather(*self._loading.values(), return_exceptions=True)
        self._loading.clear()
        if self._client is not None:
            await self._client.close()
            self._client = None

    # ------------------------------------------------------------------ state
    @property
    def ready(self) -> bool:
        """True when the server is ready and every *required* model is loaded."""
        return self._server_ready and all(m.loaded for m in self._models.values() if m.required)

    @property
    def server_live(self) -> bool:
        """True when the last probe reached a live Triton."""
        return self._server_ready

    def model_error(self, name: str) -> str | None:
        """Why model ``name`` is not loaded (Triton's message), if known."""
        state = self._models.get(name)
        return state.last_error if state else None

    def unregister_model(self, name: str) -> None:
        """Stop keeping model ``name`` loaded (it no longer counts for `ready`)."""
        self._models.pop(name, None)

    def model_ready(self, name: str) -> bool:
        """True when the server is ready and model ``name`` is loaded."""
        state = self._models.get(name)
        return self._server_ready and state is not None and state.loaded

    def status(self) -> TritonStatus:
        """A snapshot of readiness for health endpoints."""
        return TritonStatus(
            server_ready=self._server_ready,
            ready=self.ready,
            url=self.url,
            models={n: m.loaded for n, m in self._models.items()},
            last_error=self._last_error,
        )

    def max_batch_size(self, name: str) -> int:
        """The model's ``max_batch_size`` from its Triton config (0 if unknown)."""
        state = self._models.get(name)
        return state.max_batch_size if state else 0

    async def register_model(self, name: str, *, required: bool = True) -> None:
        """Keep model ``name`` loaded from now on; load it now (and wait) if Triton is up.

        ``required`` models count for `ready`; optional ones (the audio encoder) do not.
        Never raises for Triton trouble: the monitor keeps retrying.
        """
        if name not in self._models:
            self._models[name] = _ModelState(name=name, required=required)
        else:
            state = self._models[name]
            state.required = state.required or required
            state.failures, state.retry_at = 0, 0.0  # an explicit request retries at once
        if self._client is not None:
            await self.sync()
            await self.wait_loading(name)

    async def wait_loading(self, *names: str) -> None:
        """Wait for the ``load_model`` calls in progress (of ``names``, or all)."""
        tasks = [t for n, t in self._loading.items() if not names or n in names]
        if tasks:
            await asyncio.gather(*(asyncio.shield(t) for t in tasks), return_exceptions=True)

    # ------------------------------------------------------------------ monitor
    async def _monitor_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.poll_interval_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the monitor must survive anything
                log.exception("Triton readiness check failed unexpectedly")

    async def sync(self) -> None:
        """Probe server readiness and each model; start loading models that are not loaded.

        Loading runs in background tasks (`wait_loading` waits for them), so a slow
        ``load_model`` never delays outage detection.
        """
        assert self._client is not None, "TritonClient.start() was not called"
        async with self._sync_lock:
            was_ready = self.ready
            try:
                # Liveness, not /ready: with strict readiness Triton reports "not ready" while
                # any model is loading, which is not an outage for the models already served.
                server_ready = bool(
                    await self._client.is_server_live(client_timeout=self.probe_timeout_s)
                )
                self._probe_timeouts = 0
                if not server_ready:
                    self._last_error = f"Triton at {self.url} reports not live"
            except InferenceServerException as exc:
                server_ready = False
                self._last_error = f"Triton at {self.url} unreachable: {_describe(exc)}"
                if exc.status() == "StatusCode.DEADLINE_EXCEEDED":
                    self._probe_timeouts += 1
                    if self._probe_timeouts < 2 and self._server_ready:
                        server_ready = True  # one slow probe is not an outage
                        log.debug("slow Triton readiness probe (%s)", self._last_error)
            if self._server_ready and not server_ready:
                self._declare_outage(self._last_error or "Triton not ready")
            if server_ready and self._outage is not None and self._outage.done():
                self._outage = asyncio.get_running_loop().create_future()
            self._server_ready = server_ready
            if not server_ready:
                for m in self._models.values():
                    m.loaded = False
                    m.failures, m.retry_at = 0, 0.0  # a restarted server deserves a fresh try
            else:
                for m in list(self._models.values()):
                    if m.name not in self._loading:
                        await self._check_model(m)
            self._publish(was_ready)

    def _publish(self, was_ready: bool) -> None:
        now_ready = self.ready
        if now_ready:
            self._last_error = None
        elif self._server_ready:
            missing = [m for m in self._models.values() if m.required and not m.loaded]
            if missing:
                m = missing[0]
                self._last_error = f"model {m.name!r} is not loaded in Triton ({m.last_error or 'loading'})"
        if self._metrics is not None:
            self._metrics.triton_ready.set(1.0 if now_ready else 0.0)
        if now_ready != was_ready:
            if now_ready:
                loaded = sum(m.loaded for m in self._models.values())
                log.info("Triton at %s is ready (%d of %d models loaded)", self.url, loaded, len(self._models))
            else:
                log.warning("Triton not ready: %s", self._last_error)

    async def _check_model(self, m: _ModelState) -> None:
        assert self._client is not None
        try:
            ready = bool(await self._client.is_model_ready(m.name, client_timeout=self.probe_timeout_s))
        except InferenceServerException as exc:
            if m.loaded and exc.status() == "StatusCode.DEADLINE_EXCEEDED":
                # A busy server answering late is not a model gone: keep serving it, and never
                # answer a slow probe with a load_model (which would reload a loaded model).
                log.debug("slow model-ready probe for %s: %s", m.name, _describe(exc))
                return
            ready = False
            m.last_error = _describe(exc)
        if ready:
            await self._read_config(m)
        elif self.load_models and time.monotonic() >= m.retry_at:
            self._loading[m.name] = asyncio.create_task(self._load(m), name=f"triton-load-{m.name}")
        m.loaded = ready

    async def _load(self, m: _ModelState) -> None:
        assert self._client is not None
        was_ready = self.ready
        t0 = time.perf_counter()
        try:
            await self._client.load_model(m.name, client_timeout=self.load_timeout_s)
            m.loaded = bool(await self._client.is_model_ready(m.name, client_timeout=self.probe_timeout_s))
            if m.loaded:
                m.last_error = None
                m.failures, m.retry_at = 0, 0.0
                await self._read_config(m)
                log.info("Triton loaded model %s in %.0f ms", m.name, (time.perf_counter() - t0) * 1e3)
        except InferenceServerException as exc:
            m.loaded = False
            m.last_error = f"load_model({m.name!r}) failed: {_describe(exc)}"
            m.failures += 1
            delay = min(_LOAD_RETRY_MAX_S, _LOAD_RETRY_BASE_S * 2 ** (m.failures - 1))
            m.retry_at = time.monotonic() + delay
            level = logging.WARNING if m.failures == 1 else logging.DEBUG
            log.log(level, "%s (retry in %.0f s)", m.last_error, delay)
        finally:
            self._loading.pop(m.name, None)
            self._publish(was_ready)

    async def _read_config(self, m: _ModelState) -> None:
        if m.max_batch_size:
            return
        assert self._client is not None
        try:
            cfg = await self._client.get_model_config(m.name, as_json=True, client_timeout=self.probe_timeout_s)
            m.max_batch_size = int(cfg["config"].get("max_batch_size", 0))
        except (InferenceServerException, KeyError, ValueError) as exc:
            log.warning("could not read the config of %s: %s", m.name, exc)

    def _declare_outage(self, reason: str) -> None:
        """Triton went down: abort every inference call in flight."""
        if self._outage is not None and not self._outage.done():
            self._outage.set_result(reason)

    def _note_failure(self) -> None:
        """An inference call failed: re-check readiness now rather than at the next tick."""
        self._wake.set()

    # ------------------------------------------------------------------ inference
    def _check_callable(self, model: str) -> grpcclient.InferenceServerClient:
        if self._client is None:
            raise TritonUnavailable("the Triton client is not started")
        if not self._server_ready:
            raise TritonUnavailable(
                f"Triton at {self.url} is not ready ({self._last_error or 'unreachable'})"
            )
        state = self._models.get(model)
        if state is not None and not state.loaded:
            raise TritonUnavailable(
                f"model {model!r} is not loaded in Triton ({state.last_error or 'loading'})"
            )
        return self._client

    async def _infer(
        self, model: str, inputs: list[grpcclient.InferInput], output: str
    ) -> NDArray:
        client = self._check_callable(model)
        outage = self._outage
        call = asyncio.ensure_future(
            client.infer(
                model,
                inputs,
                outputs=[grpcclient.InferRequestedOutput(output)],
                client_timeout=self.timeout_s,
            )
        )
        try:
            if outage is not None:
                await asyncio.wait((call, outage), return_when=asyncio.FIRST_COMPLETED)
                if not call.done():
                    call.cancel()
                    raise TritonUnavailable(
                        f"Triton went down while {model!r} was inferring: {outage.result()}"
                    )
            result = await call
        except TritonUnavailable:
            self._note_failure()
            raise
        except InferenceServerException as exc:
            self._note_failure()
            raise TritonUnavailable(f"Triton inference on {model!r} failed: {_describe(exc)}") from exc
        except asyncio.CancelledError:
            call.cancel()
            raise
        except Exception as exc:  # grpc/aio internals on a closing channel
            self._note_failure()
            raise TritonUnavailable(f"Triton inference on {model!r} failed: {exc!r}") from exc
        array = result.as_numpy(output)
        if array is None:
            raise TritonUnavailable(f"Triton answer from {model!r} has no output {output!r}")
        return array

    async def infer_unet(
        self, model: str, crop: NDArray[np.uint8], audio: NDArray[np.float32]
    ) -> NDArray[np.uint8]:
        """Run an avatar UNet (ARCHITECTURE.md "Triton model contract").

        Args:
            model: Triton model name (``lipsync_<avatar>``).
            crop: uint8 ``[N, 320, 320, 3]`` BGR inner crops, C-contiguous.
            audio: float32 ``[N, 16, 512]`` audio windows.

        Returns:
            uint8 ``[N, 320, 320, 3]`` BGR predictions.

        Raises:
            TritonUnavailable: Triton down, model not loaded, deadline passed, or a bad answer.
        """
        i_crop = grpcclient.InferInput(UNET_CROP.name, list(crop.shape), UNET_CROP.triton_dtype)
        i_crop.set_data_from_numpy(np.ascontiguousarray(crop))
        i_audio = grpcclient.InferInput(UNET_AUDIO.name, list(audio.shape), UNET_AUDIO.triton_dtype)
        i_audio.set_data_from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
        pred = await self._infer(model, [i_crop, i_audio], UNET_PRED.name)
        if pred.dtype != np.uint8 or pred.shape != crop.shape:
            raise TritonUnavailable(
                f"model {model!r} answered {pred.dtype} {list(pred.shape)}, expected uint8 {list(crop.shape)}"
            )
        return pred

    async def infer_audio_encoder(self, model: str, mel: NDArray[np.float32]) -> NDArray[np.float32]:
        """Run the AVE audio encoder on mel windows, split to the model's max batch size.

        Args:
            model: Triton model name (``audio_encoder``).
            mel: float32 ``[N, 80, 16]`` mel windows (REFERENCE.md s.4).

        Returns:
            float32 ``[N, 512]`` features.

        Raises:
            TritonUnavailable: as `infer_unet`.
        """
        mel = np.ascontiguousarray(mel, dtype=np.float32)
        step = self.max_batch_size(model) or len(mel)
        parts = []
        for lo in range(0, len(mel), max(step, 1)):
            chunk = mel[lo : lo + step]
            inp = grpcclient.InferInput(ENCODER_MEL.name, list(chunk.shape), ENCODER_MEL.triton_dtype)
            inp.set_data_from_numpy(chunk)
            parts.append(self._infer(model, [inp], ENCODER_FEATURE.name))
        outs = await asyncio.gather(*parts)
        feats = np.concatenate(outs, axis=0).astype(np.float32, copy=False)
        if feats.shape != (len(mel), FEATURE_DIM):
            raise TritonUnavailable(f"model {model!r} answered {list(feats.shape)}, expected [{len(mel)}, {FEATURE_DIM}]")
        return feats

    async def inference_statistics(self, model: str) -> dict:
        """Triton's own statistics of ``model`` (``inference_count``, ``execution_count``...)."""
        client = self._check_callable(model)
        try:
            stats = await client.get_inference_statistics(model, as_json=True, client_timeout=self.timeout_s)
        except InferenceServerException as exc:
            raise TritonUnavailable(f"statistics of {model!r} unavailable: {_describe(exc)}") from exc
        return stats["model_stats"][0]


def _describe(exc: InferenceServerException) -> str:
    status = exc.status() if hasattr(exc, "status") else None
    msg = exc.message() if hasattr(exc, "message") else str(exc)
    return f"{status}: {msg}" if status else str(msg)
