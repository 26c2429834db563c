"""Triton model repository writer (`export/model_repo.py`): both profiles' configs parse as
Triton's `ModelConfig` protobuf and carry the intended fields; files land where Triton looks;
ONNX files that break the contract are refused with precise messages."""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2 as mc

from export.model_repo import (
    BATCHING,
    PYTHON_BACKEND_MODEL,
    ModelRepoError,
    avatar_model_name,
    parse_config,
    write_audio_encoder_model,
    write_avatar_model,
)
from lipsync import paths
from lipsync.cli import main as lipsync_main
from tests.fixtures_triton import UntrainedOnnx


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _config(folder: Path) -> mc.ModelConfig:
    return parse_config((folder / "config.pbtxt").read_text(), source=str(folder))


def _io(config_tensors: object) -> dict[str, tuple[str, list[int]]]:
    return {t.name: (mc.DataType.Name(t.data_type), list(t.dims)) for t in config_tensors}  # type: ignore[attr-defined]


def _tiny_onnx(
    path: Path, inputs: dict[str, tuple[int, list[int]]], outputs: dict[str, tuple[int, list[int]]]
) -> Path:
    """An ONNX file with the given graph inputs/outputs (elem type, dims with "N" batch)."""

    def values(spec: dict[str, tuple[int, list[int]]]) -> list[onnx.ValueInfoProto]:
        return [helper.make_tensor_value_info(n, t, ["N", *dims]) for n, (t, dims) in spec.items()]

    graph = helper.make_graph([], "tiny", values(inputs), values(outputs))
    onnx.save(helper.make_model(graph), str(path))
    return path


UNET_IO = {"crop": ("TYPE_UINT8", [320, 320, 3]), "audio": ("TYPE_FP32", [16, 512])}
PRED_IO = {"pred": ("TYPE_UINT8", [320, 320, 3])}


def test_avatar_model_name() -> None:
    assert avatar_model_name("demo") == "lipsync_demo"
    for bad in ("", "../x", "a b", "-x", "x" * 65):
        with pytest.raises(ModelRepoError, match="not usable in a Triton model name"):
            avatar_model_name(bad)


def test_cpu_profile(untrained_onnx: UntrainedOnnx, tmp_path: Path) -> None:
    folder = write_avatar_model(tmp_path, "lipsync_a", untrained_onnx.unet, "cpu")
    assert folder == tmp_path / "lipsync_a"
    config = _config(folder)
    policy = BATCHING[("unet", "cpu")]
    assert config.name == "lipsync_a"
    assert config.backend == "python" and config.platform == ""
    assert config.max_batch_size == policy.max_batch_size == 8
    assert _io(config.input) == UNET_IO and _io(config.output) == PRED_IO
    assert config.HasField("dynamic_batching")
    assert config.dynamic_batching.max_queue_delay_microseconds == policy.queue_delay_us > 0
    assert [(g.kind, g.count) for g in config.instance_group] == [
        (mc.ModelInstanceGroup.KIND_CPU, 1)
    ]
    assert config.parameters["intra_op_thread_count"].string_value == "0"
    assert config.parameters["onnx_file"].string_value == "model.onnx"
    # The ONNX file is copied unchanged, next to the canonical Python-backend model.
    assert sorted(p.name for p in (folder / "1").iterdir()) == ["model.onnx", "model.py"]
    assert _sha256(folder / "1" / "model.onnx") == _sha256(untrained_onnx.unet)
    assert (folder / "1" / "model.py").read_text() == PYTHON_BACKEND_MODEL.read_text()


def test_gpu_profile(untrained_onnx: UntrainedOnnx, tmp_path: Path) -> None:
    folder = write_avatar_model(tmp_path, "lipsync_a", untrained_onnx.unet, "gpu")
    config = _config(folder)
    policy = BATCHING[("unet", "gpu")]
    assert config.platform == "onnxruntime_onnx" and config.backend == ""
    assert config.max_batch_size == policy.max_batch_size == 16
    assert _io(config.input) == UNET_IO and _io(config.output) == PRED_IO
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
    assert params["trt_engine_cache_path"] == "/engine_cache/lipsync_a"
    assert params["trt_profile_min_shapes"] == "crop:1x320x320x3,audio:1x16x512"
    assert params["trt_profile_max_shapes"] == "crop:16x320x320x3,audio:16x16x512"
    # Warm-up: batch 1 with zeros and the largest batch with random data, for every input.
    warmups = {w.batch_size: w for w in config.model_warmup}
    assert sorted(warmups) == [1, 16]
    for batch, field in ((1, "zero_data"), (16, "random_data")):
        inputs = warmups[batch].inputs
        assert sorted(inputs) == ["audio", "crop"]
        for name, (dtype, dims) in UNET_IO.items():
            assert mc.DataType.Name(inputs[name].data_type) == dtype
            assert list(inputs[name].dims) == dims
            assert inputs[name].WhichOneof("input_data_type") == field
    assert sorted(p.name for p in (folder / "1").iterdir()) == ["model.onnx"]
    # The justification travels with the config.
    assert "max_batch_size 16" in (folder / "config.pbtxt").read_text()


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_audio_encoder_model(untrained_onnx: UntrainedOnnx, tmp_path: Path, profile: str) -> None:
    folder = write_audio_encoder_model(tmp_path, untrained_onnx.audio_encoder, profile)  # type: ignore[arg-type]
    assert folder.name == "audio_encoder"
    config = _config(folder)
    assert config.name == "audio_encoder"
    assert config.max_batch_size == BATCHING[("audio_encoder", profile)].max_batch_size  # type: ignore[index]
    assert _io(config.input) == {"mel": ("TYPE_FP32", [80, 16])}
    assert _io(config.output) == {"feature": ("TYPE_FP32", [512])}
    assert config.HasField("dynamic_batching")
    if profile == "gpu":
        assert config.platform == "onnxruntime_onnx"
        assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
        assert sorted(w.batch_size for w in config.model_warmup) == [1, 128]
    else:
        assert config.backend == "python"


def test_audio_window_shape_comes_from_the_onnx_graph(tmp_path: Path) -> None:
    # A UNet whose audio branch takes another window (e.g. hubert's 32x32x32) gets that shape.
    onnx_path = _tiny_onnx(
        tmp_path / "hubert.onnx",
        {"crop": (TensorProto.UINT8, [320, 320, 3]), "audio": (TensorProto.FLOAT, [32, 32, 32])},
        {"pred": (TensorProto.UINT8, [320, 320, 3])},
    )
    config = _config(write_avatar_model(tmp_path / "repo", "lipsync_h", onnx_path, "gpu"))
    assert _io(config.input)["audio"] == ("TYPE_FP32", [32, 32, 32])
    params = dict(
        config.optimization.execution_accelerators.gpu_execution_accelerator[0].parameters
    )
    assert params["trt_profile_max_shapes"] == "crop:16x320x320x3,audio:16x32x32x32"


def test_rewrite_replaces_the_model_and_leaves_no_staging(
    untrained_onnx: UntrainedOnnx, tmp_path: Path
) -> None:
    write_avatar_model(tmp_path, "lipsync_a", untrained_onnx.unet, "gpu")
    (tmp_path / "lipsync_a" / "1" / "stale.txt").write_text("old")
    write_avatar_model(tmp_path, "lipsync_a", untrained_onnx.unet, "cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lipsync_a"]
    assert sorted(p.name for p in (tmp_path / "lipsync_a" / "1").iterdir()) == [
        "model.onnx",
        "model.py",
    ]
    assert _config(tmp_path / "lipsync_a").backend == "python"


def test_contract_violations_are_refused(untrained_onnx: UntrainedOnnx, tmp_path: Path) -> None:
    with pytest.raises(
        ModelRepoError,
        match=r"unet contract: its inputs are \['mel'\], expected \['audio', 'crop'\]",
    ):
        write_avatar_model(tmp_path, "lipsync_a", untrained_onnx.audio_encoder, "cpu")
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
        ModelRepoError, match=r"tensor 'crop' is TYPE_FP32 \[N,320,320,3\], expected TYPE_UINT8"
    ):
        write_avatar_model(tmp_path, "lipsync_a", float_crop, "cpu")
    wrong_size = _tiny_onnx(
        tmp_path / "wrong_size.onnx",
        {"crop": (TensorProto.UINT8, [328, 328, 3]), "audio": (TensorProto.FLOAT, [16, 512])},
        {"pred": (TensorProto.UINT8, [320, 320, 3])},
    )
    with pytest.raises(
        ModelRepoError,
        match=r"'crop' is TYPE_UINT8 \[N,328,328,3\], expected TYPE_UINT8 \[N,320,320,3\]",
    ):
        write_avatar_model(tmp_path, "lipsync_a", wrong_size, "cpu")
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
        write_avatar_model(tmp_path, "lipsync_a", tmp_path / "missing.onnx", "cpu")
    (tmp_path / "garbage.onnx").write_bytes(b"\x00garbage")
    with pytest.raises(ModelRepoError, match="cannot read ONNX file"):
        write_avatar_model(tmp_path, "lipsync_a", tmp_path / "garbage.onnx", "cpu")
    with pytest.raises(ModelRepoError, match="unknown profile 'tpu'"):
        write_avatar_model(tmp_path, "lipsync_a", untrained_onnx.unet, "tpu")  # type: ignore[arg-type]
    # Nothing half-written was left behind by the refusals.
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]


def test_parse_config_rejects_invalid_text() -> None:
    with pytest.raises(ModelRepoError, match="not a valid Triton ModelConfig"):
        parse_config('name: "x"\nmax_batch_size: "eight"\n')
    with pytest.raises(ModelRepoError, match="not a valid Triton ModelConfig"):
        parse_config('name: "x"\ndynamic_batching { max_queue_delay: 5 }\n')


def test_cli_writes_both_profiles(untrained_onnx: UntrainedOnnx, tmp_path: Path) -> None:
    status = lipsync_main(
        [
            "export",
            "model-repo",
            "--avatar",
            "cli",
            "--onnx",
            str(untrained_onnx.unet),
            "--audio-encoder-onnx",
            str(untrained_onnx.audio_encoder),
            "--profile",
            "both",
            "--repo",
            str(tmp_path),
        ]
    )
    assert status == 0
    for profile in ("cpu", "gpu"):
        for model in ("lipsync_cli", "audio_encoder"):
            config = _config(tmp_path / profile / model)
            assert config.name == model
            assert (config.backend == "python") == (profile == "cpu")
    assert (
        lipsync_main(
            [
                "export",
                "model-repo",
                "--avatar",
                "../x",
                "--onnx",
                str(untrained_onnx.unet),
                "--repo",
                str(tmp_path / "bad"),
            ]
        )
        == 2
    )
    assert not (tmp_path / "bad").exists()


def test_every_generated_config_parses(demo_package: object) -> None:
    """Every config in the generated repositories (the demo avatar's and any other) parses as
    Triton's ModelConfig, in both profiles."""
    configs = sorted(
        p
        for repo in (paths.MODEL_REPOSITORY_CPU, paths.MODEL_REPOSITORY_GPU)
        for p in repo.glob("*/config.pbtxt")
    )
    names = {(p.parent.parent.name, p.parent.name) for p in configs}
    for profile in ("cpu", "gpu"):
        assert {(profile, "lipsync_demo"), (profile, "audio_encoder")} <= names, names
    for config_path in configs:
        config = parse_config(config_path.read_text(), source=str(config_path))
        assert config.name == config_path.parent.name
