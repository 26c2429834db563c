"""The page's Live mode in headless Chromium with a fake microphone fed from a LibriVox WAV
(`--use-fake-device-for-media-stream --use-file-for-fake-audio-capture`): 3 s of speech, then
silence. Frames arrive for every slot, speaking frames while the WAV speaks, idle ones after."""
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
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS

pytestmark = [pytest.mark.browser, pytest.mark.triton]


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
    from playwright.sync_api import sync_playwright

    # long deadlines: the 2-core CPU renders ~10 fps, the test checks behaviour, not speed
    gateway_server = start_gateway(
        triton_server.grpc_url,
        gateway_packages_root,
        live=LiveSettings(render_timeout_s=30.0, encoder_timeout_s=30.0),
    )
    wav = fake_microphone_wav(tmp_path)
    args = [*CHROMIUM_ARGS, "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={wav}%noloop"]
    problems: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=args, headless=True)
        try:
            page = browser.new_page()
            page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
            page.on("console", lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None)
            page.goto(gateway_server.http_url + "/")
            page.wait_for_function("window.lipsync && window.lipsync.ready === true", timeout=15_000)
            page.select_option("#avatar", "demo")
            page.click("#live-mic")
            page.wait_for_function("window.lipsyncLive.stats.state === 'live'", timeout=15_000)
            page.wait_for_function("window.lipsyncLive.stats.frames >= 200", timeout=60_000)
            page.click("#live-stop")
            page.wait_for_function("window.lipsyncLive.stats.state === 'closed'", timeout=60_000)
            stats = page.evaluate("() => ({...window.lipsyncLive.stats})")
            shown = {k: page.inner_text(f"#live-{k}") for k in ("frames", "speaking", "first", "offset")}
        finally:
            browser.close()
    print("live page:", json.dumps({k: v for k, v in stats.items() if k != "speakingSeqs"}), shown)
    assert not problems, problems
    assert not stats["errors"] and stats["gaps"] == 0, stats["errors"]
    assert stats["frames"] >= 200 and stats["drawn"] > 0
    speaking = stats["speakingSeqs"]
    # the WAV speaks for its first 3 s (slots ~0-80 after the microphone opened, plus the VAD's
    # hangover): speaking frames there, idle ones in the silence after
    assert len(speaking) >= 40 and min(speaking) < 30 and max(speaking) < 110, speaking
    assert stats["late"] == 0 and stats["idle"] >= 90
    assert shown["frames"] == str(stats["frames"]) and shown["first"].endswith(" ms")
