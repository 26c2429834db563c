"""gRPC service tests against the real CPU tritonserver and the demo avatar.

The image checks compare the gateway's JPEG with a composite computed here, independently of
the gateway code: ONNX Runtime on the avatar's own `model.onnx` and the docs/REFERENCE.md s.2 steps
written out with OpenCV/numpy (not `lipsync.frames`). The gateway runs at JPEG quality 95.
"""
from __future__ import annotations

import filecmp
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from numpy.typing import NDArray

from gateway.audio_features import CHUNK_BYTES, chunk_mel_windows
from gateway.jpeg import OpenCvJpegEncoder, SimpleJpegEncoder
from lipsync import audio as lipsync_audio
from lipsync.paths import MODEL_REPOSITORY_CPU, REPO_ROOT, SPEECH_DIR
from proto import lipsync_pb2 as pb
from proto import lipsync_pb2_grpc as pbg
from tests.reference_frames import decode_jpeg, psnr, reference_composite, reference_window
from tests.triton_stats import settled_counts

AVATAR = "demo"


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def ort_unet(demo_package: Any) -> Any:
    """``pred_fn(inner u8[320,320,3], window f32[16,512]) -> u8[320,320,3]`` via ONNX Runtime
    on the avatar's model in the CPU model repository."""
    import onnxruntime as ort

    from export.model_repo import served_version

    served = served_version(MODEL_REPOSITORY_CPU, demo_package.manifest.model_name)
    assert served is not None
    sess = ort.InferenceSession(str(served.onnx_path), providers=["CPUExecutionProvider"])

    def pred_fn(inner: NDArray[np.uint8], window: NDArray[np.float32]) -> NDArray[np.uint8]:
        (out,) = sess.run(["pred"], {"crop": inner[None], "audio": window[None].astype(np.float32)})
        return out[0]

    return pred_fn


@pytest.fixture(scope="module")
def stub(served_gateway: Any) -> Any:
    with grpc.insecure_channel(served_gateway.grpc_address) as channel:
        yield pbg.OptimizedLipSyncServiceStub(channel)


def infer(stub: Any, frame_id: int, name: str = AVATAR) -> pb.OptimizedInferenceResponse:
    return stub.GenerateInference(
        pb.OptimizedInferenceRequest(model_name=name, frame_id=frame_id), timeout=60
    )


def speech_pcm(seconds: float) -> bytes:
    wavs = sorted(SPEECH_DIR.glob("*.wav"))
    assert wavs, f"no LibriVox WAVs in {SPEECH_DIR} (Debian package pocketsphinx-testdata)"
    wav = lipsync_audio.load_wav_16k_mono(wavs[0])
    n = int(seconds * 16000)
    assert wav.size >= n
    return (np.clip(wav[:n], -1, 1) * 32767).astype("<i2").tobytes()


# ----------------------------------------------------------------------------- no Triton
def test_committed_stubs_are_up_to_date(tmp_path: Path) -> None:
    subprocess.run(["bash", str(REPO_ROOT / "proto" / "generate.sh"), str(tmp_path)], check=True,
                   env={**os.environ, "PYTHON": sys.executable})
    for name in (f"{proto}{suffix}" for proto in ("lipsync", "live", "admin")
                 for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")):
        assert filecmp.cmp(tmp_path / name, REPO_ROOT / "proto" / name, shallow=False), (
            f"proto/{name} is stale: run proto/generate.sh and commit"
        )


def test_proto_wire_contract() -> None:
    """Field numbers and names clients of the original system rely on (issue 4 item 3)."""
    fields = {f.name: f.number for f in pb.OptimizedInferenceResponse.DESCRIPTOR.fields}
    assert fields == {
        "success": 1, "prediction_data": 2, "bounds": 3, "processing_time_ms": 4, "model_name": 5,
        "frame_id": 6, "prediction_shape": 7, "error": 8, "prepare_time_ms": 9,
        "inference_time_ms": 10, "composite_time_ms": 11, "optimizations": 12,
    }
    assert pb.OptimizedInferenceResponse.DESCRIPTOR.fields_by_name["error"].has_presence
    audio = {f.name: f.number for f in pb.BatchInferenceWithAudioRequest.DESCRIPTOR.fields}
    assert audio == {"model_name": 1, "start_frame_id": 2, "frame_count": 3, "audio_chunks": 4}
    svc = pb.DESCRIPTOR.services_by_name["OptimizedLipSyncService"]
    assert svc.full_name == "optimized_lipsyncsrv.OptimizedLipSyncService"
    assert set(svc.methods_by_name) == {
        "GenerateInference", "GenerateBatchInference", "GenerateBatchWithAudio", "StreamInference",
        "LoadPackage", "GetStats", "ListModels", "HealthCheck", "GetVideoFrame", "GetModelMetadata",
    }
    stream = svc.methods_by_name["StreamInference"]
    assert stream.client_streaming and stream.server_streaming


def test_chunk_windows_follow_the_reference_rule() -> None:
    """Per-chunk mel windows equal `lipsync.audio.mel_windows` where it has a window, and the
    last chunks get the window shifted back to the end (docs/REFERENCE.md s.4)."""
    n_chunks = 8 + 5 + 7
    pcm = speech_pcm(n_chunks * 0.04)
    mel = lipsync_audio.mel_spectrogram(lipsync_audio.pcm16_to_float(pcm))
    ref = lipsync_audio.mel_windows(mel)
    ours = chunk_mel_windows(mel, n_chunks)
    assert ours.shape == (n_chunks, 80, 16)
    k = min(len(ref), n_chunks)
    np.testing.assert_array_equal(ours[:k], ref[:k])
    np.testing.assert_array_equal(ours[-1], mel[:, -16:])


@pytest.mark.parametrize(
    "encoder",
    [SimpleJpegEncoder(95), OpenCvJpegEncoder(95), SimpleJpegEncoder(85), OpenCvJpegEncoder(85, "420")],
    ids=lambda e: f"{e.name}-q{e.quality}-{e.subsampling}",
)
def test_jpeg_encoders_take_bgr(encoder: Any) -> None:
    img = np.zeros((64, 96, 3), np.uint8)
    img[:, :32] = (255, 0, 0)    # blue in BGR
    img[:, 32:64] = (0, 255, 0)  # green
    img[:, 64:] = (0, 0, 255)    # red
    out = decode_jpeg(encoder.encode(img))
    assert out.shape == img.shape
    # compare away from the colour edges (4:2:0 chroma blurs them)
    for lo, hi in ((4, 28), (36, 60), (68, 92)):
        assert np.abs(out[8:56, lo:hi].astype(int) - img[8:56, lo:hi].astype(int)).max() <= 12
    assert encoder.subsampling == ("444" if encoder.quality >= 90 else "420")


# ----------------------------------------------------------------------------- frames
@pytest.mark.triton
@pytest.mark.parametrize("which", ["first", "middle", "pingpong"])
def test_generate_inference_matches_reference(
    stub: Any, demo_package: Any, ort_unet: Any, which: str
) -> None:
    n, m = demo_package.frames.shape[0], demo_package.features.shape[0]
    assert m > n + 10, "the demo's audio must outlast its video so ping-pong is exercised"
    frame_id = {"first": 0, "middle": n // 2 - 13, "pingpong": n + 10}[which]
    v = frame_id if frame_id < n else 2 * n - 2 - frame_id  # n + 10 shows video frame n - 12
    frame, rect = demo_package.frames[v], demo_package.rects[v]
    r = infer(stub, frame_id)
    assert r.success, r.error
    assert not r.HasField("error")
    assert r.frame_id == frame_id and r.model_name == AVATAR
    h, w = frame.shape[:2]
    assert r.prediction_shape == f"{h}x{w}x3"
    assert list(r.bounds) == [float(x) for x in rect]
    assert r.inference_time_ms > 0 and r.composite_time_ms > 0 and r.prepare_time_ms >= 0
    got = decode_jpeg(r.prediction_data)
    assert got.shape == (h, w, 3)

    x1, y1, x2, y2 = (int(x) for x in rect)
    outside = np.ones((h, w), bool)
    outside[y1:y2, x1:x2] = False
    assert psnr(got[outside], frame[outside]) >= 40.0

    expected = reference_composite(
        frame, rect, ort_unet, reference_window(np.asarray(demo_package.features), frame_id)
    )
    inside_got, inside_exp = got[y1:y2, x1:x2], expected[y1:y2, x1:x2]
    p_model = psnr(inside_got, inside_exp)
    assert p_model >= 35.0, f"mouth region differs from the ONNX Runtime reference: {p_model:.1f} dB"
    # the check can tell: the source frame (no model) is far from the composite
    assert psnr(frame[y1:y2, x1:x2], inside_exp) < p_model - 5.0


@pytest.mark.triton
def test_stream_inference_answers_50_frames_in_order(stub: Any, demo_package: Any) -> None:
    rng = np.random.default_rng(0)
    ids = [int(i) for i in rng.permutation(demo_package.features.shape[0])[:50]]
    responses = list(stub.StreamInference(
        iter([pb.OptimizedInferenceRequest(model_name=AVATAR, frame_id=i) for i in ids]), timeout=300
    ))
    assert [r.frame_id for r in responses] == ids
    assert all(r.success for r in responses), [r.error for r in responses if not r.success][:3]
    assert all(decode_jpeg(r.prediction_data).shape == demo_package.frames.shape[1:] for r in responses[:5])


@pytest.mark.triton
def test_eight_concurrent_streams_are_answered_and_batched(
    served_gateway: Any, triton_server: Any, demo_package: Any
) -> None:
    model = demo_package.manifest.model_name
    inf0, exe0 = settled_counts(triton_server.grpc_url, model)
    per_stream = 6
    results: dict[int, list[pb.OptimizedInferenceResponse]] = {}
    errors: list[BaseException] = []

    def run(s: int) -> None:
        try:
            with grpc.insecure_channel(served_gateway.grpc_address) as ch:
                reqs = [
                    pb.OptimizedInferenceRequest(model_name=AVATAR, frame_id=s * 10 + k)
                    for k in range(per_stream)
                ]
                results[s] = list(
                    pbg.OptimizedLipSyncServiceStub(ch).StreamInference(iter(reqs), timeout=300)
                )
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    for s in range(8):
        assert [r.frame_id for r in results[s]] == [s * 10 + k for k in range(per_stream)]
        assert all(r.success for r in results[s]), [r.error for r in results[s] if not r.success][:3]
    inf1, exe1 = settled_counts(triton_server.grpc_url, model, at_least=inf0 + 8 * per_stream)
    inferences, executions = inf1 - inf0, exe1 - exe0
    assert inferences == 8 * per_stream
    assert executions < inferences, f"no batching: {executions} executions for {inferences} inferences"


@pytest.mark.triton
def test_batch_inference_in_band_errors(stub: Any, demo_package: Any) -> None:
    m = demo_package.features.shape[0]
    r = stub.GenerateBatchInference(
        pb.BatchInferenceRequest(model_name=AVATAR, frame_ids=[3, -1, 4, m]), timeout=120
    )
    assert [x.frame_id for x in r.responses] == [3, -1, 4, m]
    assert [x.success for x in r.responses] == [True, False, True, False]
    assert "frame_out_of_range" in r.responses[1].error and f"0..{m - 1}" in r.responses[3].error
    assert r.total_processing_time_ms > 0 and r.avg_frame_time_ms > 0


# ----------------------------------------------------------------------------- live audio
def _chunks(pcm: bytes) -> list[bytes]:
    assert len(pcm) % CHUNK_BYTES == 0
    return [pcm[i : i + CHUNK_BYTES] for i in range(0, len(pcm), CHUNK_BYTES)]


@pytest.mark.triton
def test_batch_with_audio_speech_differs_from_silence(stub: Any, demo_package: Any) -> None:
    frames = 3
    n_chunks = 8 + frames + 7
    speech = _chunks(
        speech_pcm(n_chunks * 0.04 + 1.0)[CHUNK_BYTES * 25 :][: n_chunks * CHUNK_BYTES]
    )  # skip 1 s lead-in
    silence = [bytes(CHUNK_BYTES)] * n_chunks

    def run(chunks: list[bytes]) -> list[NDArray[np.uint8]]:
        r = stub.GenerateBatchWithAudio(pb.BatchInferenceWithAudioRequest(
            model_name=AVATAR, start_frame_id=10, frame_count=frames, audio_chunks=chunks), timeout=120)
        assert [x.frame_id for x in r.responses] == [10, 11, 12]
        assert all(x.success for x in r.responses), [x.error for x in r.responses]
        return [decode_jpeg(x.prediction_data) for x in r.responses]

    with_speech, with_silence = run(speech), run(silence)
    for k in range(frames):
        x1, y1, x2, y2 = (int(v) for v in demo_package.rects[10 + k])
        a = with_speech[k][y1:y2, x1:x2].astype(int)
        b = with_silence[k][y1:y2, x1:x2].astype(int)
        assert np.abs(a - b).mean() > 2.0, "speech and silence gave the same mouth region"
        outside = np.ones(with_speech[k].shape[:2], bool)
        outside[y1:y2, x1:x2] = False
        assert psnr(with_speech[k][outside], with_silence[k][outside]) >= 40.0


@pytest.mark.triton
def test_batch_with_audio_matches_reference_mapping(stub: Any, demo_package: Any, ort_unet: Any) -> None:
    """Frame 8 + k uses the encoder features of chunks k..k+15 (gateway/audio_features.py)."""
    import onnxruntime as ort

    frames, start = 2, 8
    n_chunks = 8 + frames + 7
    pcm = speech_pcm(n_chunks * 0.04)
    r = stub.GenerateBatchWithAudio(pb.BatchInferenceWithAudioRequest(
        model_name=AVATAR, start_frame_id=start, frame_count=frames, audio_chunks=_chunks(pcm)), timeout=120)
    assert all(x.success for x in r.responses), [x.error for x in r.responses]

    from export.model_repo import served_version

    encoder = served_version(MODEL_REPOSITORY_CPU, "audio_encoder")
    assert encoder is not None
    enc = ort.InferenceSession(str(encoder.onnx_path), providers=["CPUExecutionProvider"])
    mel = lipsync_audio.mel_spectrogram(lipsync_audio.pcm16_to_float(pcm))
    starts = [min(int(80 * c / 25), mel.shape[1] - 16) for c in range(n_chunks)]
    windows = np.stack([mel[:, s : s + 16] for s in starts]).astype(np.float32)
    (feats,) = enc.run(["feature"], {"mel": windows})
    k = 1
    video = start + k  # the video frame of frame_id 9 (ping-pong: the demo has more frames)
    assert len(demo_package.frames) > video
    frame, rect = demo_package.frames[video], demo_package.rects[video]
    expected = reference_composite(frame, rect, ort_unet, feats[k : k + 16])
    got = decode_jpeg(r.responses[k].prediction_data)
    x1, y1, x2, y2 = (int(v) for v in demo_package.rects[video])
    assert psnr(got[y1:y2, x1:x2], expected[y1:y2, x1:x2]) >= 35.0


def seed_client_chunks(clip: bytes, start: int, frames: int, extra: int = 0) -> list[bytes]:
    """What a client of the original system sends for frames start .. start+frames-1: the
    clip's 40 ms chunks [max(0, start-8), start+frames+7) (plus ``extra`` more after them)."""
    chunks = _chunks(clip)
    end = start + frames + 7 + extra
    assert len(chunks) >= end
    return chunks[max(0, start - 8) : end]


def full_context_rows(n_chunks: int) -> list[int]:
    """Rows (chunks) of an n-chunk clip whose mel window lies inside the clip: chunk r's 16 mel
    frames start at int(80 r / 25), mel frame t covers samples [200 t - 400, 200 t + 400)
    (docs/REFERENCE.md s.4), so the rows after these depend on where the clip ends."""
    return [r for r in range(n_chunks) if 200 * (int(80 * r / 25) + 15) + 400 <= 640 * n_chunks]


@pytest.fixture(scope="module")
def speech_clip() -> bytes:
    """4 s of LibriVox speech from 1 s into the recording (past its lead-in silence)."""
    return speech_pcm(5.0)[25 * CHUNK_BYTES :]


@pytest.mark.triton
@pytest.mark.parametrize("start", [0, 3, 8])
def test_batch_with_audio_serves_the_start_of_a_clip(
    stub: Any, gateway_server: Any, speech_clip: bytes, start: int
) -> None:
    """Issue 13: a seed client's request at start_frame_id 0, 3 and 8 (frame_count 10) gets 10
    frames, each rendered with the window of chunks start+k-8 .. start+k+7, zeros before the
    clip's first chunk; 2 extra chunks at the end change nothing."""
    from gateway.audio_features import FeatureWindow
    from gateway.frame_request import FrameRequest

    frames = 10
    chunks = seed_client_chunks(speech_clip, start, frames)
    assert len(chunks) == min(start, 8) + frames + 7

    def ask(chunks: list[bytes]) -> list[bytes]:
        r = stub.GenerateBatchWithAudio(pb.BatchInferenceWithAudioRequest(
            model_name=AVATAR, start_frame_id=start, frame_count=frames, audio_chunks=chunks), timeout=300)
        assert [x.frame_id for x in r.responses] == list(range(start, start + frames))
        assert all(x.success for x in r.responses), [x.error for x in r.responses]
        return [x.prediction_data for x in r.responses]

    got = ask(chunks)
    assert ask(seed_client_chunks(speech_clip, start, frames, extra=2)) == got, "extra chunks change nothing"

    ctx = gateway_server.ctx
    # the feature rows of the clip with full context (40 chunks, encoder in Triton), row c = chunk c
    full = gateway_server.call(lambda: ctx.pipeline.audio.features(b"".join(_chunks(speech_clip)[:40]), 40))
    first = max(0, start - 8)  # the clip chunk the request's chunk 0 is
    present = {first + r for r in full_context_rows(len(chunks))}
    windows = gateway_server.call(lambda: ctx.pipeline.audio.batch_windows(chunks, frames, start))
    for k, window in enumerate(windows):
        i = start + k
        for j in range(16):
            row = i - 8 + j  # clip chunk at window position j
            if row < 0:
                assert not window.rows[j].any(), f"frame {i}: position {j} is before the clip: zeros"
            elif row in present:
                np.testing.assert_allclose(window.rows[j], full[row], atol=1e-4, err_msg=f"{i}: row {row}")
        # the frame is the one rendered with that window
        request = FrameRequest(AVATAR, i, FeatureWindow(window.rows))
        again = gateway_server.call(lambda r=request: ctx.pipeline.render(r, protocol="grpc"))
        assert again.jpeg == got[k], f"frame {i}"
    if start >= 8:
        # today's rule, unchanged: frame start+k uses rows k .. k+15 of the request's chunks
        rows = gateway_server.call(lambda: ctx.pipeline.audio.features(b"".join(chunks), len(chunks)))
        for k, window in enumerate(windows):
            np.testing.assert_array_equal(window.rows, rows[k : k + 16])


@pytest.mark.triton
@pytest.mark.parametrize(
    ("start", "n_chunks", "need"), [(8, 0, 18), (8, 8 + 3 + 6, 18), (20, 3, 18), (0, 9, 10), (5, 14, 15)]
)
def test_batch_with_audio_refuses_too_few_chunks(stub: Any, start: int, n_chunks: int, need: int) -> None:
    chunks = [bytes(CHUNK_BYTES)] * n_chunks
    r = stub.GenerateBatchWithAudio(pb.BatchInferenceWithAudioRequest(
        model_name=AVATAR, start_frame_id=start, frame_count=3, audio_chunks=chunks), timeout=60)
    assert r.responses and not any(x.success for x in r.responses)
    assert f"expected {need} audio chunks for start_frame_id={start}, frame_count=3" in r.responses[0].error
    assert "at the start of a clip" in r.responses[0].error and f"got {n_chunks}" in r.responses[0].error


@pytest.mark.triton
def test_batch_with_audio_refuses_wrong_chunk_size(stub: Any) -> None:
    chunks = [bytes(CHUNK_BYTES)] * 18
    chunks[5] = bytes(1000)
    r = stub.GenerateBatchWithAudio(pb.BatchInferenceWithAudioRequest(
        model_name=AVATAR, start_frame_id=0, frame_count=3, audio_chunks=chunks), timeout=60)
    assert not r.responses[0].success and "audio chunk 5 has 1000 bytes" in r.responses[0].error


@pytest.mark.triton
def test_batch_with_audio_frame_ids_past_int32_are_refused_in_band(stub: Any) -> None:
    top = 2**31 - 1
    r = stub.GenerateBatchWithAudio(
        pb.BatchInferenceWithAudioRequest(
            model_name=AVATAR, start_frame_id=top, frame_count=3, audio_chunks=[bytes(CHUNK_BYTES)] * 18
        ),
        timeout=60,
    )
    assert [x.frame_id for x in r.responses] == [top]
    assert not r.responses[0].success
    assert r.responses[0].error.startswith("frame_out_of_range: ") and str(top) in r.responses[0].error


# ----------------------------------------------------------------------------- info RPCs
@pytest.mark.triton
def test_video_frames_metadata_stats_list_health(stub: Any, served_gateway: Any, demo_package: Any) -> None:
    v = 7
    full = stub.GetVideoFrame(pb.GetVideoFrameRequest(model_name=AVATAR, frame_id=v, video_type="full_body"))
    assert full.success and psnr(decode_jpeg(full.frame_data), demo_package.frames[v]) >= 40.0
    face = stub.GetVideoFrame(
        pb.GetVideoFrameRequest(model_name=AVATAR, frame_id=v, video_type="face_regions")
    )
    assert face.success and decode_jpeg(face.frame_data).shape == (328, 328, 3)
    masked = decode_jpeg(stub.GetVideoFrame(pb.GetVideoFrameRequest(
        model_name=AVATAR, frame_id=v, video_type="masked_regions")).frame_data)
    assert masked.shape == (320, 320, 3)
    assert masked[20:290, 20:300].max() <= 8 and masked[312:, :].mean() > 10  # mouth box black, rest not
    bad = stub.GetVideoFrame(pb.GetVideoFrameRequest(model_name=AVATAR, frame_id=v, video_type="thumbnail"))
    assert not bad.success and "unknown video_type 'thumbnail'" in bad.error

    meta = stub.GetModelMetadata(pb.GetModelMetadataRequest(model_name=AVATAR))
    assert meta.success and meta.frame_count == demo_package.features.shape[0]
    assert list(meta.available_videos) == ["full_body", "face_regions", "masked_regions"]
    assert len(meta.bounds) == 4 * demo_package.frames.shape[0] and meta.audio_path.endswith(".wav")
    assert not stub.GetModelMetadata(pb.GetModelMetadataRequest(model_name="nobody")).success

    infer(stub, 1)
    stats = stub.GetStats(pb.StatsRequest(model_name=AVATAR))
    assert (
        stats.total_requests >= 1
        and 0 < stats.min_inference_time_ms <= stats.avg_inference_time_ms <= stats.max_inference_time_ms
    )
    with pytest.raises(grpc.RpcError) as err:
        stub.GetStats(pb.StatsRequest(model_name="nobody"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    models = stub.ListModels(pb.ListModelsRequest())
    assert AVATAR in models.loaded_models and models.count == len(models.loaded_models)
    health = stub.HealthCheck(pb.HealthRequest())
    assert health.healthy and health.status == "SERVING" and health.loaded_models >= 1

    with grpc.insecure_channel(served_gateway.grpc_address) as ch:
        std = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))
        assert std.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        answer = next(
            refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        )
        names = {s.name for s in answer.list_services_response.service}
        assert {"optimized_lipsyncsrv.OptimizedLipSyncService", "grpc.health.v1.Health"} <= names
