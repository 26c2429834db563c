"""The real CPU tritonserver (nvidia-pytriton wheel) serving the CPU profile.

- Concurrent gRPC requests to the UNet are answered with the same bytes (<= 1 LSB) as ONNX
  Runtime in-process, and Triton's own statistics show they were batched.
- The audio encoder answers like ONNX Runtime.
- A `load_model` of a loaded model serves the version the writer published since.
- The launcher fails with clear errors (missing repository, missing model file, busy port,
  broken model config with the log tail), survives kill + restart on the same ports, and
  `lipsync triton` stops cleanly on SIGTERM.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from numpy.typing import NDArray

from export.model_repo import served_version, write_audio_encoder_model
from lipsync.contract import (
    AUDIO_ENCODER_MODEL,
    ENCODER_FEATURE,
    ENCODER_MEL,
    UNET_AUDIO,
    UNET_CROP,
    UNET_PRED,
    TensorSpec,
    avatar_model_name,
)
from lipsync.paths import REPO_ROOT
from lipsync.triton_local import TritonServer, TritonStartError, free_ports, port_in_use
from tests.fixtures_triton import TEST_AVATAR, StartTriton, UntrainedOnnx, group_gone
from tests.triton_stats import settled_counts

pytestmark = pytest.mark.triton

UNET_MODEL = avatar_model_name(TEST_AVATAR)
N_REQUESTS = 10


def _unet_inputs(rng: np.random.Generator, batch: int) -> tuple[NDArray[np.uint8], NDArray[np.float32]]:
    crop = rng.integers(0, 256, size=UNET_CROP.batch_shape(batch), dtype=np.uint8)
    audio = rng.standard_normal(UNET_AUDIO.batch_shape(batch)).astype(np.float32)
    return crop, audio


def _infer_input(spec: TensorSpec, array: NDArray[Any]) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(spec.name, list(array.shape), spec.triton_dtype)
    tensor.set_data_from_numpy(array)
    return tensor


def _infer_inputs(crop: NDArray[np.uint8], audio: NDArray[np.float32]) -> list[grpcclient.InferInput]:
    return [_infer_input(UNET_CROP, crop), _infer_input(UNET_AUDIO, audio)]


def _model_stats(client: grpcclient.InferenceServerClient, model: str) -> Any:
    stats = client.get_inference_statistics(model_name=model).model_stats
    assert len(stats) == 1
    return stats[0]


def test_concurrent_requests_are_batched_and_match_onnxruntime(
    start_triton: StartTriton, untrained_model_repo: Path, untrained_onnx: UntrainedOnnx
) -> None:
    server = start_triton(untrained_model_repo, load_models=(UNET_MODEL,))
    rng = np.random.default_rng(7)
    requests = [_unet_inputs(rng, batch=1) for _ in range(N_REQUESTS)]

    client = grpcclient.InferenceServerClient(server.grpc_url)
    before = _model_stats(client, UNET_MODEL)
    assert before.inference_count == 0

    results: dict[int, NDArray[np.uint8]] = {}
    errors: dict[int, Exception] = {}
    done = threading.Semaphore(0)

    def callback(
        index: int, result: grpcclient.InferResult | None, error: Exception | None
    ) -> None:
        if error is not None:
            errors[index] = error
        else:
            assert result is not None
            results[index] = result.as_numpy(UNET_PRED.name)
        done.release()

    # All requests are in flight at once (async_infer returns immediately).
    for index, (crop, audio) in enumerate(requests):
        client.async_infer(
            UNET_MODEL,
            _infer_inputs(crop, audio),
            callback=lambda result, error, index=index: callback(index, result, error),
            outputs=[grpcclient.InferRequestedOutput(UNET_PRED.name)],
            client_timeout=120.0,
        )
    for _ in range(N_REQUESTS):
        assert done.acquire(timeout=150.0), "a Triton request got no answer"
    assert not errors, errors

    session = ort.InferenceSession(str(untrained_onnx.unet), providers=["CPUExecutionProvider"])
    for index, (crop, audio) in enumerate(requests):
        feeds = {UNET_CROP.name: crop, UNET_AUDIO.name: audio}
        (expected,) = session.run([UNET_PRED.name], feeds)
        got = results[index]
        assert got.shape == UNET_PRED.batch_shape(1) and got.dtype == UNET_PRED.dtype
        diff = np.abs(got.astype(np.int16) - expected.astype(np.int16))
        assert diff.max() <= 1, f"request {index}: max difference {diff.max()} LSB"

    settled_counts(server.grpc_url, UNET_MODEL, at_least=N_REQUESTS)
    stats = _model_stats(client, UNET_MODEL)
    assert stats.inference_count == N_REQUESTS
    assert stats.inference_stats.fail.count == 0
    # Batched: fewer model executions than inferences, and some execution ran a batch > 1.
    assert stats.execution_count < stats.inference_count, (
        f"{stats.execution_count} executions for {stats.inference_count} inferences"
    )
    assert max(b.batch_size for b in stats.batch_stats) > 1
    assert sum(b.batch_size * b.compute_infer.count for b in stats.batch_stats) == N_REQUESTS
    client.close()


def _encode(client: grpcclient.InferenceServerClient, mel: NDArray[np.float32]) -> NDArray[np.float32]:
    result = client.infer(AUDIO_ENCODER_MODEL, [_infer_input(ENCODER_MEL, mel)])
    return result.as_numpy(ENCODER_FEATURE.name)


def _encode_with_onnxruntime(onnx_path: Path, mel: NDArray[np.float32]) -> NDArray[np.float32]:
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return session.run([ENCODER_FEATURE.name], {ENCODER_MEL.name: mel})[0]


def test_audio_encoder_matches_onnxruntime(
    start_triton: StartTriton, untrained_model_repo: Path, untrained_onnx: UntrainedOnnx
) -> None:
    server = start_triton(untrained_model_repo, load_models=(AUDIO_ENCODER_MODEL,))
    mel = np.random.default_rng(3).standard_normal(ENCODER_MEL.batch_shape(5)).astype(np.float32)
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        assert not client.is_model_ready(UNET_MODEL)  # explicit mode: only what was asked
        feature = _encode(client, mel)
    expected = _encode_with_onnxruntime(untrained_onnx.audio_encoder, mel)
    assert feature.shape == ENCODER_FEATURE.batch_shape(5) and feature.dtype == np.float32
    np.testing.assert_allclose(feature, expected, rtol=1e-5, atol=1e-5)


def test_load_model_serves_the_newly_published_version(
    start_triton: StartTriton, untrained_onnx: UntrainedOnnx, tmp_path: Path
) -> None:
    """What the gateway relies on: after a rebuild, `load_model` of the loaded model makes Triton
    serve the new version; until then the old one keeps serving, untouched."""
    repo = tmp_path / "repo"
    first = write_audio_encoder_model(repo, untrained_onnx.audio_encoder, "cpu")
    server = start_triton(repo, load_models=(AUDIO_ENCODER_MODEL,))
    mel = np.random.default_rng(5).standard_normal(ENCODER_MEL.batch_shape(3)).astype(np.float32)
    old = _encode_with_onnxruntime(untrained_onnx.audio_encoder, mel)
    new = _encode_with_onnxruntime(untrained_onnx.other_audio_encoder, mel)
    assert not np.allclose(old, new, atol=1e-3)
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        np.testing.assert_allclose(_encode(client, mel), old, rtol=1e-5, atol=1e-5)

        second = write_audio_encoder_model(
            repo, untrained_onnx.other_audio_encoder, "cpu", replace=True
        )
        assert second.version == first.version + 1 and first.onnx_path.is_file()
        np.testing.assert_allclose(_encode(client, mel), old, rtol=1e-5, atol=1e-5)

        client.load_model(AUDIO_ENCODER_MODEL)
        assert client.get_model_metadata(AUDIO_ENCODER_MODEL).versions == [str(second.version)]
        np.testing.assert_allclose(_encode(client, mel), new, rtol=1e-5, atol=1e-5)
    assert served_version(repo, AUDIO_ENCODER_MODEL) == second


def test_kill_then_restart_on_the_same_ports(
    start_triton: StartTriton, untrained_model_repo: Path
) -> None:
    server = start_triton(untrained_model_repo, load_models=(AUDIO_ENCODER_MODEL,))
    pid = server.pid
    assert pid is not None
    server.kill()
    assert not server.is_running
    assert group_gone(pid), "tritonserver's process group (backend stubs) outlived kill()"
    server.start(timeout_s=120.0)
    assert server.is_running and server.pid != pid
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        assert client.is_server_ready() and client.is_model_ready(AUDIO_ENCODER_MODEL)


def _server_on(repo: Path, **kwargs: Any) -> TritonServer:
    http_port, grpc_port, metrics_port = free_ports(3)
    return TritonServer(
        repo,
        http_port=http_port,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        **kwargs,
    )


def _find_install_in_subprocess(python_args: list[str], pythonpath: list[Path]) -> str:
    code = (
        "from lipsync.triton_local import TritonStartError, find_triton_install\n"
        "try:\n    find_triton_install()\nexcept TritonStartError as exc:\n    print(exc)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in pythonpath)}
    command = [sys.executable, *python_args, "-c", code]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_missing_or_incomplete_tritonserver_wheel_is_a_clear_error(tmp_path: Path) -> None:
    # No nvidia-pytriton at all: `-S` hides the environment's site-packages.
    out = _find_install_in_subprocess(["-S"], [REPO_ROOT])
    assert "nvidia-pytriton wheel, which is not installed" in out
    # A `pytriton` package without the server files (a broken or foreign install).
    fake = tmp_path / "site" / "pytriton"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    out = _find_install_in_subprocess([], [tmp_path / "site", REPO_ROOT])
    binary = fake / "tritonserver" / "bin" / "tritonserver"
    assert f"tritonserver binary not found at {binary}" in out


def test_stub_without_its_libpython_is_a_clear_error() -> None:
    # The stub built for Python 3.8 needs libpython3.8, which Debian 12 does not have.
    import ctypes.util
    import dataclasses

    from lipsync.triton_local import check_stub_libraries, find_triton_install

    if shutil.which("ldd") is None or ctypes.util.find_library("python3.8") is not None:
        pytest.skip("needs ldd and a machine without libpython3.8")
    install = find_triton_install()
    check_stub_libraries(install)  # this Python's stub loads
    stub_38 = install.stub.parent.parent / "3.8" / "triton_python_backend_stub"
    with pytest.raises(TritonStartError, match=r"cannot load libpython3\.8\.so.*libpython3\.8"):
        check_stub_libraries(dataclasses.replace(install, stub=stub_38))


def test_missing_model_repository_is_a_clear_error(tmp_path: Path) -> None:
    server = _server_on(tmp_path / "no_such_repo")
    with pytest.raises(TritonStartError, match=r"model repository .*no_such_repo does not exist"):
        server.start()
    assert server.pid is None


def test_missing_model_and_model_file_are_clear_errors(
    tmp_path: Path, untrained_model_repo: Path
) -> None:
    with pytest.raises(TritonStartError, match=r"model 'lipsync_nobody' is not in .*lipsync_test"):
        _server_on(untrained_model_repo, load_models=("lipsync_nobody",)).start()

    broken = tmp_path / "repo" / "lipsync_x"
    (broken / "1").mkdir(parents=True)
    (broken / "config.pbtxt").write_text(
        (untrained_model_repo / UNET_MODEL / "config.pbtxt").read_text()
    )  # names version 1, which holds no model file
    with pytest.raises(
        TritonStartError, match=r"model 'lipsync_x': no version folder .* model file"
    ):
        _server_on(tmp_path / "repo").start()


def test_busy_port_is_a_clear_error(untrained_model_repo: Path) -> None:
    http_port, grpc_port, metrics_port = free_ports(3)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", grpc_port))
        listener.listen()
        server = TritonServer(
            untrained_model_repo,
            http_port=http_port,
            grpc_port=grpc_port,
            metrics_port=metrics_port,
        )
        with pytest.raises(TritonStartError, match=rf"gRPC port {grpc_port} .* already in use"):
            server.start()
        assert server.pid is None  # nothing was started


def test_interrupt_while_waiting_for_ready_stops_the_server(
    untrained_model_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = _server_on(untrained_model_repo)

    def interrupted(timeout_s: float, cancel: object) -> None:
        raise KeyboardInterrupt  # Ctrl-C between the spawn and readiness

    monkeypatch.setattr(server, "_wait_ready", interrupted)
    with pytest.raises(KeyboardInterrupt):
        server.start()
    assert server.pid is not None and not server.is_running
    assert group_gone(server.pid), "tritonserver outlived an interrupted start()"


def test_broken_model_config_reports_the_log_tail(
    tmp_path: Path, broken_model_repo: Path
) -> None:
    server = _server_on(broken_model_repo, log_file=tmp_path / "triton.log")
    with pytest.raises(
        TritonStartError, match=r"exited with status \d+ before it was ready"
    ) as info:
        server.start(timeout_s=120.0)
    # The message carries Triton's own error lines; the log file got them too.
    assert "failed to load 'lipsync_broken'" in str(info.value)
    assert "Protobuf parsing failed" in str(info.value)
    assert "lipsync_broken" in (tmp_path / "triton.log").read_text()
    assert not server.is_running


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=1.0) as response:
            return response.status == 200
    except OSError:
        return False


def test_cli_serves_until_sigterm(untrained_model_repo: Path, tmp_path: Path) -> None:
    http_port, grpc_port, metrics_port = free_ports(3)
    command = [
        sys.executable,
        "-m",
        "lipsync",
        "triton",
        "--model-repository",
        str(untrained_model_repo),
        "--http-port",
        str(http_port),
        "--grpc-port",
        str(grpc_port),
        "--metrics-port",
        str(metrics_port),
        "--load-model",
        AUDIO_ENCODER_MODEL,
    ]
    with (tmp_path / "cli.log").open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while not _ready(f"http://127.0.0.1:{http_port}"):
                assert process.poll() is None, (tmp_path / "cli.log").read_text()
                assert time.monotonic() < deadline, "lipsync triton not ready in 120 s"
                time.sleep(0.3)
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0, (tmp_path / "cli.log").read_text()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    for port in (http_port, grpc_port, metrics_port):
        assert not port_in_use(port), f"port {port} still in use after SIGTERM"


def _gather_model(repo: Path) -> None:
    """A Python-backend model (our model.py) over a tiny ONNX graph that fails on bad data:
    `index` INT64 [N,1] -> `value` FP32 [N,1] = table[index], table = [10, 20, 30, 40];
    an index outside 0..3 makes ONNX Runtime raise."""
    from onnx import TensorProto, helper, numpy_helper

    from export.model_repo import PYTHON_BACKEND_MODEL

    table = numpy_helper.from_array(np.array([10, 20, 30, 40], dtype=np.float32), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "index"], ["value"], axis=0)],
        "gather",
        [helper.make_tensor_value_info("index", TensorProto.INT64, ["N", 1])],
        [helper.make_tensor_value_info("value", TensorProto.FLOAT, ["N", 1])],
        initializer=[table],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    folder = repo / "gather"
    (folder / "1").mkdir(parents=True)
    (folder / "1" / "model.onnx").write_bytes(model.SerializeToString())
    (folder / "1" / "model.py").write_text(PYTHON_BACKEND_MODEL.read_text())
    # A long queue delay so that both requests of the test land in one batch.
    (folder / "config.pbtxt").write_text(
        'name: "gather"\nbackend: "python"\nmax_batch_size: 8\n'
        'input [ { name: "index" data_type: TYPE_INT64 dims: [ 1 ] } ]\n'
        'output [ { name: "value" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        "dynamic_batching { max_queue_delay_microseconds: 500000 }\n"
        "instance_group [ { kind: KIND_CPU count: 1 } ]\n"
    )


def test_a_failing_request_does_not_fail_its_batch(
    start_triton: StartTriton, tmp_path: Path
) -> None:
    _gather_model(tmp_path / "repo")
    server = start_triton(tmp_path / "repo")
    answers: dict[str, tuple[Any, Any]] = {}  # (InferResult, InferenceServerException): untyped
    done = threading.Semaphore(0)
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        for key, index in (("good", [[2], [0]]), ("bad", [[99]])):
            tensor = grpcclient.InferInput("index", [len(index), 1], "INT64")
            tensor.set_data_from_numpy(np.array(index, dtype=np.int64))

            def callback(result: Any, error: Any, key: str = key) -> None:
                answers[key] = (result, error)
                done.release()

            client.async_infer("gather", [tensor], callback=callback, client_timeout=60.0)
        for _ in range(2):
            assert done.acquire(timeout=60.0)
        settled_counts(server.grpc_url, "gather", at_least=3)
        stats = _model_stats(client, "gather")
    good, good_error = answers["good"]
    assert good_error is None, good_error
    np.testing.assert_array_equal(good.as_numpy("value"), [[30.0], [10.0]])
    bad, bad_error = answers["bad"]
    assert bad is None and "gather: inference failed" in str(bad_error)
    # Both requests were handed to one execute() call (one batch of 3 frames).
    assert stats.execution_count == 1 and stats.inference_count == 3
