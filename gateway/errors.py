"""Errors a gateway caller can get, each with a stable machine-readable `code`.

Both protocols map these the same way: gRPC answers in-band (`success=false`, `error` set,
as existing clients expect), the WebSocket answers with its error frame, HTTP with a JSON body
`{"error": code, "message": ...}` and the `http_status` below.

Access errors (`Unauthenticated`, `PermissionDenied`) come before any request is read, so no
in-band answer exists for them: gRPC answers the status named by `grpc_status`
(``UNAUTHENTICATED``, ``PERMISSION_DENIED``) with ``"<code>: <message>"`` as details, HTTP and the
WebSocket upgrade the JSON body with 401 / 403 (`gateway.auth`).
"""
from __future__ import annotations


class GatewayError(Exception):
    """Base class: a request failed for a reason the caller should be told precisely."""

    code: str = "internal"
    http_status: int = 500
    grpc_status: str = "UNKNOWN"
    """Name of the ``grpc.StatusCode`` for errors answered as a gRPC status, not in-band."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # "code: message" is what callers see
        return f"{self.code}: {self.message}"


class BadRequest(GatewayError):
    """Malformed or oversized message, wrong field values, wrong audio chunk count."""

    code = "bad_request"
    http_status = 400


class UnknownAvatar(GatewayError):
    """The named avatar (model_name) is not loaded."""

    code = "unknown_avatar"
    http_status = 404


class FrameOutOfRange(GatewayError):
    """frame_id is negative or >= the avatar's number of audio feature rows."""

    code = "frame_out_of_range"
    http_status = 400


class PackageRejected(GatewayError):
    """LoadPackage refused: path outside the packages root, corrupt or incomplete package."""

    code = "package_rejected"
    http_status = 400


class Overloaded(GatewayError):
    """Too many frames in flight (per connection or globally); retry later."""

    code = "overloaded"
    http_status = 503


class TritonUnavailable(GatewayError):
    """Triton did not answer in time, is not ready, or the avatar's model is not loaded."""

    code = "triton_unavailable"
    http_status = 503


class TritonDeadline(TritonUnavailable):
    """A Triton call ran past its deadline (gRPC ``DEADLINE_EXCEEDED``).

    Same code as `TritonUnavailable` for callers; the model lifecycle tells it apart because a
    slow answer from a busy server is not an outage (`gateway.model_lifecycle`).
    """


class TritonEndpointDown(TritonUnavailable):
    """The Triton endpoint itself failed the call: connection refused or lost (gRPC
    ``UNAVAILABLE``, which Triton also answers when it cannot take the request now), or the
    endpoint went down while the call was in flight (`gateway.inference.GuardedInference`).

    Same code as `TritonUnavailable` for callers; `gateway.endpoint_pool.EndpointPool` retries
    such a call once on another endpoint (inference is idempotent), never a call that got an
    answer (an error or a bad tensor) or ran past its deadline.
    """


class Unauthenticated(GatewayError):
    """No credentials, or not the gateway's token (``LIPSYNC_AUTH_TOKEN``)."""

    code = "unauthenticated"
    http_status = 401
    grpc_status = "UNAUTHENTICATED"


class PermissionDenied(GatewayError):
    """Valid credentials that do not allow this call: an admin call without the admin token
    (``LIPSYNC_ADMIN_TOKEN``), or any admin call while that setting is unset."""

    code = "permission_denied"
    http_status = 403
    grpc_status = "PERMISSION_DENIED"



class OriginNotAllowed(GatewayError):
    """A browser page of another origin tried to open a WebSocket (``ws_allowed_origins``)."""

    code = "origin_not_allowed"
    http_status = 403


def unexpected(exc: BaseException) -> GatewayError:
    """The error a caller gets for a bug (an exception that is no `GatewayError`): its type only,
    never its message, which may hold server paths or data; the gateway logs the traceback."""
    return GatewayError(f"unexpected {type(exc).__name__} on the gateway (logged there)")
