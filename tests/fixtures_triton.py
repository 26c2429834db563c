"""Fixtures for the real CPU tritonserver (nvidia-pytriton wheel), on free ports.

- `triton_server` (session): Triton on the generated CPU model repository
  (`lipsync.paths.MODEL_REPOSITORY_CPU`) once `demo_package` has written `lipsync_demo` and
  `audio_encoder` there; explicit model control with every model loaded.
- `start_triton` (function): factory `start_triton(repo, **kwargs) -> TritonServer` for tests
  that need their own server (to kill or restart it); everything it started is stopped at
  teardown. Keyword arguments go to `TritonServer` (ports default to free ones, the log to a
  file in the test's tmp folder); `timeout_s` goes to `start()`.
- `untrained_onnx` (session): the UNet (`ave`) and the audio encoder exported with seeded
  untrained weights into a tmp folder (`export.onnx_export`), for tests that must not depend
  on the demo avatar; plus a second audio encoder of other weights (seed 1).
- `untrained_model_repo` (session): a CPU-profile model repository in a tmp folder holding
  `lipsync_test` (that UNet) and `audio_encoder`.
- `broken_model_repo` (function): a model repository whose one model, `lipsync_broken`, fails
  to load (its model.onnx is not ONNX), so tritonserver (`--exit-on-error`) exits at start.

Helpers: `processes()` (the process table), `group_gone(pgid)` (no live process left in a
process group), `reaped(pid)` (an exited process was waited for: no zombie left).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lipsync.contract import avatar_model_name
from lipsync.paths import MODEL_REPOSITORY_CPU
from lipsync.triton_local import TritonServer, free_ports

StartTriton = Callable[..., TritonServer]

TEST_AVATAR = "test"
"""Avatar name of the untrained UNet in `untrained_model_repo` (model `lipsync_test`)."""


@dataclass(frozen=True)
class UntrainedOnnx:
    """ONNX files exported with seeded untrained weights (seed 0; `other_audio_encoder`: seed 1)."""

    unet: Path
    audio_encoder: Path
    other_audio_encoder: Path


@dataclass(frozen=True)
class Process:
    """One entry of the process table (`/proc/<pid>/stat`): state "Z" is a zombie."""

    pid: int
    name: str
    state: str
    ppid: int
    pgid: int


def processes() -> Iterator[Process]:
    """Every process now in the process table (from `/proc`)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # it exited meanwhile
            continue
        head, _, rest = text.rpartition(")")
        fields = rest.split()
        yield Process(
            pid=int(stat.parent.name), name=head.split("(", 1)[1], state=fields[0],
            ppid=int(fields[1]), pgid=int(fields[2]),
        )


def group_gone(pgid: int, timeout_s: float = 10.0) -> bool:
    """True once no live (non-zombie) process is left in process group `pgid` (a killed
    group's members disappear shortly after the signal, so this waits up to `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not any(p.pgid == pgid and p.state != "Z" for p in processes()):
            return True
        time.sleep(0.2)
    return False


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie or a process gone from `/proc` does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def reaped(pid: int) -> bool:
    """True when process `pid`, which has exited, was waited for: it is gone from the process
    table (`/proc/<pid>`), not left there as a zombie (`<defunct>`)."""
    return not Path(f"/proc/{pid}").exists()


def _server(repo: Path, log_file: Path, **kwargs: Any) -> TritonServer:
    http_port, grpc_port, metrics_port = free_ports(3)
    kwargs.setdefault("http_port", http_port)
    kwargs.setdefault("grpc_port", grpc_port)
    kwargs.setdefault("metrics_port", metrics_port)
    kwargs.setdefault("log_file", log_file)
    return TritonServer(repo, **kwargs)


@pytest.fixture(scope="session")
def untrained_onnx(tmp_path_factory: pytest.TempPathFactory) -> UntrainedOnnx:
    """The UNet (`lipsync.contract` UNET_CROP, UNET_AUDIO -> UNET_PRED) and the audio encoder
    (ENCODER_MEL -> ENCODER_FEATURE), untrained, seed 0, and an audio encoder of seed 1."""
    from export.onnx_export import export_audio_encoder, export_unet

    folder = tmp_path_factory.mktemp("onnx")
    unet = export_unet(None, folder / "unet_ave.onnx", mode="ave", seed=0)
    encoder = export_audio_encoder(None, folder / "audio_encoder.onnx", seed=0)
    other = export_audio_encoder(None, folder / "audio_encoder_seed1.onnx", seed=1)
    return UntrainedOnnx(unet=unet.path, audio_encoder=encoder.path, other_audio_encoder=other.path)


@pytest.fixture(scope="session")
def untrained_model_repo(
    untrained_onnx: UntrainedOnnx, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A CPU-profile model repository with `lipsync_test` and `audio_encoder`."""
    from export.model_repo import write_audio_encoder_model, write_avatar_model

    repo = tmp_path_factory.mktemp("model_repo_cpu")
    write_avatar_model(repo, avatar_model_name(TEST_AVATAR), untrained_onnx.unet, "cpu")
    write_audio_encoder_model(repo, untrained_onnx.audio_encoder, "cpu")
    return repo


@pytest.fixture
def broken_model_repo(tmp_path: Path, untrained_model_repo: Path) -> Path:
    """A repository with `lipsync_broken`: the test UNet's config and model.py, but a
    model.onnx that is not ONNX (Triton logs "failed to load 'lipsync_broken'")."""
    from lipsync.contract import avatar_model_name

    source = untrained_model_repo / avatar_model_name(TEST_AVATAR)
    repo = tmp_path / "broken_repo"
    folder = repo / "lipsync_broken"
    (folder / "1").mkdir(parents=True)
    (folder / "1" / "model.onnx").write_bytes(b"not an onnx file")
    (folder / "1" / "model.py").write_text((source / "1" / "model.py").read_text())
    (folder / "config.pbtxt").write_text(
        (source / "config.pbtxt").read_text().replace(source.name, "lipsync_broken")
    )
    return repo


@pytest.fixture(scope="session")
def triton_server(
    demo_package: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonServer]:
    """Triton on the CPU model repository with the demo avatar's models, all loaded."""
    log_file = tmp_path_factory.mktemp("triton_session") / "tritonserver.log"
    server = _server(
        MODEL_REPOSITORY_CPU, log_file, model_control_mode="explicit", load_models=("*",)
    )
    server.start(timeout_s=180.0)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def start_triton(tmp_path: Path) -> Iterator[StartTriton]:
    """Factory: `start_triton(repo, **kwargs) -> TritonServer`, started and ready; stopped at
    teardown."""
    started: list[TritonServer] = []

    def _start(repo: Path, **kwargs: Any) -> TritonServer:
        timeout_s = float(kwargs.pop("timeout_s", 120.0))
        server = _server(repo, tmp_path / f"tritonserver-{len(started)}.log", **kwargs)
        started.append(server)
        server.start(timeout_s=timeout_s)
        return server

    yield _start
    for server in reversed(started):
        server.stop()
