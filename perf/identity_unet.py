"""An identity UNet with the real tensor contract, for measuring everything but the model.

``pred = crop``: the graph takes `lipsync.contract.UNET_CROP` (uint8 [N, 320, 320, 3]) and
`UNET_AUDIO` (float32 [N, 16, 512], declared and required but unused) and returns
`UNET_PRED` (uint8 [N, 320, 320, 3]) through one ONNX ``Identity`` node. Served by the real
`tritonserver` in the CPU profile (Python backend + ONNX Runtime, dynamic batching) like any
avatar's UNet, it costs Triton almost nothing but moving the tensors, so a load test against
it measures the gateway's own work per frame (`perf.capacity`).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lipsync.contract import (
    UNET_AUDIO,
    UNET_CROP,
    UNET_PRED,
    TensorSpec,
    avatar_model_name,
)

ONNX_OPSET = 17
"""ONNX operator set of the graph (Identity is in every opset; 17 is what the exporter uses)."""


def write_identity_onnx(path: Path) -> Path:
    """Write the identity UNet graph (module docstring) to `path` and return it.

    The batch axis is the dynamic dimension ``batch`` on every tensor, the other axes fixed,
    as `export.model_repo.read_model_spec` requires.

    Raises:
        onnx.checker.ValidationError: the graph does not check (a bug here).
    """
    import numpy as np
    import onnx
    from onnx import helper

    def value_info(spec: TensorSpec) -> onnx.ValueInfoProto:
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(spec.dtype))
        return helper.make_tensor_value_info(spec.name, elem, ["batch", *spec.dims])

    graph = helper.make_graph(
        [helper.make_node("Identity", [UNET_CROP.name], [UNET_PRED.name])],
        "identity_unet",
        [value_info(UNET_CROP), value_info(UNET_AUDIO)],
        [value_info(UNET_PRED)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
                              producer_name="perf.identity_unet")
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def write_identity_repository(repo: Path, avatars: Sequence[str],
                              audio_encoder_onnx: Path | None = None) -> list[str]:
    """A CPU-profile model repository serving the identity UNet under each avatar's model name
    (`lipsync.contract.avatar_model_name`), plus the real ``audio_encoder`` when its ONNX is
    given (the gateway asks Triton for it; without it the gateway serves but keeps retrying).

    Uses only `export.model_repo.write_avatar_model` / `write_audio_encoder_model`.

    Returns:
        The model names written.

    Raises:
        export.model_repo.ModelRepoError: a model could not be written.
    """
    from export.model_repo import write_audio_encoder_model, write_avatar_model

    onnx_path = write_identity_onnx(repo.parent / f"{repo.name}-identity-unet.onnx")
    names = []
    for avatar in avatars:
        name = avatar_model_name(avatar)
        write_avatar_model(repo, name, onnx_path, "cpu")
        names.append(name)
    if audio_encoder_onnx is not None:
        names.append(write_audio_encoder_model(repo, audio_encoder_onnx, "cpu").folder.name)
    return names
