"""`Compositor`: the pipeline's composite stage, paste back + JPEG of one frame in one call (the
pipeline runs it in its thread pool: one hop per frame), spliced or full (issue 9).

JPEG modes (`JpegMode`, shown in ``/readyz`` as ``jpeg``):

- ``spliced`` (`GatewaySettings.jpeg_splice`, the default): per frame only the face rectangle's
  restart-aligned rectangle (``AvatarBackgrounds.plans[v].rect``) is composited
  (`lipsync.frames.paste_back_region`: no full-frame copy), encoded with the background's
  settings and spliced into the video frame's precomputed JPEG
  (`lipsync.jpeg_splice.SplicePlan.apply`). The answer is byte for byte the JPEG of the whole
  composited frame from `gateway.jpeg.RestartIntervalEncoder` (`lipsync.jpeg_splice` module
  doc says why).
- ``full``: `lipsync.frames.paste_back` into a copy of the frame and the whole frame encoded with
  the configured encoder (`GatewaySettings.jpeg_encoder`): the path before issue 9. Used when
  splicing is off, and after the start-up self-test failed: every avatar's first video frame is
  checked at load (`lipsync.jpeg_splice.check_splice`); a mismatch switches the gateway to
  ``full`` for good, logs the reason and shows it in ``/readyz``.

Outputs (`gateway.frame_request.FrameOutput`, per request): ``composite`` frames as above, or
``face``: only the crop rectangle's pixels (`lipsync.frames.face_patch`, the rectangle's size),
encoded standalone with the configured encoder; the client draws it into the rectangle over the
video frame it shows (the original clients on ``/``; crop output over the background JPEG
``AvatarBackgrounds.jpeg`` served over HTTP), see `gateway.ws_protocol`.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from gateway.background_cache import BackgroundCache
from gateway.backgrounds import AvatarBackgrounds, BackgroundJpegs
from gateway.frame_request import FrameOutput
from gateway.jpeg import JpegEncoder, RestartIntervalEncoder
from gateway.store import Avatar
from lipsync.contract import CROP_SIZE
from lipsync.frames import face_patch, paste_back, paste_back_region
from lipsync.jpeg_splice import check_splice, encode_bgr

log = logging.getLogger(__name__)

@dataclass(frozen=True, slots=True)
class JpegMode:
    """How full frames are encoded (module doc).

    Attributes:
        mode: ``spliced`` or ``full``.
        reason: why ``full`` (setting off, or the self-test's finding); None when spliced.
    """

    mode: Literal["spliced", "full"]
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Composited:
    """One composited, encoded frame.

    Attributes:
        jpeg: the JPEG bytes (full frame or face rectangle, as asked).
        paste_ms: paste back time (ms, in the worker thread).
        jpeg_ms: encode (+ splice) time (ms, in the worker thread).
    """

    jpeg: bytes
    paste_ms: float
    jpeg_ms: float


class Compositor:
    """Paste back + JPEG per frame, and the avatars' backgrounds at load (module doc).

    Args:
        encoder: the configured encoder: full frames in ``full`` mode, crop output always.
        restart: the encoder of backgrounds and spliced rectangles.
        splice: whether to splice (False: ``full`` mode from the start).
        cache: where the background JPEGs are encoded once and memory-mapped from
            (`gateway.background_cache`; None: encoded into this process's RAM per avatar).
    """

    def __init__(
        self,
        encoder: JpegEncoder,
        restart: RestartIntervalEncoder,
        *,
        splice: bool,
        cache: BackgroundCache | None = None,
    ) -> None:
        self.plain = encoder
        self.restart = restart
        self.cache = cache
        self._local = threading.local()  # per pool thread: the scratch crop of `composite`
        self.mode = (
            JpegMode("spliced") if splice else JpegMode("full", "splicing is off (LIPSYNC_JPEG_SPLICE=0)")
        )

    @property
    def encoder(self) -> JpegEncoder:
        """The encoder whose JPEG of a whole composited frame equals this compositor's full
        output, byte for byte, in the current mode."""
        return self.restart if self.mode.mode == "spliced" else self.plain

    def backgrounds(self, avatar: Avatar, cancel: threading.Event | None = None) -> AvatarBackgrounds:
        """Map (from the cache) or encode the avatar's background JPEGs, plan its face
        rectangles, and self-test splicing on its first video frame (blocking, CPU: the store
        calls it in its loading thread).

        On a self-test failure the compositor switches to ``full`` mode (module doc).

        Args:
            avatar: the avatar being loaded.
            cancel: when set (by another thread), stop at the next frame or hashed chunk.

        Raises:
            ValueError: as `gateway.backgrounds.BackgroundJpegs.encode` and
                `gateway.backgrounds.AvatarBackgrounds.of`.
            lipsync.package.LoadCancelled: ``cancel`` was set.
        """
        t0 = time.perf_counter()
        settings = self.restart.settings_for(avatar.width)
        source = (
            self.cache.jpegs(avatar.package, settings, cancel)
            if self.cache is not None
            else BackgroundJpegs.encode(avatar.frames, settings, cancel)
        )
        built = AvatarBackgrounds.of(source, avatar.rects, t0)
        if self.mode.mode == "spliced":
            x1, y1, x2, y2 = (int(c) for c in avatar.rects[0])
            reason = check_splice(built.frames[0], avatar.frames[0], (x1, y1, x2, y2), settings)
            if reason is not None:
                self.mode = JpegMode(
                    "full", f"spliced JPEG self-test failed on avatar {avatar.name!r}: {reason}"
                )
                log.error("%s; encoding full frames from now on", self.mode.reason)
        log.info(
            "avatar %r: %d background JPEGs (q%d %s, restart every %d MCUs), %.1f MiB, %s, %.0f ms",
            avatar.name,
            len(built.frames),
            settings.quality,
            settings.subsampling,
            settings.restart_mcus,
            built.nbytes / 2**20,
            "memory-mapped from the cache" if source.mapped else "in this process's RAM",
            built.build_ms,
        )
        return built

    def video_frame_jpeg(self, avatar: Avatar, v: int) -> bytes | None:
        """Video frame ``v`` unchanged as JPEG, byte for byte what `encoder` makes of it, when
        that is the background built at load (``spliced`` mode); None otherwise.

        Raises:
            IndexError: no such video frame.
        """
        backgrounds = avatar.backgrounds
        if self.mode.mode != "spliced" or backgrounds is None:
            return None
        return backgrounds.jpeg(v)

    def composite(self, avatar: Avatar, v: int, pred: NDArray[np.uint8], output: FrameOutput) -> Composited:
        """Paste back the prediction of video frame ``v`` and encode the result (blocking, CPU).

        Args:
            avatar: the avatar.
            v: video frame index.
            pred: uint8 ``[320, 320, 3]`` BGR prediction.
            output: ``composite`` (the whole frame) or ``face`` (the crop rectangle alone).

        Raises:
            ValueError: wrong shapes (a bug upstream).
        """
        t0 = time.perf_counter()
        backgrounds = avatar.backgrounds
        scratch = self._scratch()
        if output == "face":
            x1, y1, x2, y2 = (int(c) for c in avatar.rects[v])
            patch = face_patch(avatar.crops[v], pred, x2 - x1, y2 - y1, scratch=scratch)
            t1 = time.perf_counter()
            jpeg = self.plain.encode(patch)
        elif self.mode.mode == "spliced" and backgrounds is not None:
            plan = backgrounds.plans[v]
            region = paste_back_region(
                avatar.frames[v], avatar.rects[v], avatar.crops[v], pred, plan.rect, scratch=scratch
            )
            t1 = time.perf_counter()
            jpeg = plan.apply(encode_bgr(region, backgrounds.settings))
        else:
            frame = paste_back(avatar.frames[v], avatar.rects[v], avatar.crops[v], pred)
            t1 = time.perf_counter()
            jpeg = self.plain.encode(frame)
        t2 = time.perf_counter()
        return Composited(jpeg, (t1 - t0) * 1e3, (t2 - t1) * 1e3)

    def _scratch(self) -> NDArray[np.uint8]:
        """This thread's uint8 ``[328, 328, 3]`` buffer for `lipsync.frames.face_patch` (no
        allocation and no copy of the whole crop per frame)."""
        scratch: NDArray[np.uint8] | None = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = np.empty((CROP_SIZE, CROP_SIZE, 3), np.uint8)
        return scratch
