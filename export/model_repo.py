"""Write Triton models (CPU and GPU serving profiles) into a model repository.

Layout written for a model `<name>` (Triton's model-repository layout):

    <repo_root>/<name>/config.pbtxt       from model_repository/templates/<kind>_<profile>.pbtxt
    <repo_root>/<name>/1/model.onnx       the exported graph (copied, never modified)
    <repo_root>/<name>/1/model.py         CPU profile only: model_repository/python_onnx/model.py

Profiles (ARCHITECTURE.md "Two serving profiles"; model_repository/README.md):
- `cpu`: Triton's Python backend runs model.onnx with ONNX Runtime, one call per batch; served
  by the `tritonserver` of the nvidia-pytriton wheel (`lipsync triton`).
- `gpu`: platform `onnxruntime_onnx` with the TensorRT accelerator in FP16, engine cache under
  `/engine_cache/<name>`, two GPU instances, warm-up; served by the NGC image.

Tensor specs in config.pbtxt are read from the ONNX graph and checked against the contract:
UNet `crop` UINT8 [N,320,320,3] + `audio` FP32 [N,...] (the audio branch's window; [N,16,512]
for `ave`) -> `pred` UINT8 [N,320,320,3]; audio encoder `mel` FP32 [N,80,16] -> `feature` FP32
[N,512]. Every generated config is parsed as Triton's `ModelConfig` protobuf before it is written.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import TYPE_CHECKING, Literal

from lipsync import paths
from lipsync.package import NAME_PATTERN

if TYPE_CHECKING:
    from tritonclient.grpc import model_config_pb2

logger = logging.getLogger(__name__)

Profile = Literal["cpu", "gpu"]
ModelKind = Literal["unet", "audio_encoder"]

AUDIO_ENCODER_MODEL_NAME = "audio_encoder"
"""Triton model name of the AVE audio encoder (one per repository, shared by all avatars)."""

TEMPLATES_DIR: Path = paths.MODEL_REPOSITORY_DIR / "templates"
"""config.pbtxt templates, one per (model kind, profile)."""

PYTHON_BACKEND_MODEL: Path = paths.MODEL_REPOSITORY_DIR / "python_onnx" / "model.py"
"""The canonical CPU-profile Python-backend model, copied into each CPU model's version folder."""

ENGINE_CACHE_ROOT = "/engine_cache"
"""Where the GPU profile's TensorRT engines are cached inside the Triton container (a volume)."""

TRT_WORKSPACE_BYTES = 2 << 30
"""TensorRT builder workspace for the GPU profile: 2 GiB."""

_MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")


class ModelRepoError(ValueError):
    """The ONNX file does not honour the model contract, or a name or path is unusable."""


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a Triton model: name, Triton data type (`TYPE_UINT8`, ...) and the
    per-item dims (without the batch axis)."""

    name: str
    data_type: str
    dims: tuple[int, ...]


@dataclass(frozen=True)
class ModelSpec:
    """Inputs and outputs of a model, in ONNX graph order."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class BatchingPolicy:
    """Dynamic-batching settings of one (model kind, profile); justified in the templates and
    in model_repository/README.md.

    Attributes:
        max_batch_size: largest batch Triton forms (and largest batch one request may carry).
        queue_delay_us: `max_queue_delay_microseconds`, in microseconds.
        preferred_batch_sizes: `preferred_batch_size` list (GPU profile only).
        gpu_instances: `KIND_GPU` instance count (GPU profile only).
    """

    max_batch_size: int
    queue_delay_us: int
    preferred_batch_sizes: tuple[int, ...] = ()
    gpu_instances: int = 1


BATCHING: dict[tuple[ModelKind, Profile], BatchingPolicy] = {
    ("unet", "cpu"): BatchingPolicy(max_batch_size=8, queue_delay_us=5_000),
    ("unet", "gpu"): BatchingPolicy(
        max_batch_size=16, queue_delay_us=2_000, preferred_batch_sizes=(8, 16), gpu_instances=2
    ),
    ("audio_encoder", "cpu"): BatchingPolicy(max_batch_size=128, queue_delay_us=1_000),
    ("audio_encoder", "gpu"): BatchingPolicy(max_batch_size=128, queue_delay_us=1_000),
}
"""The batching policy per (model kind, profile)."""

# Expected contract per model kind: name -> (Triton data type, per-item dims or None = any).
_CONTRACTS: dict[ModelKind, tuple[dict[str, tuple[str, tuple[int, ...] | None]], ...]] = {
    "unet": (
        {"crop": ("TYPE_UINT8", (320, 320, 3)), "audio": ("TYPE_FP32", None)},
        {"pred": ("TYPE_UINT8", (320, 320, 3))},
    ),
    "audio_encoder": (
        {"mel": ("TYPE_FP32", (80, 16))},
        {"feature": ("TYPE_FP32", (512,))},
    ),
}


def avatar_model_name(avatar: str) -> str:
    """Triton model name of an avatar's UNet: `lipsync_<avatar>`.

    Raises:
        ModelRepoError: `avatar` is not a valid avatar name (`lipsync.package.NAME_PATTERN`:
            1-63 letters, digits, `_` or `-`, starting with a letter or digit).
    """
    if not re.fullmatch(NAME_PATTERN, avatar):
        raise ModelRepoError(
            f"avatar name {avatar!r} is not usable in a Triton model name: use 1-63 letters, "
            "digits, '_' or '-', starting with a letter or digit"
        )
    return f"lipsync_{avatar}"


def _triton_dtype(onnx_elem_type: int) -> str:
    """Map an ONNX TensorProto element type to Triton's `TYPE_*` name."""
    from onnx import helper
    from tritonclient.utils import np_to_triton_dtype

    return "TYPE_" + np_to_triton_dtype(helper.tensor_dtype_to_np_dtype(onnx_elem_type)).replace(
        "BYTES", "STRING"
    )


def read_model_spec(onnx_path: Path) -> ModelSpec:
    """Read the inputs/outputs of an ONNX graph as Triton tensor specs.

    The first axis of every tensor must be the dynamic batch axis; the others must be fixed.

    Raises:
        ModelRepoError: the file is missing or unreadable, or an axis is not as required.
    """
    import onnx

    if not onnx_path.is_file():
        raise ModelRepoError(f"ONNX file {onnx_path} does not exist")
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others
        raise ModelRepoError(f"cannot read ONNX file {onnx_path}: {exc}") from exc

    initializers = {t.name for t in model.graph.initializer}

    def spec(value: onnx.ValueInfoProto) -> TensorSpec:
        tensor_type = value.type.tensor_type
        dims = list(tensor_type.shape.dim)
        if not dims or dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            raise ModelRepoError(
                f"{onnx_path.name}: tensor '{value.name}' has no dynamic batch axis "
                "(export with a dynamic first axis)"
            )
        fixed: list[int] = []
        for axis, dim in enumerate(dims[1:], start=1):
            if not dim.HasField("dim_value") or dim.dim_value <= 0:
                raise ModelRepoError(
                    f"{onnx_path.name}: tensor '{value.name}' axis {axis} is not a fixed size"
                )
            fixed.append(int(dim.dim_value))
        return TensorSpec(value.name, _triton_dtype(tensor_type.elem_type), tuple(fixed))

    return ModelSpec(
        inputs=tuple(spec(v) for v in model.graph.input if v.name not in initializers),
        outputs=tuple(spec(v) for v in model.graph.output),
    )


def check_contract(spec: ModelSpec, kind: ModelKind, onnx_path: Path) -> None:
    """Check a model spec against the tensor contract of its kind (module docstring).

    Raises:
        ModelRepoError: naming the missing, unexpected or mistyped tensors.
    """
    for side, tensors, expected in (
        ("inputs", spec.inputs, _CONTRACTS[kind][0]),
        ("outputs", spec.outputs, _CONTRACTS[kind][1]),
    ):
        names = {t.name for t in tensors}
        if names != set(expected):
            raise ModelRepoError(
                f"{onnx_path.name} does not match the {kind} contract: its {side} are "
                f"{sorted(names)}, expected {sorted(expected)}"
            )
        for tensor in tensors:
            data_type, dims = expected[tensor.name]
            if tensor.data_type != data_type or (dims is not None and tensor.dims != dims):
                want = f"{data_type} [N,{','.join(map(str, dims))}]" if dims else data_type
                raise ModelRepoError(
                    f"{onnx_path.name}: {kind} tensor '{tensor.name}' is {tensor.data_type} "
                    f"[N,{','.join(map(str, tensor.dims))}], expected {want}"
                )


def _dims(dims: Sequence[int]) -> str:
    return ", ".join(str(d) for d in dims)


def _tensor_block(section: str, tensors: Sequence[TensorSpec]) -> str:
    rows = ",\n".join(
        f'  {{ name: "{t.name}" data_type: {t.data_type} dims: [ {_dims(t.dims)} ] }}'
        for t in tensors
    )
    return f"{section} [\n{rows}\n]"


def _profile_shapes(inputs: Sequence[TensorSpec], batch: int) -> str:
    """TensorRT profile string `name:BxD1xD2,...` for the given batch size."""
    return ",".join(f"{t.name}:{'x'.join(str(d) for d in (batch, *t.dims))}" for t in inputs)


def _warmup_block(inputs: Sequence[TensorSpec], batch_sizes: Sequence[int]) -> str:
    """`model_warmup` entries: zero data for batch 1, random data for the largest batch."""
    entries = []
    for batch in batch_sizes:
        data = "zero_data: true" if batch == 1 else "random_data: true"
        kind = "zero" if batch == 1 else "random"
        tensors = "\n".join(
            f'    inputs {{ key: "{t.name}" value: {{ data_type: {t.data_type} '
            f"dims: [ {_dims(t.dims)} ] {data} }} }}"
            for t in inputs
        )
        entries.append(
            f'  {{\n    name: "batch{batch}_{kind}"\n    batch_size: {batch}\n{tensors}\n  }}'
        )
    return ",\n".join(entries)


def render_config(
    model_name: str,
    spec: ModelSpec,
    kind: ModelKind,
    profile: Profile,
    *,
    engine_cache_root: str = ENGINE_CACHE_ROOT,
    intra_op_threads: int = 0,
) -> str:
    """Render the config.pbtxt text of one model and check that Triton can parse it.

    Args:
        model_name: Triton model name (the folder name).
        spec: the model's tensors (from `read_model_spec`).
        kind: "unet" or "audio_encoder" (selects the template and the batching policy).
        profile: "cpu" (Python backend + ONNX Runtime) or "gpu" (onnxruntime + TensorRT FP16).
        engine_cache_root: GPU profile: TensorRT engine cache root inside the container.
        intra_op_threads: CPU profile: ONNX Runtime intra-op threads, 0 = every core.

    Raises:
        ModelRepoError: the rendered text does not parse as `inference.ModelConfig`.
    """
    policy = BATCHING[(kind, profile)]
    template = Template((TEMPLATES_DIR / f"{kind}_{profile}.pbtxt").read_text())
    values = {
        "name": model_name,
        "max_batch_size": policy.max_batch_size,
        "inputs": _tensor_block("input", spec.inputs),
        "outputs": _tensor_block("output", spec.outputs),
        "queue_delay_us": policy.queue_delay_us,
        "preferred_batch_sizes": _dims(policy.preferred_batch_sizes),
        "gpu_instances": policy.gpu_instances,
        "intra_op_threads": intra_op_threads,
        "workspace_bytes": TRT_WORKSPACE_BYTES,
        "engine_cache_path": f"{engine_cache_root.rstrip('/')}/{model_name}",
        "profile_min": _profile_shapes(spec.inputs, 1),
        "profile_opt": _profile_shapes(
            spec.inputs, max(policy.preferred_batch_sizes, default=policy.max_batch_size)
        ),
        "profile_max": _profile_shapes(spec.inputs, policy.max_batch_size),
        "warmup": _warmup_block(spec.inputs, (1, policy.max_batch_size)),
    }
    text = template.substitute(values)
    parse_config(text, source=f"{kind}_{profile} config of {model_name}")
    return text


def parse_config(text: str, source: str = "config.pbtxt") -> model_config_pb2.ModelConfig:
    """Parse config.pbtxt text as Triton's `inference.ModelConfig` protobuf.

    Raises:
        ModelRepoError: the text is not a valid ModelConfig (with the parser's message).
    """
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise ModelRepoError(f"{source} is not a valid Triton ModelConfig: {exc}") from exc


def _copy_onnx(onnx_path: Path, version_dir: Path) -> None:
    """Copy the ONNX file (and any external-data files it names) as `version_dir/model.onnx`."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    shutil.copyfile(onnx_path, version_dir / "model.onnx")
    model = onnx.load(str(onnx_path), load_external_data=False)
    for tensor in model.graph.initializer:
        if uses_external_data(tensor):
            location = ExternalDataInfo(tensor).location
            source = (onnx_path.parent / location).resolve()
            if onnx_path.parent.resolve() not in source.parents:
                raise ModelRepoError(
                    f"{onnx_path.name}: external data {location!r} escapes its folder"
                )
            target = version_dir / location
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)


def write_model(
    repo_root: Path,
    model_name: str,
    onnx_path: Path,
    kind: ModelKind,
    profile: Profile,
    *,
    engine_cache_root: str = ENGINE_CACHE_ROOT,
) -> Path:
    """Write (or replace) one model folder in a Triton model repository.

    The folder is assembled in a temporary sibling and moved into place, so a failed write
    never leaves a half-written model behind.

    Args:
        repo_root: the model repository (created if missing).
        model_name: Triton model name, also the folder name.
        onnx_path: the exported ONNX graph honouring the contract of `kind`.
        kind: "unet" or "audio_encoder".
        profile: "cpu" or "gpu".

    Returns:
        The model folder `<repo_root>/<model_name>`.

    Raises:
        ModelRepoError: bad name, missing/unreadable ONNX file or contract mismatch.
    """
    if profile not in ("cpu", "gpu"):
        raise ModelRepoError(f"unknown profile {profile!r}: expected 'cpu' or 'gpu'")
    if not _MODEL_NAME_RE.match(model_name):
        raise ModelRepoError(
            f"model name {model_name!r} must be 1-128 letters, digits, '_' or '-', starting with "
            "a letter or digit"
        )
    onnx_path = Path(onnx_path)
    spec = read_model_spec(onnx_path)
    check_contract(spec, kind, onnx_path)
    config = render_config(model_name, spec, kind, profile, engine_cache_root=engine_cache_root)

    repo_root = Path(repo_root)
    repo_root.mkdir(parents=True, exist_ok=True)
    final = repo_root / model_name
    staging = Path(tempfile.mkdtemp(prefix=f".{model_name}.", dir=repo_root))
    try:
        version_dir = staging / "1"
        version_dir.mkdir()
        _copy_onnx(onnx_path, version_dir)
        if profile == "cpu":
            shutil.copyfile(PYTHON_BACKEND_MODEL, version_dir / "model.py")
        (staging / "config.pbtxt").write_text(config)
        os.chmod(staging, 0o755)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("wrote %s model %s (%s profile) from %s", kind, final, profile, onnx_path)
    return final


def write_avatar_model(repo_root: Path, model_name: str, onnx_path: Path, profile: Profile) -> Path:
    """Write an avatar's UNet (`crop`, `audio` -> `pred`) as model `model_name`.

    See `write_model` for the layout and errors; `model_name` is usually
    `avatar_model_name(avatar)`.
    """
    return write_model(repo_root, model_name, onnx_path, "unet", profile)


def write_audio_encoder_model(repo_root: Path, onnx_path: Path, profile: Profile) -> Path:
    """Write the AVE audio encoder (`mel` FP32 [N,80,16] -> `feature` FP32 [N,512]) as model
    `audio_encoder`. See `write_model` for the layout and errors."""
    return write_model(repo_root, AUDIO_ENCODER_MODEL_NAME, onnx_path, "audio_encoder", profile)


# --------------------------------------------------------------------------------------- CLI


def _repo_for(profile: Profile, repo: Path | None, both: bool) -> Path:
    if repo is None:
        return paths.MODEL_REPOSITORY_CPU if profile == "cpu" else paths.MODEL_REPOSITORY_GPU
    return repo / profile if both else repo


def _run_model_repo(args: argparse.Namespace) -> int:
    profiles: list[Profile] = ["cpu", "gpu"] if args.profile == "both" else [args.profile]
    try:
        name = avatar_model_name(args.avatar)
        for profile in profiles:
            repo = _repo_for(profile, args.repo, args.profile == "both")
            folder = write_avatar_model(repo, name, args.onnx, profile)
            logger.info("%s profile: %s", profile, folder)
            if args.audio_encoder_onnx is not None:
                folder = write_audio_encoder_model(repo, args.audio_encoder_onnx, profile)
                logger.info("%s profile: %s", profile, folder)
    except ModelRepoError as exc:
        logger.error("%s", exc)
        return 2
    return 0


def register_cli(export_subparsers: argparse._SubParsersAction) -> None:
    """Add `lipsync export model-repo` to the `lipsync export` subcommands."""
    parser = export_subparsers.add_parser(
        "model-repo",
        help="write an avatar's UNet (and the audio encoder) into the Triton model repositories",
        description=(
            "Write Triton model folders (config.pbtxt + ONNX, plus model.py for the CPU profile) "
            "for the avatar's UNet as lipsync_<avatar>, and optionally the audio encoder as "
            "audio_encoder. Defaults: model_repository/cpu and model_repository/gpu."
        ),
    )
    parser.add_argument(
        "--avatar", required=True, help="avatar name; the model is lipsync_<avatar>"
    )
    parser.add_argument("--onnx", required=True, type=Path, help="the UNet exported to ONNX")
    parser.add_argument(
        "--audio-encoder-onnx", type=Path, default=None, help="the audio encoder exported to ONNX"
    )
    parser.add_argument("--profile", choices=("cpu", "gpu", "both"), default="both")
    parser.add_argument(
        "--repo",
        type=Path,
        default=None,
        help=(
            "model repository for a single profile; with --profile both, the folder that gets "
            "cpu/ and gpu/ (default: model_repository/cpu and model_repository/gpu)"
        ),
    )
    parser.set_defaults(func=_run_model_repo)
