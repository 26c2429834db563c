"""Compute cost of one frame of the exported UNet, read off its ONNX graph: multiply-add
FLOPs of the convolutions and the bytes of every intermediate activation. Input for the
sizing estimates (`perf/sizing.py`, `perf/SIZING.md`).

    python -m perf.model_cost [--onnx UNET.onnx]   (default: the demo avatar's served UNet)

FLOPs: for each Conv, ``2 * Cout * Hout * Wout * (Cin / groups) * kH * kW`` at batch 1 (a
multiply-add counts 2); other ops (the pre/post-processing, resizes, activations, adds) are
elementwise and listed separately as output elements. Activation bytes: the sum of the
sizes of all tensors the graph produces at batch 1, in FP16 (2 bytes; the TensorRT path) and as
exported (FP32 inside): without fusion each is written once and read at least once, so memory
traffic is about twice that; TensorRT fuses conv + BN + activation, so the real traffic is
lower (an upper bound, not a measurement of a GPU).
Writes `perf/results/model_cost.md` and `.json`.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from perf import report

FUSED_OPS = frozenset({"Relu", "Add", "Sigmoid", "Floor", "Mul", "Div", "Cast"})
"""Ops whose outputs TensorRT typically never writes to memory (fused epilogues/elementwise)."""


@dataclass(frozen=True, slots=True)
class ModelCost:
    """Per-frame (batch 1) cost of a model.

    Attributes:
        conv_gflop: convolution FLOPs (multiply-add = 2), GFLOP.
        conv_count: number of Conv nodes.
        depthwise_count: Conv nodes with groups == input channels.
        elementwise_mel: output elements of all non-Conv nodes (millions).
        activation_mib_fp16: sum of the sizes of all produced tensors at 2 bytes (MiB).
        activation_mib_fp16_fused: the same without the outputs of nodes TensorRT fuses into
            the producing convolution or the pre/post-processing (`FUSED_OPS`): an estimate.
        parameters_m: initializer elements (millions).
        op_counts: node count per op type.
    """

    conv_gflop: float
    conv_count: int
    depthwise_count: int
    elementwise_mel: float
    activation_mib_fp16: float
    activation_mib_fp16_fused: float
    parameters_m: float
    op_counts: dict[str, int]


def model_cost(onnx_path: Path) -> ModelCost:
    """Read the cost of one frame off an ONNX graph with a batch axis (fixed to 1 here).

    Raises:
        ValueError: a tensor whose shape shape inference could not resolve.
    """
    import numpy as np
    import onnx
    from onnx import shape_inference

    model = onnx.load(str(onnx_path))
    for inp in model.graph.input:
        dim = inp.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_value = 1
    model = shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    shapes: dict[str, list[int]] = {}
    for vi in [*model.graph.value_info, *model.graph.output, *model.graph.input]:
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]
        shapes[vi.name] = dims
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    params = sum(int(np.prod(d)) for d in inits.values())

    flops = 0.0
    convs = depthwise = 0
    elementwise = 0.0
    produced = 0.0
    produced_fused = 0.0
    for node in model.graph.node:
        outs = [shapes.get(o) for o in node.output if o]
        for shp in outs:
            if shp is not None and all(d > 0 for d in shp):
                produced += float(np.prod(shp))
                if node.op_type not in FUSED_OPS:
                    produced_fused += float(np.prod(shp))
        if node.op_type == "Conv":
            convs += 1
            w = inits.get(node.input[1])
            out = shapes.get(node.output[0])
            if w is None or out is None or any(d <= 0 for d in out):
                raise ValueError(f"cannot resolve the shapes of Conv {node.name!r}")
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            _cout, cin_g, kh, kw = w
            if group > 1 and cin_g == 1:
                depthwise += 1
            flops += 2.0 * out[1] * out[2] * out[3] * cin_g * kh * kw
        elif outs and outs[0] is not None and all(d > 0 for d in outs[0]):
            elementwise += float(np.prod(outs[0]))
    return ModelCost(
        conv_gflop=flops / 1e9, conv_count=convs, depthwise_count=depthwise,
        elementwise_mel=elementwise / 1e6, activation_mib_fp16=produced * 2 / 2**20,
        activation_mib_fp16_fused=produced_fused * 2 / 2**20,
        parameters_m=params / 1e6, op_counts=dict(Counter(n.op_type for n in model.graph.node)),
    )


def demo_unet_onnx() -> Path:
    """The demo avatar's UNet graph, as the CPU model repository serves it.

    Raises:
        SystemExit: no demo model in the repository (build it with `lipsync package demo`).
    """
    from export.demo import DEMO_NAME
    from export.model_repo import served_version
    from lipsync.contract import avatar_model_name
    from lipsync.paths import MODEL_REPOSITORY_CPU

    served = served_version(MODEL_REPOSITORY_CPU, avatar_model_name(DEMO_NAME))
    if served is None:
        raise SystemExit(f"no demo UNet in {MODEL_REPOSITORY_CPU}: run `lipsync package demo`")
    return served.onnx_path


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: read the cost, write the report."""
    p = argparse.ArgumentParser(prog="python -m perf.model_cost", description=__doc__.split("\n")[0])
    p.add_argument("--onnx", type=Path, default=None,
                   help="ONNX graph (default: the demo avatar's UNet served from the CPU repository)")
    p.add_argument("--out", type=Path, default=report.RESULTS_DIR / "model_cost.md")
    args = p.parse_args(argv)
    if args.onnx is None:
        args.onnx = demo_unet_onnx()
    cost = model_cost(args.onnx)
    argv_full = ["python", "-m", "perf.model_cost", *(sys.argv[1:] if argv is None else argv)]
    lines = report.header("UNet cost per frame (from the ONNX graph)", argv_full)
    lines += [f"- graph: `{args.onnx.name}` ({args.onnx.stat().st_size / 2**20:.1f} MiB), batch 1", ""]
    lines += report.markdown_table(["quantity", "value"], [
        ["convolution GFLOP per frame (multiply-add = 2)", f"{cost.conv_gflop:.2f}"],
        ["Conv nodes (of which depthwise)", f"{cost.conv_count} ({cost.depthwise_count})"],
        ["other nodes' output elements (millions)", f"{cost.elementwise_mel:.1f}"],
        ["activations produced per frame, FP16 (MiB)", f"{cost.activation_mib_fp16:.1f}"],
        ["the same without outputs TensorRT fuses away (estimate, MiB)",
         f"{cost.activation_mib_fp16_fused:.1f}"],
        ["parameters (millions, incl. folded constants)", f"{cost.parameters_m:.2f}"],
    ])
    lines += ["", "Op counts: " + ", ".join(f"{k} {v}" for k, v in sorted(cost.op_counts.items()))]
    report.write_text(args.out, lines)
    report.write_json(args.out.with_suffix(".json"), {
        "machine": report.machine_line(), "command": report.command_line(argv_full),
        "date": report.utc_now(), "onnx": str(args.onnx.name), "cost": asdict(cost),
    })
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
