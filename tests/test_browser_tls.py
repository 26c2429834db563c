"""The web page over ``https`` / ``wss`` with an access token, in headless Chromium against the
real CPU Triton: a gateway with ``LIPSYNC_AUTH_TOKEN`` and a self-signed TLS certificate the test
generates (`tests.tls_files.self_signed`); Chromium trusts exactly that certificate (its SPKI
pinned with ``--ignore-certificate-errors-spki-list``). The page asks for the token when the gateway answers
401, then plays the demo avatar; opened as ``/?token=...`` it plays at once and drops the token
from the address bar."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.test_browser import chromium
from tests.tls_files import self_signed

pytestmark = [pytest.mark.browser, pytest.mark.triton]

TOKEN = "page-token-3c2b1a0f9e8d7c6b"


def spki_pin(cert_pem: Path) -> str:
    """base64(sha256(SubjectPublicKeyInfo)) of the first certificate in a PEM file."""
    cert = x509.load_pem_x509_certificate(cert_pem.read_bytes())
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The gateway's self-signed certificate and key."""
    return self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def pinned_browser(tls: tuple[Path, Path]) -> Iterator[Any]:
    with chromium(f"--ignore-certificate-errors-spki-list={spki_pin(tls[0])}") as browser:
        yield browser


def play(page: Any, seconds_ms: int = 3_000) -> dict[str, Any]:
    page.wait_for_function("window.lipsync && window.lipsync.ready === true", timeout=30_000)
    page.select_option("#avatar", "demo")
    page.click("#play")
    page.wait_for_function("window.lipsync.stats.playing === true", timeout=60_000)
    page.wait_for_timeout(seconds_ms)
    stats: dict[str, Any] = page.evaluate("() => ({...window.lipsync.stats})")
    page.click("#stop")
    return stats


def test_page_plays_over_https_and_wss_with_the_token(
    pinned_browser: Any,
    tls: tuple[Path, Path],
    triton_server: Any,
    gateway_packages_root: Path,
    start_gateway: Any,
) -> None:
    gateway = start_gateway(
        triton_server.grpc_url, gateway_packages_root, auth_token=TOKEN, tls_cert=tls[0], tls_key=tls[1]
    )
    url = gateway.http_url
    assert url.startswith("https://")

    page = pinned_browser.new_page()
    problems: list[str] = []
    sockets: list[str] = []
    page.on(
        "console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None
    )
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("websocket", lambda ws: sockets.append(ws.url))
    try:
        page.goto(url + "/")
        page.wait_for_selector("#token-form", state="visible", timeout=15_000)
        assert "needs an access token" in page.inner_text("#status")
        # the one refusal the page expects: /api/avatars without the token
        assert all("401" in p for p in problems), problems
        problems.clear()
        page.fill("#token", TOKEN)
        page.click("#token-form button")
        stats = play(page)
        assert page.is_hidden("#token-form")
    finally:
        page.close()
    print("browser stats:", json.dumps(stats))
    assert not problems, problems
    assert stats["errors"] == 0, stats.get("lastError")
    assert stats["clock"] == "audio", "the WAV was fetched with the token and played"
    assert stats["framesDrawn"] >= 3 and stats["requested"] > 4, stats
    assert sockets and all(s.startswith("wss://") and "/ws?token=" in s for s in sockets), sockets

    page = pinned_browser.new_page()
    try:
        page.goto(f"{url}/?token={TOKEN}")
        stats = play(page, 1_500)
        assert "token" not in page.url, "the token left the address bar"
        assert page.is_hidden("#token-form")
    finally:
        page.close()
    assert stats["errors"] == 0 and stats["framesReceived"] >= 1, stats
