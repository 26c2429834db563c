"""`AvatarStore`: the avatars a gateway serves, preloaded so per-frame work is pure memory.

At start the store loads every package folder under the packages root with
`lipsync.package.load_package` (which validates schema, shapes, checksums), and again on a
``LoadPackage`` call. For each avatar it precomputes, per *video* frame ``v``
(docs/REFERENCE.md s.2 steps 2-3):

- ``crops[v]``:  uint8 ``[328, 328, 3]``, the INTER_CUBIC-resized face crop to paste into;
- ``inners[v]``: uint8 ``[320, 320, 3]`` C-contiguous copy of ``crops[v][4:324, 4:324]``, the
  model input, ready to send to Triton without copying;
- ``rects[v]``:  ``(x1, y1, x2, y2)`` px.

- ``backgrounds``: each video frame's JPEG split for splicing, and its splice plan
  (`gateway.backgrounds.AvatarBackgrounds`), when the store was given a builder (the gateway's
  `gateway.compositor.Compositor.backgrounds`: the JPEGs memory-mapped from its
  `gateway.background_cache.BackgroundCache`, or encoded into RAM without one).

The video frames (``frames.npy``) are the package's read-only memmap; with a `CropCache` the
crops and inners are memory-mapped too (`gateway.crop_cache`), so gateway workers serving the
same package share one copy of all three in the page cache. The `Avatar` holds them as plain
``ndarray`` views of those maps (`lipsync.package.plain_view`: same pages, no Python per slice).

The audio features (``aud_ave.npy``, float32 ``[M, 512]``) stay the package's read-only memmap.
A request's ``frame_id`` ranges over feature rows ``0 .. M-1``; the video frame shown is
``pingpong_index(frame_id, N)`` (docs/REFERENCE.md s.2 step 9; words as in docs/GLOSSARY.md).

The store also registers each avatar's Triton model (``manifest.model_name``) with the model
registry (`ModelRegistry`: the gateway's `gateway.endpoint_pool.EndpointPool`, which registers
it on every Triton endpoint's `gateway.model_lifecycle.ModelLifecycle`), which loads it
(explicit model-control mode) and keeps it loaded across Triton restarts. A package whose model
no live Triton can serve is refused.

Loading rules (issue 11; who may load at all is `gateway.auth`'s job): the avatar name matches
`lipsync.contract.NAME_PATTERN`; an avatar loaded from one folder is replaced by another folder
only with ``replace=True`` (reloading it from its own folder needs no flag); one package folder is
served under one name only (another name would hold a second copy of its frames); the frames,
crops and background JPEGs of all avatars (`Avatar.held_bytes`) stay under ``max_avatar_bytes``
(checked before loading with `frame_bytes`, and again once the JPEGs are built); loads run one
at a time, and a cancelled load stops reading and hashing at its next step. Messages name
package folders relative to the packages root, never as absolute server paths.

The cap with gateway workers (``--workers N``): each worker applies ``max_avatar_bytes`` to its
own avatars, which are the same in every worker, counting what that worker holds or maps
(`Avatar.held_bytes`), memory-mapped or not. So the cap bounds one worker's avatars; the machine
holds the memory-mapped arrays (frames; crops too with a `CropCache`, background JPEGs with the
compositor's `gateway.background_cache.BackgroundCache`) once in the page cache for all workers,
and crops and background JPEGs computed into RAM (no cache) once per worker.

Sharing with gateway workers (`share_changes`): a load or unload made on request in one worker
is made by every other worker before the call returns, and by every worker started later
(`gateway.worker`, `gateway.workers`).
"""
from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from gateway.backgrounds import AvatarBackgrounds
from gateway.crop_cache import CropCache, FaceCrops, compute_crops
from gateway.errors import FrameOutOfRange, PackageRejected, UnknownAvatar
from gateway.model_lifecycle import LifecycleSnapshot
from lipsync.contract import CROP_SIZE, INNER_SIZE, MANIFEST_NAME, NAME_PATTERN, is_avatar_name
from lipsync.frames import pingpong_index
from lipsync.package import (
    AvatarPackage,
    PackageError,
    PackageManifest,
    load_package,
    plain_view,
    read_manifest,
)

log = logging.getLogger(__name__)

MiB = 1 << 20


def frame_bytes(video_frames: int, height: int, width: int) -> int:
    """Bytes of an avatar's frames in this process's memory: the full frames uint8
    ``[N, H, W, 3]`` plus the crops ``[N, 328, 328, 3]`` and inner crops ``[N, 320, 320, 3]``
    (`prepare_avatar`), counted whole whether they are in RAM or memory-mapped (module doc: the
    cap with workers); the memory-mapped audio features are not counted."""
    return video_frames * 3 * (height * width + CROP_SIZE * CROP_SIZE + INNER_SIZE * INNER_SIZE)


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
        backgrounds: the video frames' JPEGs split for splicing (None: not built).
    """

    name: str
    model: str
    package: AvatarPackage
    crops: NDArray[np.uint8]
    inners: NDArray[np.uint8]
    rects: NDArray[np.int32]
    features: NDArray[np.float32]
    init_ms: float
    backgrounds: AvatarBackgrounds | None = None

    @functools.cached_property
    def frames(self) -> NDArray[np.uint8]:
        """Full video frames, uint8 ``[N, H, W, 3]`` BGR: a `plain_view` of the package's memmap."""
        return plain_view(self.package.frames)

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

    @property
    def held_bytes(self) -> int:
        """Bytes this avatar holds or maps: its frames and crops (`frame_bytes`) and, once built,
        its background JPEGs (`AvatarBackgrounds.nbytes`: about a tenth more at 880x720)."""
        held = self.package.frames.nbytes + self.crops.nbytes + self.inners.nbytes
        if self.backgrounds is not None:
            held += self.backgrounds.nbytes
        return int(held)

    def rect(self, video_index: int) -> tuple[float, float, float, float]:
        """Crop rectangle ``(x1, y1, x2, y2)`` of a video frame, px as floats."""
        x1, y1, x2, y2 = map(float, self.rects[video_index].tolist())  # per frame: no numpy scalars
        return (x1, y1, x2, y2)


def prepare_avatar(
    package: AvatarPackage,
    name: str | None = None,
    crops: FaceCrops | None = None,
    cancel: threading.Event | None = None,
) -> Avatar:
    """Make an `Avatar` of a loaded package with its per-frame crops (CPU work, no Triton).

    Args:
        package: a package from `load_package`.
        name: name to serve it under (default: ``manifest.name``).
        crops: its crops from a `gateway.crop_cache.CropCache` (default: computed here,
            `gateway.crop_cache.compute_crops`).
        cancel: when set (by another thread), stop before the next frame (`LoadCancelled`).

    Returns:
        An `Avatar` with ``crops`` uint8 ``[N, 328, 328, 3]`` and ``inners`` uint8
        ``[N, 320, 320, 3]``.

    Raises:
        PackageRejected: no frames, rectangles the crop math refuses, or no feature rows.
    """
    t0 = time.perf_counter()
    if crops is None:
        crops = compute_crops(package, cancel)
    features = package.features
    if features.ndim != 2 or features.shape[0] == 0:
        raise PackageRejected(f"package {package.name!r} has features of shape {list(features.shape)}")
    return Avatar(
        name=name or package.manifest.name,
        model=package.manifest.model_name,
        package=package,
        crops=plain_view(crops.crops),
        inners=plain_view(crops.inners),
        rects=np.asarray(package.rects, dtype=np.int32),
        features=features,
        init_ms=(time.perf_counter() - t0) * 1e3,
    )


class ChangeSharing(Protocol):
    """Where a store reports the avatars loaded and unloaded on request
    (`AvatarStore.share_changes`): the link of a gateway worker to its supervisor, which has
    every other worker, and every worker started later, make the same change (`gateway.worker`)."""

    async def loaded(self, package_dir: Path, name: str) -> None:
        """``package_dir`` (resolved) was loaded as avatar ``name``; returns once the other
        workers serve it too."""
        ...

    async def unloaded(self, name: str) -> None:
        """Avatar ``name`` was unloaded; returns once the other workers stopped serving it too."""
        ...


class AvatarStore:
    """The loaded avatars, by name, plus their models' registration with Triton.

    Args:
        packages_root: folder holding one package folder per avatar; `LoadPackage` paths must
            resolve inside it.
        lifecycle: the model registry (None: no model registration, for offline use).
        crop_cache: where the avatars' crops are computed once and memory-mapped from (None:
            each avatar's crops are computed into this process's RAM).
        max_avatar_bytes: cap on `Avatar.held_bytes` summed over the avatars (None: no cap).
        backgrounds: builds an avatar's `AvatarBackgrounds` in the loading thread, given the
            load's cancel event (None: none built); a `ValueError` from it refuses the package.
    """

    def __init__(
        self,
        packages_root: Path,
        lifecycle: ModelRegistry | None,
        crop_cache: CropCache | None = None,
        max_avatar_bytes: int | None = None,
        *,
        backgrounds: Callable[[Avatar, threading.Event], AvatarBackgrounds] | None = None,
    ) -> None:
        self.packages_root = Path(packages_root).resolve()
        self.max_avatar_bytes = max_avatar_bytes
        self._lifecycle = lifecycle
        self._backgrounds = backgrounds
        self._crop_cache = crop_cache
        self._sharing: ChangeSharing | None = None
        self._avatars: dict[str, Avatar] = {}
        self._aliases: dict[str, str] = {}
        self._subscribers: list[Callable[[], None]] = []
        self._loading = asyncio.Lock()

    def subscribe(self, subscriber: Callable[[], None]) -> None:
        """Call ``subscriber()`` after every change of the set of avatars."""
        self._subscribers.append(subscriber)

    def share_changes(self, sharing: ChangeSharing) -> None:
        """From now on, tell ``sharing`` of every `load` and `unload` with ``share=True`` (the
        default)."""
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
    def display(self, path: Path) -> str:
        """``path`` as callers may see it: relative to the packages root (POSIX), never the
        server's absolute path."""
        try:
            return Path(path).relative_to(self.packages_root).as_posix()
        except ValueError:
            return "<outside the packages root>"

    def _redact(self, message: str) -> str:
        """``message`` with the packages root's absolute path taken out (loader messages)."""
        root = str(self.packages_root)
        return message.replace(root + "/", "").replace(root, "<packages root>")

    def resolve_package_dir(self, package_dir: str | Path) -> Path:
        """Resolve a package path (relative paths are relative to the packages root).

        Raises:
            PackageRejected: the path cannot name a file (NUL byte, a component too long for
                the file system), resolves outside the packages root, or is not a folder
                holding a ``manifest.json``.
        """
        try:
            raw = Path(package_dir)
            candidate = raw if raw.is_absolute() else self.packages_root / raw
            resolved = candidate.resolve()
            inside = resolved != self.packages_root and resolved.is_relative_to(self.packages_root)
            is_package = inside and (resolved / MANIFEST_NAME).is_file()
        except (ValueError, OSError) as exc:  # "embedded null byte", ENAMETOOLONG, ELOOP, ...
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise PackageRejected(
                f"package_dir {str(package_dir)[:200]!r} is not a usable path: {reason}"
            ) from None
        if not inside:
            raise PackageRejected(
                f"package_dir {str(package_dir)[:200]!r} is not inside the packages root"
            )
        if not is_package:
            raise PackageRejected(f"{self.display(resolved)!r} is not an avatar package (no {MANIFEST_NAME})")
        return resolved

    async def load(
        self,
        package_dir: str | Path,
        name: str | None = None,
        *,
        replace: bool = False,
        share: bool = True,
    ) -> Avatar:
        """Load (or reload) one package and register its model with Triton (module doc: rules).

        Loading and precomputation run in a worker thread; the event loop keeps serving. Loads
        run one at a time. Cancelling the call stops the worker at its next step (between files,
        hashed chunks, arrays, frames).

        Args:
            package_dir: path of the package, absolute or relative to the packages root.
            name: name to serve it under (default: the manifest's name).
            replace: allow replacing an avatar of that name loaded from another folder.
            share: tell the `ChangeSharing` given to `share_changes`, if any, and wait until
                the other workers have the package too (False for what every worker loads by
                itself: `load_all`, and the changes another worker shared).

        Returns:
            The new `Avatar`, serving when this returns (if Triton is down, its model is
            loaded by the monitor once Triton is back).

        Raises:
            PackageRejected: path outside the root or unusable, a name not matching
                `NAME_PATTERN`, a replacement without ``replace``, the folder already served
                under another name, the cap exceeded, the loader's `PackageError`, or a live
                Triton that cannot load the avatar's model.
        """
        async with self._loading:
            path = self.resolve_package_dir(package_dir)
            t0 = time.perf_counter()
            cancel = threading.Event()

            def _load(manifest: PackageManifest) -> Avatar:
                package = load_package(path, cancel=cancel)
                if package.manifest != manifest:
                    raise PackageError("the package changed while it was loaded; load it again")
                crops = self._crop_cache.crops(package, cancel) if self._crop_cache is not None else None
                avatar = prepare_avatar(package, name or manifest.name, crops, cancel)
                if self._backgrounds is not None:
                    try:
                        avatar.backgrounds = self._backgrounds(avatar, cancel)
                    except ValueError as exc:
                        raise PackageError(f"background JPEGs failed: {exc}") from exc
                return avatar

            try:
                manifest = await asyncio.to_thread(read_manifest, path)
                serve_as = name or manifest.name
                self._check_load(path, serve_as, replace=replace)
                self._check_cap(serve_as, frame_bytes(manifest.frame_count, manifest.height, manifest.width))
                avatar = await asyncio.to_thread(_load, manifest)
                # again with what it holds: the background JPEGs are known once built
                self._check_cap(serve_as, avatar.held_bytes, "frames and background JPEGs")
            except asyncio.CancelledError:
                cancel.set()  # the worker stops at its next check
                log.info("loading %s cancelled by the caller", self.display(path))
                raise
            except PackageError as exc:
                raise PackageRejected(
                    f"package {self.display(path)!r} rejected: {self._redact(str(exc))}"
                ) from exc
            if self._lifecycle is not None:
                await self._register_model(self._lifecycle, avatar, path)
            avatar.init_ms = (time.perf_counter() - t0) * 1e3
            old = self._avatars.get(avatar.name)
            self._avatars[avatar.name] = avatar
            if old is not None and old.model != avatar.model:
                self._release_model(old.model)
            self._aliases[avatar.model] = avatar.name
        for subscriber in self._subscribers:
            subscriber()
        log.info(
            "avatar %r loaded from %s: %d video frames %dx%d, %d feature rows, model %s (%.0f ms, %.0f MiB)",
            avatar.name, path, avatar.video_frames, avatar.width, avatar.height,
            avatar.feature_rows, avatar.model, avatar.init_ms, avatar.held_bytes / MiB,
        )
        if not avatar.trained:
            log.warning("avatar %r uses UNTRAINED weights: the mouth region will be noise", avatar.name)
        if share and self._sharing is not None:
            await self._sharing.loaded(path, avatar.name)
        return avatar

    def _check_load(self, path: Path, name: str, *, replace: bool) -> None:
        """The name and replacement rules of `load` (module doc).

        Raises:
            PackageRejected: with the rule broken and how to proceed.
        """
        if not is_avatar_name(name):
            raise PackageRejected(
                f"package_name {name[:100]!r} is not a valid avatar name: letters, digits, '_' and "
                f"'-', 1-63 characters, starting with a letter or digit ({NAME_PATTERN})"
            )
        existing = self._avatars.get(name)
        if existing is not None and existing.package.root != path and not replace:
            raise PackageRejected(
                f"avatar {name!r} is already served from {self.display(existing.package.root)!r}; "
                f"loading {self.display(path)!r} under that name replaces it for every client: "
                "call OptimizedLipSyncAdmin.LoadPackage with replace=true to do so"
            )
        for other in self._avatars.values():
            if other.name != name and other.package.root == path:
                raise PackageRejected(
                    f"package {self.display(path)!r} is already served as avatar {other.name!r}; "
                    f"serving it as {name!r} too would hold a second copy of its frames "
                    f"({other.held_bytes / MiB:.0f} MiB): use the name {other.name!r}"
                )

    def _check_cap(self, name: str, new_bytes: int, what: str = "frames") -> None:
        """Refuse an avatar whose ``new_bytes`` (its ``what``) would take the total past
        ``max_avatar_bytes`` (an avatar of the same name it replaces does not count).

        Raises:
            PackageRejected: with the sizes and the setting.
        """
        cap = self.max_avatar_bytes
        if cap is None:
            return
        held = sum(a.held_bytes for a in self._avatars.values() if a.name != name)
        if held + new_bytes > cap:
            raise PackageRejected(
                f"avatar {name!r} needs {new_bytes / MiB:.1f} MiB of {what} in memory; the other "
                f"avatars hold {held / MiB:.1f} MiB and the cap is {cap / MiB:.1f} MiB "
                "(LIPSYNC_MAX_AVATAR_BYTES): unload an avatar or raise the cap"
            )

    def _release_model(self, model: str) -> None:
        """Forget Triton model ``model`` (its alias, its registration) unless an avatar still
        serves it."""
        if any(a.model == model for a in self._avatars.values()):
            return
        self._aliases.pop(model, None)
        if self._lifecycle is not None:
            self._lifecycle.unregister(model)

    async def unload(self, name: str, *, share: bool = True) -> Avatar:
        """Stop serving the avatar ``name`` (frames in flight finish; its memory is freed once
        they are done). Its Triton model stays loaded in Triton but is no longer required for
        readiness, unless another avatar uses it.

        Args:
            name: the avatar (its Triton model name works too).
            share: tell the `ChangeSharing` given to `share_changes`, if any, and wait until the
                other workers stopped serving it too (False for a change another worker shared).

        Returns:
            The avatar removed.

        Raises:
            UnknownAvatar: no avatar of that name (its Triton model name works too).
        """
        avatar = self.get(name)
        del self._avatars[avatar.name]
        self._release_model(avatar.model)
        for subscriber in self._subscribers:
            subscriber()
        log.info("avatar %r unloaded (%.0f MiB of frames released)", avatar.name, avatar.held_bytes / MiB)
        if share and self._sharing is not None:
            await self._sharing.unloaded(avatar.name)
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
                f"package {self.display(path)!r}: Triton cannot serve its model "
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
