"""`AvatarStore`: the avatars a gateway serves, preloaded so per-frame work is pure memory.

At start the store loads every package folder under the packages root with
`lipsync.package.load_package` (which validates schema, shapes, checksums), and again on a
``LoadPackage`` call. For each avatar it precomputes, per *video* frame ``v``
(docs/REFERENCE.md s.2 steps 2-3):

- ``crops[v]``:  uint8 ``[328, 328, 3]``, the INTER_CUBIC-resized face crop to paste into;
- ``inners[v]``: uint8 ``[320, 320, 3]`` C-contiguous copy of ``crops[v][4:324, 4:324]``, the
  model input, ready to send to Triton without copying;
- ``rects[v]``:  ``(x1, y1, x2, y2)`` px.

The video frames (``frames.npy``) are the package's read-only memmap; with a `CropCache` the
crops and inners are memory-mapped too (`gateway.crop_cache`), so gateway workers serving the
same package share one copy of all three in the page cache.

The audio features (``aud_ave.npy``, float32 ``[M, 512]``) stay the package's read-only memmap.
A request's ``frame_id`` ranges over feature rows ``0 .. M-1``; the video frame shown is
``pingpong_index(frame_id, N)`` (docs/REFERENCE.md s.2 step 9; words as in docs/GLOSSARY.md).

The store also registers each avatar's Triton model (``manifest.model_name``) with the model
registry (`ModelRegistry`: the gateway's `gateway.endpoint_pool.EndpointPool`, which registers
it on every Triton endpoint's `gateway.model_lifecycle.ModelLifecycle`), which loads it
(explicit model-control mode) and keeps it loaded across Triton restarts. A package whose model
no live Triton can serve is refused.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from gateway.crop_cache import CropCache, FaceCrops, compute_crops
from gateway.errors import FrameOutOfRange, PackageRejected, UnknownAvatar
from gateway.model_lifecycle import LifecycleSnapshot
from lipsync.contract import MANIFEST_NAME
from lipsync.frames import pingpong_index
from lipsync.package import AvatarPackage, PackageError, load_package

log = logging.getLogger(__name__)


class ModelRegistry(Protocol):
    """What keeps the avatars' models loaded in Triton: `gateway.model_lifecycle.ModelLifecycle`
    (one endpoint) or `gateway.endpoint_pool.EndpointPool` (every endpoint, combined state)."""

    url: str
    """The Triton endpoint(s), for messages."""

    def snapshot(self) -> LifecycleSnapshot:
        """The current state."""
        ...

    async def register(self, model: str, *, required: bool = True) -> LifecycleSnapshot:
        """Keep ``model`` loaded from now on; returns the state after the attempt."""
        ...

    def unregister(self, model: str) -> None:
        """Stop keeping ``model`` loaded."""
        ...


@dataclass
class Avatar:
    """One preloaded avatar.

    Attributes:
        name: the avatar name (``model_name`` in gRPC, the WebSocket ``name``).
        model: the avatar's Triton model name (``lipsync_<avatar>``).
        package: the validated package (manifest, frames, rects, landmarks, features).
        crops: uint8 ``[N, 328, 328, 3]`` BGR.
        inners: uint8 ``[N, 320, 320, 3]`` BGR, C-contiguous.
        rects: int32 ``[N, 4]`` crop rectangles ``(x1, y1, x2, y2)`` px.
        features: float32 ``[M, 512]`` read-only memmap (padded ``aud_ave.npy``).
        init_ms: time spent loading and precomputing (ms).
    """

    name: str
    model: str
    package: AvatarPackage
    crops: NDArray[np.uint8]
    inners: NDArray[np.uint8]
    rects: NDArray[np.int32]
    features: NDArray[np.float32]
    init_ms: float

    @property
    def frames(self) -> NDArray[np.uint8]:
        """Full video frames, uint8 ``[N, H, W, 3]`` BGR."""
        return self.package.frames

    @property
    def video_frames(self) -> int:
        """Number of video frames N."""
        return int(self.package.frames.shape[0])

    @property
    def feature_rows(self) -> int:
        """Number of audio feature rows M (the valid ``frame_id`` range is ``0 .. M-1``)."""
        return int(self.features.shape[0])

    @property
    def width(self) -> int:
        """Frame width (px)."""
        return int(self.package.frames.shape[2])

    @property
    def height(self) -> int:
        """Frame height (px)."""
        return int(self.package.frames.shape[1])

    @property
    def fps(self) -> float:
        """Output frame rate (fps)."""
        return float(self.package.manifest.fps)

    @property
    def audio_path(self) -> Path:
        """The package's 16 kHz mono WAV."""
        return self.package.audio_path

    @property
    def trained(self) -> bool:
        """Whether the package's weights are trained (the manifest's ``weights.trained``)."""
        return self.package.manifest.weights.trained

    def check_frame_id(self, frame_id: int, *, live_audio: bool = False) -> None:
        """Check that ``frame_id`` names an output frame of this avatar.

        With the package's audio, ``0 <= frame_id < M``. With live audio the request brings the
        frame's window, so ``frame_id`` only picks the video frame: any ``frame_id >= 0``.

        Raises:
            FrameOutOfRange: with the valid range in the message.
        """
        if frame_id >= 0 and (live_audio or frame_id < self.feature_rows):
            return
        valid = ">= 0" if live_audio else f"0..{self.feature_rows - 1}"
        raise FrameOutOfRange(
            f"frame_id {frame_id} is out of range for avatar {self.name!r} "
            f"(valid: {valid}; {self.feature_rows} audio feature rows, "
            f"{self.video_frames} video frames walked ping-pong)"
        )

    def video_index(self, frame_id: int) -> int:
        """Video frame shown for ``frame_id`` (ping-pong, docs/REFERENCE.md s.2 step 9)."""
        return pingpong_index(frame_id, self.video_frames)

    def rect(self, video_index: int) -> tuple[float, float, float, float]:
        """Crop rectangle ``(x1, y1, x2, y2)`` of a video frame, px as floats."""
        x1, y1, x2, y2 = (float(v) for v in self.rects[video_index])
        return (x1, y1, x2, y2)


def prepare_avatar(package: AvatarPackage, name: str | None = None, crops: FaceCrops | None = None) -> Avatar:
    """Make an `Avatar` of a loaded package with its per-frame crops (CPU work, no Triton).

    Args:
        package: a package from `load_package`.
        name: name to serve it under (default: ``manifest.name``).
        crops: its crops from a `gateway.crop_cache.CropCache` (default: computed here,
            `gateway.crop_cache.compute_crops`).

    Returns:
        An `Avatar` with ``crops`` uint8 ``[N, 328, 328, 3]`` and ``inners`` uint8
        ``[N, 320, 320, 3]``.

    Raises:
        PackageRejected: no frames, rectangles the crop math refuses, or no feature rows.
    """
    t0 = time.perf_counter()
    if crops is None:
        crops = compute_crops(package)
    features = package.features
    if features.ndim != 2 or features.shape[0] == 0:
        raise PackageRejected(f"package {package.root} has features of shape {list(features.shape)}")
    return Avatar(
        name=name or package.manifest.name,
        model=package.manifest.model_name,
        package=package,
        crops=crops.crops,
        inners=crops.inners,
        rects=np.asarray(package.rects, dtype=np.int32),
        features=features,
        init_ms=(time.perf_counter() - t0) * 1e3,
    )


class LoadSharing(Protocol):
    """Where a store reports the packages loaded on request (`AvatarStore.share_loads`): the
    link of a gateway worker to its supervisor, which has every other worker load them too
    (`gateway.worker`)."""

    async def loaded(self, package_dir: Path, name: str | None) -> None:
        """``package_dir`` (resolved) was loaded under ``name`` (None: its manifest's); returns
        once the other workers have it too."""
        ...


class AvatarStore:
    """The loaded avatars, by name, plus their models' registration with Triton.

    Args:
        packages_root: folder holding one package folder per avatar; `LoadPackage` paths must
            resolve inside it.
        lifecycle: the model registry (None: no model registration, for offline use).
        crop_cache: where the avatars' crops are computed once and memory-mapped from (None:
            each avatar's crops are computed into this process's RAM).
    """

    def __init__(
        self, packages_root: Path, lifecycle: ModelRegistry | None, crop_cache: CropCache | None = None
    ) -> None:
        self.packages_root = Path(packages_root).resolve()
        self._lifecycle = lifecycle
        self._crop_cache = crop_cache
        self._sharing: LoadSharing | None = None
        self._avatars: dict[str, Avatar] = {}
        self._aliases: dict[str, str] = {}
        self._subscribers: list[Callable[[], None]] = []

    def subscribe(self, subscriber: Callable[[], None]) -> None:
        """Call ``subscriber()`` after every change of the set of avatars."""
        self._subscribers.append(subscriber)

    def share_loads(self, sharing: LoadSharing) -> None:
        """From now on, tell ``sharing`` of every `load` with ``share=True`` (the default)."""
        self._sharing = sharing

    # ------------------------------------------------------------------ lookup
    def get(self, name: str) -> Avatar:
        """The avatar called ``name`` (its Triton model name works too).

        Raises:
            UnknownAvatar: nothing of that name is loaded (the message lists what is).
        """
        avatar = self._avatars.get(name)
        if avatar is None and name in self._aliases:
            avatar = self._avatars.get(self._aliases[name])
        if avatar is None:
            loaded = ", ".join(sorted(self._avatars)) or "none"
            raise UnknownAvatar(f"avatar {name!r} is not loaded (loaded: {loaded})")
        return avatar

    def names(self) -> list[str]:
        """Names of the loaded avatars, sorted."""
        return sorted(self._avatars)

    def avatars(self) -> list[Avatar]:
        """The loaded avatars, sorted by name."""
        return [self._avatars[n] for n in self.names()]

    def __len__(self) -> int:
        return len(self._avatars)

    def __contains__(self, name: object) -> bool:
        return name in self._avatars or name in self._aliases

    # ------------------------------------------------------------------ loading
    def resolve_package_dir(self, package_dir: str | Path) -> Path:
        """Resolve a package path (relative paths are relative to the packages root).

        Raises:
            PackageRejected: the path resolves outside the packages root, or is not a folder
                holding a ``manifest.json``.
        """
        raw = Path(package_dir)
        candidate = raw if raw.is_absolute() else self.packages_root / raw
        resolved = candidate.resolve()
        if resolved == self.packages_root or not resolved.is_relative_to(self.packages_root):
            raise PackageRejected(
                f"package_dir {str(package_dir)!r} resolves to {resolved}, which is not inside "
                f"the packages root {self.packages_root}"
            )
        if not (resolved / MANIFEST_NAME).is_file():
            raise PackageRejected(f"{resolved} is not an avatar package (no {MANIFEST_NAME})")
        return resolved

    async def load(self, package_dir: str | Path, name: str | None = None, *, share: bool = True) -> Avatar:
        """Load (or reload) one package and register its model with Triton.

        Loading and precomputation run in a worker thread; the event loop keeps serving.

        Args:
            package_dir: path of the package, absolute or relative to the packages root.
            name: name to serve it under (default: the manifest's name).
            share: tell the `LoadSharing` given to `share_loads`, if any, and wait until the
                other workers have the package too (False for what every worker loads by
                itself: `load_all`, and the loads another worker shared).

        Returns:
            The new `Avatar`, serving when this returns (if Triton is down, its model is
            loaded by the monitor once Triton is back).

        Raises:
            PackageRejected: path outside the root, the loader's `PackageError`, or a live
                Triton that cannot load the avatar's model.
        """
        path = self.resolve_package_dir(package_dir)
        t0 = time.perf_counter()

        def _load() -> Avatar:
            try:
                package = load_package(path)
            except PackageError as exc:
                raise PackageRejected(f"package {path} rejected: {exc}") from exc
            crops = self._crop_cache.crops(package) if self._crop_cache is not None else None
            return prepare_avatar(package, name, crops)

        avatar = await asyncio.to_thread(_load)
        if self._lifecycle is not None:
            await self._register_model(self._lifecycle, avatar, path)
        avatar.init_ms = (time.perf_counter() - t0) * 1e3
        self._avatars[avatar.name] = avatar
        self._aliases[avatar.model] = avatar.name
        for subscriber in self._subscribers:
            subscriber()
        log.info(
            "avatar %r loaded from %s: %d video frames %dx%d, %d feature rows, model %s (%.0f ms)",
            avatar.name, path, avatar.video_frames, avatar.width, avatar.height,
            avatar.feature_rows, avatar.model, avatar.init_ms,
        )
        if not avatar.trained:
            log.warning("avatar %r uses UNTRAINED weights: the mouth region will be noise", avatar.name)
        if share and self._sharing is not None:
            await self._sharing.loaded(path, name)
        return avatar

    async def _register_model(self, lifecycle: ModelRegistry, avatar: Avatar, path: Path) -> None:
        """Register the avatar's model; refuse the package if a live Triton cannot serve it.

        When Triton is down the avatar is accepted: the lifecycle loads the model once Triton
        is back, and the gateway reports not-ready until then.

        Raises:
            PackageRejected: Triton is live and the model is not ready after the load attempt.
        """
        model = avatar.model
        already = lifecycle.snapshot().model_ready(model)
        state = await lifecycle.register(model, required=True)
        if state.live and not state.model_ready(model):
            in_use = any(a.model == model for a in self._avatars.values())
            if not already and not in_use:
                lifecycle.unregister(model)
            status = state.models.get(model)
            why = status.error if status is not None and status.error else "not ready"
            raise PackageRejected(
                f"package {path}: Triton at {lifecycle.url} cannot serve its model "
                f"{model!r} ({why}); export it into the model repository first "
                "(`lipsync export model-repo`)"
            )

    async def load_all(self) -> list[Avatar]:
        """Load every package folder under the packages root.

        A package that fails validation is logged and skipped (the others still serve).

        Returns:
            The avatars loaded.
        """
        loaded: list[Avatar] = []
        if not self.packages_root.is_dir():
            log.warning("packages root %s does not exist: no avatars", self.packages_root)
            return loaded
        for child in sorted(self.packages_root.iterdir()):
            if not (child / MANIFEST_NAME).is_file():
                continue
            try:
                loaded.append(await self.load(child, share=False))
            except PackageRejected as exc:
                log.error("skipping %s: %s", child, exc.message)
        if not loaded:
            log.warning("no avatar package found under %s", self.packages_root)
        return loaded
