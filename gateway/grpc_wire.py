"""Wire conventions shared by the gateway's gRPC services (`gateway.grpc_service`,
`gateway.admin_service`): the proto's int32 range and the video types a package offers."""
from __future__ import annotations

INT32_MAX = 2**31 - 1
"""Largest value of the proto's int32 fields (``frame_id``, counters, times in ms)."""

VIDEO_TYPES = ("full_body", "face_regions", "masked_regions")
"""``GetVideoFrame.video_type`` values, also listed as ``LoadPackageResponse.videos_loaded``."""


def int32(value: float) -> int:
    """``value`` rounded and clamped to ``0 .. INT32_MAX`` for an int32 field of an answer (a
    counter past 2^31 would make protobuf raise and the call fail with UNKNOWN)."""
    return max(0, min(INT32_MAX, round(value)))
