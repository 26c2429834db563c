"""Throw-away TLS material for tests, generated with ``cryptography``: a self-signed server
certificate (`self_signed`), or a test CA with a server and a client certificate it signed
(`make_tls_files`, for mutual TLS), as PEM files. Keys are ECDSA P-256; certificates are valid
from an hour ago for a day; server certificates name ``127.0.0.1`` and ``localhost``."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_NAMES: tuple[x509.GeneralName, ...] = (
    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    x509.DNSName("localhost"),
)
"""Where the tests reach a server: its certificates name these."""


@dataclass(frozen=True)
class _Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _issue(
    common_name: str,
    issuer: _Issued | None = None,
    *,
    ca: bool = False,
    names: tuple[x509.GeneralName, ...] = (),
    usage: x509.ObjectIdentifier | None = None,
) -> _Issued:
    """A new key and its certificate, signed by ``issuer`` (None: by itself, self-signed)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    cert = builder.sign(issuer.key if issuer else key, hashes.SHA256())
    return _Issued(cert, key)


def _write(issued: _Issued, cert_path: Path, key_path: Path | None = None) -> None:
    cert_path.write_bytes(issued.cert.public_bytes(serialization.Encoding.PEM))
    if key_path is not None:
        key_path.write_bytes(
            issued.key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A self-signed server certificate (``127.0.0.1``, ``localhost``): ``(cert.pem, key.pem)``
    under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / "cert.pem", folder / "key.pem"
    _write(
        _issue("lipsync test server", names=SERVER_NAMES, usage=ExtendedKeyUsageOID.SERVER_AUTH), cert, key
    )
    return cert, key


@dataclass(frozen=True)
class TlsFiles:
    """PEM files under one folder.

    Attributes:
        ca: the test CA's certificate (what clients trust, and the mutual-TLS client CA).
        cert, key: the server's certificate and private key (signed by ``ca``).
        client_cert, client_key: a client certificate signed by the same CA, and its key.
        other_ca: a second CA's certificate, which signed nothing the server uses.
    """

    ca: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def make_tls_files(folder: Path) -> TlsFiles:
    """Write a fresh CA, a server certificate (127.0.0.1, localhost) and a client certificate."""
    folder.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(
        *(
            folder / n
            for n in ("ca.pem", "cert.pem", "key.pem", "client.pem", "client-key.pem", "other-ca.pem")
        )
    )
    ca = _issue("lipsync test CA", ca=True)
    _write(ca, files.ca)
    server = _issue("lipsync test server", ca, names=SERVER_NAMES, usage=ExtendedKeyUsageOID.SERVER_AUTH)
    _write(server, files.cert, files.key)
    client = _issue("client@lipsync.test", ca, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    _write(client, files.client_cert, files.client_key)
    _write(_issue("another test CA", ca=True), files.other_ca)
    return files
