"""The page's Live mode in headless Chromium with a fake microphone fed from a LibriVox WAV
(`--use-fake-device-for-media-stream --use-file-for-fake-audio-capture`): 3 s of speech, then
silence. Frames arrive for every slot, speaking frames while the WAV speaks, idle ones after.

The microphone runs in real time and the shared 2-core CPU renders 0.3-10 UNet frames/s (loaded
to idle), so the avatar's mouth lags the voice; a speaking slot whose render cannot be done
within `LiveSettings.render_timeout_s` (120 s here) of its audio is sent idle and marked late
(`gateway.live.admission`: a user sees the video go on rather than stall). So the test asserts
what a user relies on whatever the machine's load: every slot arrives in order, the speech is
covered by speaking frames or, where the server gave up, late ones, and at least some speaking
frames are shown; and it asserts that no speaking frame is given up when the machine could
render them all: when the UNet's time per frame during the test (Triton's own statistics)
times the speech's slots fits in half the render budget, every speech slot must be speaking."""
from __future__ import annotations

import json
import shutil
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.live.settings import LiveSettings
from tests.fixtures_live import speech_paths, speech_pcm16
from tests.test_browser import CHROMIUM, chromium
from tests.triton_stats import compute_totals, settled_counts

pytestmark = [pytest.mark.browser, pytest.mark.triton]

UNET = "lipsync_demo"
RENDER_TIMEOUT_S = 120.0
"""Render and encoder deadline of the test's gateway (s): the CPU renders 0.3-10 frames/s."""


def fake_microphone_wav(folder: Path) -> Path:
    """3 s of LibriVox speech then 5 s of silence, 48 kHz 16-bit mono (a browser's rate)."""
    import soxr

    speech = speech_pcm16(speech_paths()[1])[: 3 * 16000]
    pcm = np.concatenate([soxr.resample(speech, 16000, 48000), np.zeros(5 * 48000, np.int16)])
    path = folder / "microphone.wav"
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(48000)
        out.writeframes(pcm.astype("<i2").tobytes())
    return path


def test_live_mode_with_a_fake_microphone(
    triton_server: Any, gateway_packages_root: Path, start_gateway: Any, tmp_path: Path
) -> None:
    if shutil.which(CHROMIUM) is None:
        pytest.skip(f"{CHROMIUM} is not installed (Debian package chromium)")
    gateway_server = start_gateway(
        triton_server.grpc_url,
        gateway_packages_root,
        live=LiveSettings(render_timeout_s=RENDER_TIMEOUT_S, encoder_timeout_s=RENDER_TIMEOUT_S),
    )
    unet_before = compute_totals(triton_server.grpc_url, UNET)
    wav = fake_microphone_wav(tmp_path)
    args = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={wav}%noloop"]
    problems: list[str] = []
    with chromium(*args) as browser:
        page = browser.new_page()
        page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
        page.on("console", lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None)
        page.goto(gateway_server.http_url + "/")
        page.wait_for_function("window.lipsync && window.lipsync.ready === true", timeout=15_000)
        page.select_option("#avatar", "demo")
        page.click("#live-mic")
        page.wait_for_function("window.lipsyncLive.stats.state === 'live'", timeout=15_000)
        page.wait_for_function("window.lipsyncLive.stats.frames >= 200", timeout=150_000)
        page.click("#live-stop")
        page.wait_for_function("window.lipsyncLive.stats.state === 'closed'", timeout=150_000)
        stats = page.evaluate("() => ({...window.lipsyncLive.stats})")
        shown = {k: page.inner_text(f"#live-{k}") for k in ("frames", "speaking", "first", "offset")}
    settled_counts(triton_server.grpc_url, UNET, at_least=unet_before[0] + stats["speaking"])
    frames_after, compute_after = compute_totals(triton_server.grpc_url, UNET)
    frames_run, compute_s = frames_after - unet_before[0], compute_after - unet_before[1]
    failed = gateway_server.ctx.metrics.registry.get_sample_value(
        "lipsync_gateway_requests_total", {"protocol": "live", "outcome": "error"}
    )
    quiet = {"speakingSeqs", "lateSeqs"}
    print("live page:", json.dumps({k: v for k, v in stats.items() if k not in quiet}), shown,
          f"UNet: {frames_run} frames in {compute_s:.1f} s")
    assert not problems, problems
    assert not stats["errors"] and stats["gaps"] == 0, stats["errors"]
    assert stats["frames"] >= 200 and stats["drawn"] > 0
    assert stats["frames"] == stats["speaking"] + stats["late"] + stats["idle"]
    # the WAV speaks for its first 3 s (slots ~0-80 after the microphone opened, plus the VAD's
    # hangover): speech slots there (speaking, or late where the render was given up), idle
    # ones in the silence after
    speech = sorted(stats["speakingSeqs"] + stats["lateSeqs"])
    assert len(speech) >= 40 and min(speech) < 30 and max(speech) < 110, speech
    assert stats["idle"] >= 90
    # the mouth moves: speaking frames are rendered (none of the renders failed: a late slot is
    # one the renderer could not finish in time, not an error)
    assert stats["speaking"] > 0 and not failed, (stats["speaking"], failed)
    # and every speech slot is rendered when the machine can: the UNet's time per frame, as
    # loaded as it was, times the speech slots within half the render budget
    assert frames_run >= stats["speaking"]
    needed_s = compute_s / frames_run * len(speech)
    if needed_s <= RENDER_TIMEOUT_S / 2:
        assert stats["late"] == 0, (stats["lateSeqs"], f"{needed_s:.1f} s of UNet time needed")
    assert shown["frames"] == str(stats["frames"]) and shown["first"].endswith(" ms")
