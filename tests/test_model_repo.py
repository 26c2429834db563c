"""Triton model repository writer (`export/model_repo.py`): the generated configs carry the
intended fields in both profiles; files land where Triton looks; every write publishes a new
numbered version without touching the served one, one writer at a time; the shared audio encoder
is not replaced by other weights unless asked; the GPU engine cache follows the weights; ONNX
files that break the contract are refused with precise messages. (That Triton loads these
configs and serves a new version after `load_model` is tested against the real server in
`tests/test_triton.py`.)"""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import onnx
import pytest
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2 as mc

from export.model_repo import (
    BATCHING,
    ENGINE_CACHE_ROOT,
    PYTHON_BACKEND_MODEL,
    ModelRepoError,
    ModelVersion,
    Profile,
    read_config,
    served_version,
    weights_digest,
    write_audio_encoder_model,
    write_avatar_model,
)
from lipsync import paths
from lipsync.cli import main as lipsync_main
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
from tests.fixtures_packages import served_version_number
from tests.fixtures_triton import UntrainedOnnx

MODEL = avatar_model_name("a")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _io(config_tensors: Iterable[Any]) -> dict[str, tuple[int, list[int]]]:
    """`ModelInput`s or `ModelOutput`s of a config (tritonclient ships no types)."""
    return {t.name: (t.data_type, list(t.dims)) for t in config_tensors}


def _expected_io(*specs: TensorSpec) -> dict[str, tuple[int, list[int]]]:
    return {s.name: (mc.DataType.Value(s.config_dtype), list(s.dims)) for s in specs}


def _elem(spec: TensorSpec) -> int:
    return helper.np_dtype_to_tensor_dtype(spec.dtype(0).dtype)


def _tiny_onnx(
    path: Path,
    inputs: dict[str, tuple[int, list[int]]],
    outputs: dict[str, tuple[int, list[int]]],
    graph_name: str = "tiny",
) -> Path:
    """An ONNX file with the given graph inputs/outputs (elem type, dims after the "N" batch
    axis); graphs of other names have other `weights_digest`s."""

    def values(spec: dict[str, tuple[int, list[int]]]) -> list[onnx.ValueInfoProto]:
        return [helper.make_tensor_value_info(n, t, ["N", *dims]) for n, (t, dims) in spec.items()]

    graph = helper.make_graph([], graph_name, values(inputs), values(outputs))
    onnx.save(helper.make_model(graph), str(path))
    return path


def _tiny_unet(path: Path, graph_name: str = "tiny") -> Path:
    """A node-less graph with the UNet contract's tensors (enough for the writer)."""
    return _tiny_onnx(
        path,
        {t.name: (_elem(t), list(t.dims)) for t in (UNET_CROP, UNET_AUDIO)},
        {UNET_PRED.name: (_elem(UNET_PRED), list(UNET_PRED.dims))},
        graph_name,
    )


def test_cpu_profile(untrained_onnx: UntrainedOnnx, tmp_path: Path) -> None:
    written = write_avatar_model(tmp_path, MODEL, untrained_onnx.unet, "cpu")
    assert written.folder == tmp_path / MODEL and written.version == 1
    config = read_config(written.folder)
    policy = BATCHING[("unet", "cpu")]
    assert config.name == MODEL
    assert config.backend == "python" and config.platform == ""
    assert list(config.version_policy.specific.versions) == [1]
    assert config.max_batch_size == policy.max_batch_size == 8
    assert _io(config.input) == _expected_io(UNET_CROP, UNET_AUDIO)
    assert _io(config.output) == _expected_io(UNET_PRED)
    assert config.HasField("dynamic_batching")
    assert config.dynamic_batching.max_queue_delay_microseconds == policy.queue_delay_us > 0
    assert [(g.kind, g.count) for g in config.instance_group] == [
        (mc.ModelInstanceGroup.KIND_CPU, 1)
    ]
    assert config.parameters["intra_op_thread_count"].string_value == "0"
    assert config.parameters["onnx_file"].string_value == "model.onnx"
    # The ONNX file is copied unchanged, next to the canonical Python-backend model.
    assert sorted(p.name for p in written.version_dir.iterdir()) == ["model.onnx", "model.py"]
    assert _sha256(written.onnx_path) == _sha256(untrained_onnx.unet)
    assert (written.version_dir / "model.py").read_text() == PYTHON_BACKEND_MODEL.read_text()
    # The rationale is written once, in the README; the config points at it.
    assert "model_repository/README.md" in (written.folder / "config.pbtxt").read_text()


def test_gpu_profile(untrained_onnx: UntrainedOnnx, tmp_path: Path) -> None:
    written = write_avatar_model(tmp_path, MODEL, untrained_onnx.unet, "gpu")
    config = read_config(written.folder)
    policy = BATCHING[("unet", "gpu")]
    assert config.platform == "onnxruntime_onnx" and config.backend == ""
    assert list(config.version_policy.specific.versions) == [1]
    assert config.max_batch_size == policy.max_batch_size == 16
    assert _io(config.input) == _expected_io(UNET_CROP, UNET_AUDIO)
    assert _io(config.output) == _expected_io(UNET_PRED)
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 16]
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    assert [(g.kind, g.count) for g in config.instance_group] == [
        (mc.ModelInstanceGroup.KIND_GPU, 2)
    ]
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt"
    params = dict(accelerator.parameters)
    assert params["precision_mode"] == "FP16"
    assert int(params["max_workspace_size_bytes"]) >= 1 << 30
    assert params["trt_engine_cache_enable"] == "true"
    digest = weights_digest(untrained_onnx.unet)
    assert params["trt_engine_cache_path"] == f"{ENGINE_CACHE_ROOT}/{MODEL}/{digest[:16]}"
    assert params["trt_profile_min_shapes"] == "crop:1x320x320x3,audio:1x16x512"
    assert params["trt_profile_max_shapes"] == "crop:16x320x320x3,audio:16x16x512"
    # Warm-up: batch 1 with zeros and the largest batch with random data, for every input.
    warmups = {w.batch_size: w for w in config.model_warmup}
    assert sorted(warmups) == [1, 16]
    expected = _expected_io(UNET_CROP, UNET_AUDIO)
    for batch, field in ((1, "zero_data"), (16, "random_data")):
        inputs = warmups[batch].inputs
        assert sorted(inputs) == sorted(expected)
        for name, (dtype, dims) in expected.items():
            assert inputs[name].data_type == dtype
            assert list(inputs[name].dims) == dims
            assert inputs[name].WhichOneof("input_data_type") == field
    assert sorted(p.name for p in written.version_dir.iterdir()) == ["model.onnx"]


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_audio_encoder_model(untrained_onnx: UntrainedOnnx, tmp_path: Path, profile: Profile) -> None:
    written = write_audio_encoder_model(tmp_path, untrained_onnx.audio_encoder, profile)
    assert written.folder.name == AUDIO_ENCODER_MODEL
    config = read_config(written.folder)
    assert config.name == AUDIO_ENCODER_MODEL
    assert config.max_batch_size == BATCHING[("audio_encoder", profile)].max_batch_size
    assert _io(config.input) == _expected_io(ENCODER_MEL)
    assert _io(config.output) == _expected_io(ENCODER_FEATURE)
    assert config.HasField("dynamic_batching")
    if profile == "gpu":
        assert config.platform == "onnxruntime_onnx"
        assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
        assert sorted(w.batch_size for w in config.model_warmup) == [1, 128]
    else:
        assert config.backend == "python"


def test_audio_window_shape_comes_from_the_onnx_graph(tmp_path: Path) -> None:
    # A UNet whose audio branch takes another window (e.g. hubert's 16 x 2048) gets that shape.
    onnx_path = _tiny_onnx(
        tmp_path / "hubert.onnx",
        {"crop": (TensorProto.UINT8, [320, 320, 3]), "audio": (TensorProto.FLOAT, [16, 2048])},
        {"pred": (TensorProto.UINT8, [320, 320, 3])},
    )
    config = read_config(write_avatar_model(tmp_path / "repo", MODEL, onnx_path, "gpu").folder)
    assert _io(config.input)["audio"] == (mc.TYPE_FP32, [16, 2048])
    params = dict(
        config.optimization.execution_accelerators.gpu_execution_accelerator[0].parameters
    )
    assert params["trt_profile_max_shapes"] == "crop:16x320x320x3,audio:16x16x2048"


def _version_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


def test_each_write_is_a_new_version_and_the_served_one_is_untouched(
    untrained_onnx: UntrainedOnnx, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    first = write_avatar_model(repo, MODEL, untrained_onnx.unet, "cpu")
    served_file = first.onnx_path
    inode, content = served_file.stat().st_ino, _sha256(served_file)

    second = write_avatar_model(repo, MODEL, _tiny_unet(tmp_path / "b.onnx", "b"), "cpu")
    assert second.version == 2
    # Version 1 is still there, the very same file, until Triton has moved to version 2.
    assert served_file.stat().st_ino == inode and _sha256(served_file) == content
    assert list(read_config(first.folder).version_policy.specific.versions) == [2]
    assert served_version(repo, MODEL) == second

    third = write_avatar_model(repo, MODEL, _tiny_unet(tmp_path / "c.onnx", "c"), "cpu")
    # The new version and the one served before it are kept; older ones are pruned.
    assert third.version == 3 and _version_folders(first.folder) == ["2", "3"]
    # The same weights and config again: nothing to publish.
    assert write_avatar_model(repo, MODEL, tmp_path / "c.onnx", "cpu") == third
    assert _version_folders(first.folder) == ["2", "3"]
    # The model and the lock, nothing else: no staging leftovers, here or next to it.
    assert sorted(p.name for p in repo.iterdir()) == [".lock", MODEL]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.onnx", "c.onnx", "repo"]


def test_concurrent_writers_each_publish_a_whole_version(tmp_path: Path) -> None:
    graphs = [_tiny_unet(tmp_path / f"g{i}.onnx", f"g{i}") for i in range(4)]
    repo = tmp_path / "repo"
    results: dict[int, ModelVersion | Exception] = {}

    def write(i: int) -> None:
        try:
            results[i] = write_avatar_model(repo, MODEL, graphs[i], "cpu")
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            results[i] = exc

    threads = [threading.Thread(target=write, args=(i,)) for i in range(len(graphs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    errors = {i: r for i, r in results.items() if isinstance(r, Exception)}
    assert not errors and len(results) == len(graphs), results
    versions = sorted(r.version for r in results.values() if not isinstance(r, Exception))
    assert versions == [1, 2, 3, 4]
    assert served_version_number(repo, MODEL) == 4
    for name in _version_folders(repo / MODEL):
        assert sorted(p.name for p in (repo / MODEL / name).iterdir()) == ["model.onnx", "model.py"]


def test_a_writer_waits_for_the_repository_lock(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    graph = _tiny_unet(tmp_path / "g.onnx")
    with (repo / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another builder holds the repository
        writer = threading.Thread(target=write_avatar_model, args=(repo, MODEL, graph, "cpu"))
        writer.start()
        writer.join(timeout=2.0)
        assert writer.is_alive() and not (repo / MODEL).exists(), "wrote without the lock"
        fcntl.flock(lock, fcntl.LOCK_UN)
    writer.join(timeout=60)
    assert not writer.is_alive() and served_version(repo, MODEL) is not None


def test_a_new_model_is_assembled_outside_the_repository(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Triton started with --load-model=* takes every folder in the repository, hidden or not,
    for a model: a half-written model there would stop it from starting."""
    repo = tmp_path / "repo"
    seen: list[Path] = []
    copyfile = shutil.copyfile

    def copy(source: Path, target: Path, **kwargs: bool) -> object:
        seen.append(Path(target))
        return copyfile(source, target, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", copy)
    write_avatar_model(repo, MODEL, _tiny_unet(tmp_path / "g.onnx"), "cpu")
    assert seen
    for target in seen:
        top = target.relative_to(repo).parts[0] if target.is_relative_to(repo) else None
        assert top is None or (top == MODEL and target.parent.name.isdigit()), target


def test_the_audio_encoder_is_not_replaced_by_other_weights(
    untrained_onnx: UntrainedOnnx, tmp_path: Path
) -> None:
    first = write_audio_encoder_model(tmp_path, untrained_onnx.audio_encoder, "cpu")
    with pytest.raises(ModelRepoError, match="already serves an audio_encoder with other weights"):
        write_audio_encoder_model(tmp_path, untrained_onnx.other_audio_encoder, "cpu")
    assert served_version(tmp_path, AUDIO_ENCODER_MODEL) == first
    assert _version_folders(first.folder) == ["1"]
    # The same weights from another file (other metadata) are the same encoder.
    copy = tmp_path / "copy.onnx"
    model = onnx.load(str(untrained_onnx.audio_encoder))
    model.doc_string = "exported again from another checkpoint path"
    onnx.save(model, str(copy))
    assert write_audio_encoder_model(tmp_path, copy, "cpu") == first
    # Replacing it is explicit.
    replaced = write_audio_encoder_model(
        tmp_path, untrained_onnx.other_audio_encoder, "cpu", replace=True
    )
    assert replaced.version == 2 and _sha256(replaced.onnx_path) == _sha256(
        untrained_onnx.other_audio_encoder
    )


def test_the_engine_cache_path_follows_the_weights(tmp_path: Path) -> None:
    """A rebuilt avatar never runs TensorRT engines built from its old weights."""

    def cache_path() -> str:
        config = read_config(tmp_path / "repo" / MODEL)
        (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
        return dict(accelerator.parameters)["trt_engine_cache_path"]

    old, new = _tiny_unet(tmp_path / "old.onnx", "old"), _tiny_unet(tmp_path / "new.onnx", "new")
    write_avatar_model(tmp_path / "repo", MODEL, old, "gpu")
    old_path = cache_path()
    write_avatar_model(tmp_path / "repo", MODEL, new, "gpu")
    new_path = cache_path()
    assert old_path != new_path
    for path in (old_path, new_path):
        assert path.startswith(f"{ENGINE_CACHE_ROOT}/{MODEL}/")
    write_avatar_model(tmp_path / "repo", MODEL, old, "gpu")  # back to the old weights
    assert cache_path() == old_path


def test_contract_violations_are_refused(untrained_onnx: UntrainedOnnx, tmp_path: Path) -> None:
    with pytest.raises(
        ModelRepoError,
        match=r"unet contract: its inputs are \['mel'\], expected \['audio', 'crop'\]",
    ):
        write_avatar_model(tmp_path, MODEL, untrained_onnx.audio_encoder, "cpu")
    with pytest.raises(
        ModelRepoError,
        match=r"does not match the audio_encoder contract: its inputs are \['audio', 'crop'\]",
    ):
        write_audio_encoder_model(tmp_path, untrained_onnx.unet, "cpu")
    float_crop = _tiny_onnx(
        tmp_path / "float_crop.onnx",
        {"crop": (TensorProto.FLOAT, [320, 320, 3]), "audio": (TensorProto.FLOAT, [16, 512])},
        {"pred": (TensorProto.UINT8, [320, 320, 3])},
    )
    with pytest.raises(
        ModelRepoError, match=r"tensor 'crop' is float32 \[N,320,320,3\], expected uint8"
    ):
        write_avatar_model(tmp_path, MODEL, float_crop, "cpu")
    wrong_size = _tiny_onnx(
        tmp_path / "wrong_size.onnx",
        {"crop": (TensorProto.UINT8, [328, 328, 3]), "audio": (TensorProto.FLOAT, [16, 512])},
        {"pred": (TensorProto.UINT8, [320, 320, 3])},
    )
    with pytest.raises(
        ModelRepoError,
        match=r"'crop' is uint8 \[N,328,328,3\], expected uint8 \[N,320,320,3\]",
    ):
        write_avatar_model(tmp_path, MODEL, wrong_size, "cpu")
    fixed_batch = tmp_path / "fixed_batch.onnx"
    graph = helper.make_graph(
        [],
        "g",
        [helper.make_tensor_value_info("mel", TensorProto.FLOAT, [1, 80, 16])],
        [helper.make_tensor_value_info("feature", TensorProto.FLOAT, [1, 512])],
    )
    onnx.save(helper.make_model(graph), str(fixed_batch))
    with pytest.raises(ModelRepoError, match="'mel' has no dynamic batch axis"):
        write_audio_encoder_model(tmp_path, fixed_batch, "gpu")
    with pytest.raises(ModelRepoError, match="does not exist"):
        write_avatar_model(tmp_path, MODEL, tmp_path / "missing.onnx", "cpu")
    (tmp_path / "garbage.onnx").write_bytes(b"\x00garbage")
    with pytest.raises(ModelRepoError, match="cannot read ONNX file"):
        write_avatar_model(tmp_path, MODEL, tmp_path / "garbage.onnx", "cpu")
    with pytest.raises(ModelRepoError, match="unknown profile 'tpu'"):
        write_avatar_model(tmp_path, MODEL, untrained_onnx.unet, "tpu")  # type: ignore[arg-type]  # on purpose
    with pytest.raises(ModelRepoError, match=r"'x' is not lipsync_<avatar name>"):
        write_avatar_model(tmp_path, "x", untrained_onnx.unet, "cpu")
    # Nothing half-written was left behind by the refusals.
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]


def test_a_damaged_config_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / MODEL).mkdir()
    (tmp_path / MODEL / "config.pbtxt").write_text('name: "x"\nmax_batch_size: "eight"\n')
    with pytest.raises(ModelRepoError, match=r"config\.pbtxt is not a Triton ModelConfig"):
        write_avatar_model(tmp_path, MODEL, _tiny_unet(tmp_path / "g.onnx"), "cpu")


def _model_repo_cli(*args: str) -> int:
    return lipsync_main(["export", "model-repo", *args])


def test_cli_writes_both_profiles(untrained_onnx: UntrainedOnnx, tmp_path: Path) -> None:
    unet, encoder = str(untrained_onnx.unet), str(untrained_onnx.audio_encoder)
    repo = str(tmp_path)
    status = _model_repo_cli(
        "--avatar", "cli", "--onnx", unet, "--audio-encoder-onnx", encoder, "--profile", "both",
        "--repo", repo,
    )
    assert status == 0
    for profile in ("cpu", "gpu"):
        for model in (avatar_model_name("cli"), AUDIO_ENCODER_MODEL):
            config = read_config(tmp_path / profile / model)
            assert config.name == model
            assert (config.backend == "python") == (profile == "cpu")
    bad = str(tmp_path / "bad")
    assert _model_repo_cli("--avatar", "../x", "--onnx", unet, "--repo", bad) == 2
    assert not (tmp_path / "bad").exists()
    # Another audio encoder needs --replace-audio-encoder.
    other = str(untrained_onnx.other_audio_encoder)
    args = ("--avatar", "cli", "--onnx", unet, "--audio-encoder-onnx", other, "--profile", "cpu")
    assert _model_repo_cli(*args, "--repo", f"{repo}/cpu") == 2
    assert served_version_number(tmp_path / "cpu", AUDIO_ENCODER_MODEL) == 1
    assert _model_repo_cli(*args, "--repo", f"{repo}/cpu", "--replace-audio-encoder") == 0
    assert served_version_number(tmp_path / "cpu", AUDIO_ENCODER_MODEL) == 2


def test_every_generated_config_names_a_served_version(demo_package: object) -> None:
    """Every model in the generated repositories (the demo avatar's and any other) has a config
    that parses as Triton's ModelConfig and serves a version folder holding its graph."""
    configs = sorted(
        p
        for repo in (paths.MODEL_REPOSITORY_CPU, paths.MODEL_REPOSITORY_GPU)
        for p in repo.glob("*/config.pbtxt")
    )
    names = {(p.parent.parent.name, p.parent.name) for p in configs}
    demo = avatar_model_name("demo")
    for profile in ("cpu", "gpu"):
        assert {(profile, demo), (profile, AUDIO_ENCODER_MODEL)} <= names, names
    for config_path in configs:
        assert read_config(config_path.parent).name == config_path.parent.name
        served = served_version(config_path.parent.parent, config_path.parent.name)
        assert served is not None and served.onnx_path.is_file(), config_path
