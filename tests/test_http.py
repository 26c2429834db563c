"""The gateway's HTTP side: health/readiness, avatar JSON, the avatar's audio, a rendered frame,
stats and Prometheus /metrics, against the real CPU tritonserver and the demo avatar."""
from __future__ import annotations

import asyncio
import json
import socket
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from gateway.ws_protocol import FrameReply, decode_reply, encode_request
from tests.gateway_metrics import exposition_samples

pytestmark = pytest.mark.triton


def get(url: str) -> tuple[int, dict[str, str], bytes]:
    """GET ``url``; returns (status, headers, body) for any status."""
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def get_json(url: str) -> tuple[int, Any]:
    status, headers, body = get(url)
    assert headers["Content-Type"].startswith("application/json"), headers
    return status, json.loads(body)


def ws_frames(http_url: str, frame_ids: list[int]) -> list[Any]:
    import aiohttp

    async def body() -> list[Any]:
        async with aiohttp.ClientSession() as session, session.ws_connect(f"{http_url}/ws") as ws:
            for i in frame_ids:
                await ws.send_bytes(encode_request("demo", i))
            return [decode_reply((await ws.receive(timeout=30)).data) for _ in frame_ids]

    return asyncio.run(body())


@pytest.fixture(scope="module")
def url(served_gateway: Any) -> str:
    return served_gateway.http_url


def test_health_and_readiness(url: str) -> None:
    status, body = get_json(f"{url}/healthz")
    assert status == 200 and body["status"] == "alive"
    status, body = get_json(f"{url}/readyz")
    assert status == 200, body
    assert body["ready"] is True and body["reason"] is None
    assert "demo" in body["avatars"]
    assert body["triton"]["server_ready"] is True


def test_readyz_is_503_with_a_reason_when_triton_is_unreachable(
    start_gateway: Callable[..., Any], gateway_packages_root: Path
) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]
    gw = start_gateway(f"127.0.0.1:{dead_port}", gateway_packages_root)
    status, body = get_json(f"{gw.http_url}/readyz")
    assert status == 503
    assert body["ready"] is False
    assert f"127.0.0.1:{dead_port}" in body["reason"] and "not ready" in body["reason"]
    # liveness stays up: the process serves, it just cannot render
    assert get(f"{gw.http_url}/healthz")[0] == 200


def test_avatar_list_and_details(url: str, demo_package: Any) -> None:
    status, body = get_json(f"{url}/api/avatars")
    assert status == 200
    by_name = {a["name"]: a for a in body["avatars"]}
    demo = by_name["demo"]
    n, h, w, _ = demo_package.frames.shape
    assert (demo["width"], demo["height"], demo["frame_count"]) == (w, h, n)
    assert demo["output_frames"] == demo_package.features.shape[0]
    assert demo["fps"] == 25
    assert demo["trained"] is demo_package.manifest.weights.trained
    assert demo["audio_url"] == "/api/avatars/demo/audio.wav"
    status, one = get_json(f"{url}/api/avatars/demo")
    # init_ms is the answering process's own load time: with workers, each new connection may
    # reach another worker
    assert status == 200 and one.pop("init_ms") > 0 and demo.pop("init_ms") > 0
    assert one == demo


def test_unknown_avatar_is_a_404_json_error(url: str) -> None:
    for path in ("/api/avatars/nobody", "/api/avatars/nobody/audio.wav", "/api/avatars/nobody/frames/0.jpg"):
        status, body = get_json(url + path)
        assert status == 404, path
        assert body["error"] == "unknown_avatar" and "'nobody' is not loaded" in body["message"]


def test_audio_is_the_package_wav(url: str, demo_package: Any) -> None:
    status, headers, body = get(f"{url}/api/avatars/demo/audio.wav")
    assert status == 200
    assert headers["Content-Type"] == "audio/wav"
    assert body == Path(demo_package.audio_path).read_bytes()


def test_frame_endpoint(url: str, demo_package: Any) -> None:
    status, headers, body = get(f"{url}/api/avatars/demo/frames/3.jpg")
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    image = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == demo_package.frames.shape[1:]
    assert [float(v) for v in headers["X-Bounds"].split(",")] == [float(v) for v in demo_package.rects[3]]
    rows = demo_package.features.shape[0]
    status, err = get_json(f"{url}/api/avatars/demo/frames/{rows}.jpg")
    assert status == 400 and err["error"] == "frame_out_of_range"
    status, err = get_json(f"{url}/api/avatars/demo/frames/x.jpg")
    assert status == 400 and err["error"] == "bad_request" and "'x' is not an integer" in err["message"]


def test_metrics_and_stats_move_with_traffic(url: str) -> None:
    before = exposition_samples(get(f"{url}/metrics")[2].decode())
    _, stats_before = get_json(f"{url}/api/stats")

    replies = ws_frames(url, [0, 1, 2])
    assert all(isinstance(r, FrameReply) for r in replies)
    bad = ws_frames(url, [10**9])  # out of range
    assert not isinstance(bad[0], FrameReply)

    status, headers, body = get(f"{url}/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    after = exposition_samples(body.decode())

    def moved(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert moved("lipsync_gateway_requests_total", protocol="ws", outcome="ok") == 3
    assert moved("lipsync_gateway_requests_total", protocol="ws", outcome="error") == 1
    assert moved("lipsync_gateway_errors_total", protocol="ws", code="frame_out_of_range") == 1
    assert moved("lipsync_gateway_stage_latency_seconds_count", stage="inference") == 3
    assert moved("lipsync_gateway_stage_latency_seconds_count", stage="total") == 3
    assert moved("lipsync_gateway_ws_messages_total", kind="binary") == 4
    assert ("lipsync_gateway_in_flight", ()) in after
    assert after[("lipsync_gateway_triton_ready", ())] == 1.0

    _, stats_after = get_json(f"{url}/api/stats")
    demo_before = stats_before["avatars"]["demo"]
    demo_after = stats_after["avatars"]["demo"]
    assert demo_after["total_requests"] - demo_before["total_requests"] == 3
    assert demo_after["errors"] - demo_before["errors"] == 1
    assert (
        0 < demo_after["min_inference_ms"] <= demo_after["avg_inference_ms"] <= demo_after["max_inference_ms"]
    )
    assert stats_after["ready"] is True


def test_web_page_and_static_files(url: str) -> None:
    status, headers, body = get(f"{url}/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    page = body.decode()
    assert '<canvas id="screen"' in page and "/static/app.js" in page
    for name, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        status, headers, _ = get(f"{url}/static/{name}")
        assert status == 200 and kind in headers["Content-Type"], (name, headers)
    assert get(f"{url}/static/../cli.py")[0] in (403, 404)
