"""gRPC service ``optimized_lipsyncsrv.OptimizedLipSyncAdmin`` (proto/admin.proto): load and
unload avatars. Also the seed service's ``LoadPackage`` (`load_package_response`), which old
clients still call and which is an admin call too.

Who may call it is `gateway.auth`'s job (the admin token; admin calls refused while
``LIPSYNC_ADMIN_TOKEN`` is unset); what may be loaded is `gateway.store.AvatarStore`'s (name
pattern, replacement only with ``replace``, one name per package folder, the frame-bytes cap,
cancellation). Errors come back in-band (``success = false``, ``error = "<code>: <message>"``).

Replacement: ``OptimizedLipSyncAdmin.LoadPackage`` replaces an avatar loaded from another folder
when ``replace = true``. The seed ``LoadPackage`` has no such field, so it only loads new avatars
and reloads an avatar from the folder it came from (the seed's "load or reload"); replacing one
from another folder through it is refused, with the message naming the admin call to use.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import grpc
import numpy as np

from gateway.context import GatewayContext
from gateway.errors import BadRequest, GatewayError
from gateway.grpc_wire import VIDEO_TYPES, int32
from gateway.store import MiB
from proto import admin_pb2 as admin_pb
from proto import admin_pb2_grpc as admin_pbg
from proto import lipsync_pb2 as pb

log = logging.getLogger(__name__)

SERVICE_NAME = admin_pb.DESCRIPTOR.services_by_name["OptimizedLipSyncAdmin"].full_name


async def load_package_response(
    ctx: GatewayContext, package_dir: str, package_name: str, *, replace: bool
) -> pb.LoadPackageResponse:
    """Load a package (`gateway.store.AvatarStore.load`) and describe the outcome.

    Args:
        ctx: the gateway.
        package_dir: folder inside the packages root (required).
        package_name: avatar name; empty: the manifest's name.
        replace: allow replacing an avatar of that name loaded from another folder.

    Returns:
        A ``LoadPackageResponse``: the avatar's sizes, or ``success = false`` with the error.
    """
    t0 = time.perf_counter()
    try:
        if not package_dir:
            raise BadRequest("package_dir is required (a folder inside the packages root)")
        avatar = await ctx.store.load(package_dir, name=package_name or None, replace=replace)
    except GatewayError as exc:
        log.warning("LoadPackage %r refused: %s", package_dir[:200], exc)
        return pb.LoadPackageResponse(
            success=False,
            package_name=package_name,
            message="package not loaded",
            error=str(exc),
            initialization_time_ms=int32((time.perf_counter() - t0) * 1e3),
            device=ctx.settings.device,
        )
    model_ok = ctx.lifecycle.snapshot().model_ready(avatar.model)
    message = (
        f"avatar {avatar.name!r} loaded: {avatar.video_frames} video frames "
        f"{avatar.width}x{avatar.height}, {avatar.feature_rows} feature rows; Triton model "
        f"{avatar.model} " + ("ready" if model_ok else "NOT ready yet (Triton down or loading; retried)")
    )
    return pb.LoadPackageResponse(
        success=True,
        package_name=avatar.name,
        message=message,
        initialization_time_ms=int32((time.perf_counter() - t0) * 1e3),
        frame_count=int32(avatar.feature_rows),
        device=ctx.settings.device,
        videos_loaded=list(VIDEO_TYPES),
        audio_features_shape=[int32(d) for d in avatar.features.shape],
        memory_mapped_audio=isinstance(avatar.features, np.memmap),
    )


class AdminService(admin_pbg.OptimizedLipSyncAdminServicer):
    """The ``OptimizedLipSyncAdmin`` implementation over a `GatewayContext`."""

    def __init__(self, ctx: GatewayContext) -> None:
        self.ctx = ctx

    async def LoadPackage(  # noqa: N802
        self, request: admin_pb.AdminLoadPackageRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.LoadPackageResponse:
        """Load, reload or (with ``replace``) replace an avatar (module doc)."""
        return await load_package_response(
            self.ctx, request.package_dir, request.package_name, replace=request.replace
        )

    async def UnloadPackage(  # noqa: N802
        self, request: admin_pb.UnloadPackageRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> admin_pb.UnloadPackageResponse:
        """Stop serving an avatar (`gateway.store.AvatarStore.unload`); in-band errors."""
        try:
            avatar = await self.ctx.store.unload(request.package_name)
        except GatewayError as exc:
            return admin_pb.UnloadPackageResponse(
                success=False, package_name=request.package_name, message="nothing unloaded", error=str(exc)
            )
        return admin_pb.UnloadPackageResponse(
            success=True,
            package_name=avatar.name,
            message=f"avatar {avatar.name!r} unloaded; {avatar.held_bytes / MiB:.0f} MiB of frames released",
        )
