"""Property-based tests (hypothesis) of the HTTP routes' path and query parameters, against a
running gateway (the fast tier's, on the in-process fake Triton, in a process of its own).

Any avatar name, frame id (the ``{frame_id}.jpg`` segment) or query string, percent-encoded or
raw, gets an answer the route documents: 200, or a client error (400 bad request, 404 unknown
avatar or route, 405) with, on ``/api/``, the JSON body ``{"error": code, "message": text}``;
never a server error, and the gateway keeps serving.
"""
from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.fake_gateway import FakeGatewayProcess

AVATAR = "synthetic"
FUZZ = settings(max_examples=250, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

CLIENT_ERRORS = {400, 404, 405}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeGatewayProcess]:
    from lipsync.package import SourceMedia, write_package
    from tests.fixtures_packages import synthetic_package_arrays, untrained_weights

    root = tmp_path_factory.mktemp("http-fuzz")
    arrays = synthetic_package_arrays()
    n, h, w = arrays["frames"].shape[:3]
    write_package(
        root / AVATAR, name=AVATAR, weights=untrained_weights(),
        source=SourceMedia(video="v", audio="a", video_fps=25.0, video_frames=n, video_width=w,
                           video_height=h, audio_sample_rate=16000),
        **arrays,
    )
    with FakeGatewayProcess(root) as running:
        yield running
        assert running.alive()


def get(gateway: FakeGatewayProcess, target: str) -> tuple[int, str, bytes]:
    """GET ``target`` (sent as it is): status, content type, body."""
    conn = http.client.HTTPConnection("127.0.0.1", gateway.http_port, timeout=30)
    try:
        conn.putrequest("GET", target, skip_accept_encoding=True)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type", ""), resp.read()
    finally:
        conn.close()


def check_answer(status: int, content_type: str, body: bytes, api: bool) -> None:
    assert status == 200 or status in CLIENT_ERRORS, f"HTTP {status}: {body[:300]!r}"
    if api and status != 200 and content_type.startswith("application/json"):
        error = json.loads(body)
        assert set(error) == {"error", "message"} and isinstance(error["message"], str)


segments = st.one_of(
    st.text(max_size=40).map(lambda t: quote(t, safe="")),  # any text, percent-encoded
    st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="/?#%"),
            max_size=20),  # raw printable ASCII
    st.sampled_from([AVATAR, "..", ".", "%2e%2e", "%00", "%ff", "%", "%2F", "a%2Fb", "9" * 5000]),
)
frame_ids = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.text(max_size=12).map(lambda t: quote(t, safe="")),
    st.sampled_from(["", "1e3", "0x10", " 1", "1_0", "١٢", "+3", "-0", "9" * 5000]).map(
        lambda t: quote(t, safe="")),
)
queries = st.one_of(
    st.just(""),
    st.lists(st.tuples(st.text(max_size=10), st.text(max_size=20)), max_size=4).map(
        lambda kv: "?" + "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in kv)),
    st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="#"),
            max_size=30).map(lambda q: "?" + q),
)


@FUZZ
@given(name=segments, frame_id=frame_ids, query=queries, route=st.sampled_from(["avatar", "audio", "frame"]))
@example(name=AVATAR, frame_id="3", query="", route="frame")
@example(name=AVATAR, frame_id="-1", query="?token=x", route="frame")
def test_avatar_routes(gateway: FakeGatewayProcess, name: str, frame_id: str, query: str, route: str) -> None:
    path = {
        "avatar": f"/api/avatars/{name}",
        "audio": f"/api/avatars/{name}/audio.wav",
        "frame": f"/api/avatars/{name}/frames/{frame_id}.jpg",
    }[route]
    status, content_type, body = get(gateway, path + query)
    check_answer(status, content_type, body, api=True)
    if status == 200 and route == "frame":
        assert content_type == "image/jpeg" and body.startswith(b"\xff\xd8")


FIXED_ROUTES = ["/", "/healthz", "/readyz", "/api/avatars", "/api/stats", "/metrics", "/static/app.js",
                "/static/", "/api", "/ws", "/live"]


@FUZZ
@given(path=st.sampled_from(FIXED_ROUTES), query=queries, tail=segments)
def test_fixed_routes_with_any_query_or_tail(
    gateway: FakeGatewayProcess, path: str, query: str, tail: str
) -> None:
    status, content_type, body = get(gateway, path + query)
    check_answer(status, content_type, body, api=path.startswith("/api"))
    status, content_type, body = get(gateway, f"{path.rstrip('/')}/{tail}{query}")
    check_answer(status, content_type, body, api=path.startswith("/api"))
