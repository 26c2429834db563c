"""Self-signed TLS material for tests, generated with ``trustme`` (a throw-away CA): a server
certificate for ``127.0.0.1`` / ``localhost`` and a client certificate, as PEM files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass(frozen=True)
class TlsFiles:
    """PEM files under one folder.

    Attributes:
        ca: the test CA's certificate (what clients trust, and the mutual-TLS client CA).
        cert, key: the server's certificate chain and private key.
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
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("client@lipsync.test")
    files = TlsFiles(
        *(
            folder / n
            for n in ("ca.pem", "cert.pem", "key.pem", "client.pem", "client-key.pem", "other-ca.pem")
        )
    )
    ca.cert_pem.write_to_path(str(files.ca))
    server.private_key_pem.write_to_path(str(files.key))
    files.cert.write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    client.private_key_pem.write_to_path(str(files.client_key))
    files.client_cert.write_bytes(b"".join(blob.bytes() for blob in client.cert_chain_pems))
    trustme.CA().cert_pem.write_to_path(str(files.other_ca))
    return files
