"""Who may call what: the gateway's tokens, checked once per call on every protocol.

Two tokens (`gateway.config.GatewaySettings`), both sent as ``authorization: Bearer <token>``
(gRPC metadata, HTTP header; a WebSocket may put it in the ``token`` query parameter instead,
since browsers cannot set headers on one):

- ``LIPSYNC_AUTH_TOKEN``: every call needs it (or the admin token), except the open ones below.
  Unset: no client authentication (`warn_if_exposed` logs a warning on a non-loopback address).
  A token in a WebSocket's query never reaches the access log (`without_token`).
- ``LIPSYNC_ADMIN_TOKEN``: admin calls (`ADMIN_METHODS`: every method of
  ``optimized_lipsyncsrv.OptimizedLipSyncAdmin`` and the seed service's ``LoadPackage``) need it,
  and only it. Unset: every admin call is refused (`PermissionDenied`, saying how to enable them).

Open without a token: the gRPC service ``grpc.health.v1.Health``; HTTP ``/healthz``, ``/readyz``
(reduced to ``ready`` and a reason code for an unauthenticated caller, see
`gateway.http_app.readyz`) and ``/metrics``; the web page itself (``GET /`` without a WebSocket
upgrade, ``/static/...``: the same files for everyone, no data; the page asks the user for the
token). Everything else is closed by default: the checks are generic (a gRPC server interceptor
that sees every method of every service, an aiohttp middleware that sees every route), so a
service or route added later needs the token without anyone listing it.

Tokens are compared with `hmac.compare_digest` (time independent of where they differ). A failed
check is `gateway.errors.Unauthenticated` (no or wrong token) or `PermissionDenied` (a valid
token that does not allow the call), mapped like every other gateway error: gRPC status
``UNAUTHENTICATED`` / ``PERMISSION_DENIED``, HTTP 401 / 403 with the JSON error body.
"""
from __future__ import annotations

import enum
import hmac
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from aiohttp import web
from pydantic import SecretStr

from gateway.config import GatewaySettings
from gateway.errors import GatewayError, PermissionDenied, Unauthenticated
from proto import admin_pb2
from proto import lipsync_pb2 as pb

log = logging.getLogger(__name__)

AUTHORIZATION = "authorization"
"""The gRPC metadata key and HTTP header carrying ``Bearer <token>``."""
TOKEN_QUERY = "token"
"""The WebSocket query parameter that may carry the token instead of the header."""

_SEED_SERVICE = pb.DESCRIPTOR.services_by_name["OptimizedLipSyncService"]
_ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["OptimizedLipSyncAdmin"]
ADMIN_METHODS = frozenset(
    {f"/{_ADMIN_SERVICE.full_name}/{m.name}" for m in _ADMIN_SERVICE.methods}
    | {f"/{_SEED_SERVICE.full_name}/LoadPackage"}
)
"""gRPC methods (``/package.Service/Method``) that need the admin token."""
OPEN_GRPC_SERVICES = frozenset({"grpc.health.v1.Health"})
"""gRPC services callable without a token (load balancers, Kubernetes gRPC probes)."""
OPEN_HTTP_RESOURCES = frozenset({"/healthz", "/readyz", "/metrics"})
"""Routes (aiohttp canonical paths) open without a token."""
PAGE_RESOURCES = frozenset({"/", "/static/{name}"})
"""The web page's routes: open, except a WebSocket upgrade on them."""

ENABLE_ADMIN = (
    "admin calls are disabled on this gateway: set LIPSYNC_ADMIN_TOKEN (e.g. `openssl rand -hex 32`) "
    "and send it as `authorization: Bearer <admin token>`"
)


class Access(enum.Enum):
    """What a presented credential allows."""

    NONE = "none"
    CLIENT = "client"
    ADMIN = "admin"


def bearer_token(value: str | None) -> str | None:
    """The token of an ``authorization`` value ``"Bearer <token>"`` (scheme case-insensitive,
    RFC 6750); None for no value or another scheme."""
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _same(presented: str, expected: bytes | None) -> bool:
    return expected is not None and hmac.compare_digest(presented.encode("utf-8", "replace"), expected)


@dataclass(frozen=True)
class TokenPolicy:
    """The tokens of one gateway and the rule applying them (module doc).

    Attributes:
        auth_token: the client token, UTF-8 (None: clients need none).
        admin_token: the admin token, UTF-8 (None: admin calls are refused).
    """

    auth_token: bytes | None
    admin_token: bytes | None

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> TokenPolicy:
        """The policy of ``settings.auth_token`` / ``admin_token``."""

        def raw(secret: SecretStr | None) -> bytes | None:
            return None if secret is None else secret.get_secret_value().encode()

        return cls(raw(settings.auth_token), raw(settings.admin_token))

    @property
    def clients_need_token(self) -> bool:
        """Whether non-admin calls need a token."""
        return self.auth_token is not None

    def access(self, token: str | None) -> Access:
        """What ``token`` (None: none presented) allows; every comparison is constant-time."""
        if token is None:
            return Access.NONE
        if _same(token, self.admin_token):
            return Access.ADMIN
        if _same(token, self.auth_token):
            return Access.CLIENT
        return Access.NONE

    def authenticated(self, token: str | None) -> bool:
        """Whether a caller presenting ``token`` counts as authenticated for non-admin calls
        (always, when clients need no token)."""
        return not self.clients_need_token or self.access(token) is not Access.NONE

    def check(self, token: str | None, *, admin: bool) -> None:
        """Allow a call, or raise why not.

        Args:
            token: the token presented (None: none).
            admin: whether the call is an admin call.

        Raises:
            Unauthenticated: no token, or a token that is neither of the gateway's.
            PermissionDenied: an admin call while admin calls are disabled, or with the client
                token.
        """
        if admin:
            if self.admin_token is None:
                raise PermissionDenied(ENABLE_ADMIN)
            access = self.access(token)
            if access is Access.ADMIN:
                return
            if access is Access.CLIENT:
                raise PermissionDenied("an admin call: it needs the admin token (LIPSYNC_ADMIN_TOKEN)")
            raise Unauthenticated(_missing_or_wrong(token, "the admin token (LIPSYNC_ADMIN_TOKEN)"))
        if self.authenticated(token):
            return
        raise Unauthenticated(_missing_or_wrong(token, "the gateway's token (LIPSYNC_AUTH_TOKEN)"))


def _missing_or_wrong(token: str | None, which: str) -> str:
    if token is None:
        return f"send {which} as `authorization: Bearer <token>`"
    return f"the token sent is not {which}"


# ------------------------------------------------------------------------------ gRPC


def _metadata_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key == AUTHORIZATION:
            return bearer_token(value.decode("latin-1") if isinstance(value, bytes) else value)
    return None


def _refusal(error: GatewayError) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler that answers every call with ``error``'s gRPC status before reading anything
    (a stream-stream handler serves any method kind: nothing is read or written)."""
    code = grpc.StatusCode[error.grpc_status]

    async def refuse(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(code, str(error))

    return grpc.stream_stream_rpc_method_handler(refuse)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks every gRPC call against a `TokenPolicy` before its handler runs (module doc)."""

    def __init__(self, policy: TokenPolicy) -> None:
        self.policy = policy

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        """The call's handler, or a refusal with ``UNAUTHENTICATED`` / ``PERMISSION_DENIED``."""
        method = handler_call_details.method
        admin = method in ADMIN_METHODS
        service = method.split("/")[1] if method.count("/") == 2 else ""
        if service in OPEN_GRPC_SERVICES or (not admin and not self.policy.clients_need_token):
            return await continuation(handler_call_details)
        token = _metadata_token(handler_call_details.invocation_metadata)
        try:
            self.policy.check(token, admin=admin)
        except (Unauthenticated, PermissionDenied) as exc:
            log.debug("gRPC %s refused: %s", method, exc)
            return _refusal(exc)
        return await continuation(handler_call_details)


# ------------------------------------------------------------------------------ HTTP

POLICY_KEY: web.AppKey[TokenPolicy] = web.AppKey("lipsync_token_policy")


def _is_websocket_upgrade(request: web.BaseRequest) -> bool:
    return request.headers.get("Upgrade", "").lower() == "websocket"


def request_token(request: web.BaseRequest) -> str | None:
    """The token an HTTP request presents: the ``Authorization: Bearer`` header, or for a
    WebSocket upgrade also the ``token`` query parameter."""
    token = bearer_token(request.headers.get(AUTHORIZATION))
    if token is None and _is_websocket_upgrade(request):
        token = request.query.get(TOKEN_QUERY) or None
    return token


def caller_authenticated(request: web.Request) -> bool:
    """Whether the caller of an (open) route presented a token that allows client calls
    (always true when clients need no token)."""
    return request.app[POLICY_KEY].authenticated(request_token(request))


def _open_route(request: web.Request) -> bool:
    resource = request.match_info.route.resource
    canonical = resource.canonical if resource is not None else None
    if canonical in OPEN_HTTP_RESOURCES:
        return True
    return canonical in PAGE_RESOURCES and not _is_websocket_upgrade(request)


@web.middleware
async def auth_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Refuse a request without the token (`Unauthenticated`, 401) unless its route is open
    (module doc); unknown paths are refused too, so they reveal nothing. Raises the error for
    the app's error middleware to turn into its JSON body."""
    policy = request.app[POLICY_KEY]
    if policy.clients_need_token and not _open_route(request):
        policy.check(request_token(request), admin=False)
    return await handler(request)


def without_token(request: web.BaseRequest) -> web.BaseRequest:
    """``request`` as the access log may show it: a ``token`` query parameter's value replaced
    by ``REDACTED`` (a clone; the request itself is left alone)."""
    if TOKEN_QUERY not in request.query:
        return request
    query = request.rel_url.query.copy()
    query[TOKEN_QUERY] = "REDACTED"
    return request.clone(rel_url=request.rel_url.with_query(query))


# ------------------------------------------------------------------------------ start-up


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` serves this machine only (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_if_exposed(settings: GatewaySettings) -> None:
    """Log a warning when a non-loopback address is served without a token, or tokens would
    travel in clear text (no TLS)."""
    if is_loopback(settings.host):
        return
    if settings.auth_token is None:
        log.warning(
            "LIPSYNC_AUTH_TOKEN is not set and the gateway binds %s: ANYONE who can reach this "
            "address can use it. Set LIPSYNC_AUTH_TOKEN (and TLS: LIPSYNC_TLS_CERT/KEY), or bind "
            "127.0.0.1 (README, Security)",
            settings.host or "all interfaces",
        )
    elif settings.tls_cert is None:
        log.warning(
            "tokens are checked but TLS is off on %s: they travel in clear text; set "
            "LIPSYNC_TLS_CERT and LIPSYNC_TLS_KEY, or terminate TLS in front of the gateway",
            settings.host or "all interfaces",
        )
