"""TLS of the gateway's ports and of its connection to Triton, from `GatewaySettings`.

- Served ports: ``LIPSYNC_TLS_CERT`` + ``LIPSYNC_TLS_KEY`` (PEM; both or neither, checked by the
  settings) put TLS on the gRPC port (`grpc_server_credentials`) and on the HTTP/WebSocket port
  (`http_ssl_context`: the page, its API and the WebSocket become ``https`` / ``wss``).
  ``LIPSYNC_TLS_CLIENT_CA`` adds mutual TLS: a client must present a certificate signed by that
  CA, on both ports. The optional health port (``LIPSYNC_HEALTH_PORT``) stays plain HTTP, so
  probes need no client certificate.
- Triton: ``LIPSYNC_TRITON_TLS=true`` makes the client of every Triton endpoint
  (`gateway.context`, ``LIPSYNC_TRITON_URL`` may list several) use TLS, checking Triton's
  certificate against ``LIPSYNC_TRITON_TLS_CA`` (default: the system's CAs).

Python's defaults apply (``ssl.create_default_context``: TLS 1.2 or later, no compression).
"""
from __future__ import annotations

import ssl
from pathlib import Path

import grpc

from gateway.config import GatewaySettings


class TlsConfigError(ValueError):
    """A certificate, key or CA file that cannot be used; the message names the file."""


def _read(path: Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TlsConfigError(f"{what} {path}: cannot read it ({exc.strerror})") from exc
    if b"-----BEGIN" not in data:
        raise TlsConfigError(f"{what} {path}: not a PEM file")
    return data


def tls_enabled(settings: GatewaySettings) -> bool:
    """Whether the served ports use TLS."""
    return settings.tls_cert is not None and settings.tls_key is not None


def grpc_server_credentials(settings: GatewaySettings) -> grpc.ServerCredentials | None:
    """Credentials for ``add_secure_port`` (None: TLS off).

    Raises:
        TlsConfigError: a file is unreadable or not PEM.
    """
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    key = _read(settings.tls_key, "LIPSYNC_TLS_KEY")
    chain = _read(settings.tls_cert, "LIPSYNC_TLS_CERT")
    ca = _read(settings.tls_client_ca, "LIPSYNC_TLS_CLIENT_CA") if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=ca, require_client_auth=ca is not None
    )


def http_ssl_context(settings: GatewaySettings) -> ssl.SSLContext | None:
    """The server-side ``ssl.SSLContext`` of the HTTP/WebSocket port (None: TLS off).

    Raises:
        TlsConfigError: the certificate and key do not load (unreadable, not PEM, not a pair),
            or the client CA does not.
    """
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(
            f"LIPSYNC_TLS_CERT {settings.tls_cert} / LIPSYNC_TLS_KEY {settings.tls_key}: {exc}"
        ) from exc
    if settings.tls_client_ca is not None:
        try:
            context.load_verify_locations(cafile=settings.tls_client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise TlsConfigError(f"LIPSYNC_TLS_CLIENT_CA {settings.tls_client_ca}: {exc}") from exc
        context.verify_mode = ssl.CERT_REQUIRED
    return context
