"""Triton Python-backend model: runs `model.onnx` from its version folder with ONNX Runtime (CPU).

This is the CPU serving profile (docs/ARCHITECTURE.md "Two serving profiles").
`export/model_repo.py` copies this file, unchanged, into every version folder
`<repo>/<model>/<v>/model.py` next to `model.onnx`.

Batching: Triton's dynamic batcher hands `execute()` a list of requests. They are concatenated
along the batch axis and run with ONE `InferenceSession.run` call, then the outputs are split
back per request, so a batch of N requests costs one forward pass, not N. If that call fails,
each request is retried on its own so that only the faulty one gets an error response.

Tensors: this file runs inside Triton's Python-backend stub and imports nothing of the project;
every tensor name and dtype comes from the model's config.pbtxt, which the writer generates from
the ONNX graph and checks against the model contract (`lipsync/contract.py`). Each request's
arrays are [b, ...] with the config's dims; the batch axis b is the only one this code touches.

Config `parameters` read here (all optional, string values):
- `intra_op_thread_count`: ONNX Runtime intra-op threads; "0" or absent = every CPU core the
  server may use (`os.sched_getaffinity`).
- `onnx_file`: the ONNX file name in the version folder (default `model.onnx`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils
from numpy.typing import NDArray


def _parameter(model_config: dict[str, Any], key: str, default: str) -> str:
    """Return the string value of config `parameters[key]`, or `default` when absent/empty."""
    value = model_config.get("parameters", {}).get(key, {}).get("string_value", "")
    return value if value != "" else default


def _cpu_count() -> int:
    """Number of CPU cores this process may run on (honours taskset/cgroup affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


class TritonPythonModel:
    """One ONNX Runtime session per model instance; one `session.run` per batch of requests."""

    def initialize(self, args: dict[str, str]) -> None:
        """Load the ONNX file of this version with the CPU execution provider.

        Raises:
            pb_utils.TritonModelException: the ONNX file is missing, or its inputs/outputs do
                not match the names in config.pbtxt.
        """
        self.model_config: dict[str, Any] = json.loads(args["model_config"])
        self.model_name = args["model_name"]
        version_dir = Path(args["model_repository"]) / args["model_version"]
        # "model.onnx" is Triton's own default file name of an ONNX model.
        onnx_path = version_dir / _parameter(self.model_config, "onnx_file", "model.onnx")
        if not onnx_path.is_file():
            raise pb_utils.TritonModelException(
                f"{self.model_name}: ONNX file {onnx_path} not found; regenerate the model with "
                "`lipsync export model-repo`"
            )
        threads = int(_parameter(self.model_config, "intra_op_thread_count", "0")) or _cpu_count()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(
            str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self.input_names = [t["name"] for t in self.model_config["input"]]
        self.output_names = [t["name"] for t in self.model_config["output"]]
        self.input_dtypes = {
            t["name"]: pb_utils.triton_string_to_numpy(t["data_type"])
            for t in self.model_config["input"]
        }
        graph_inputs = {i.name for i in self.session.get_inputs()}
        graph_outputs = {o.name for o in self.session.get_outputs()}
        if set(self.input_names) != graph_inputs or not set(self.output_names) <= graph_outputs:
            raise pb_utils.TritonModelException(
                f"{self.model_name}: config.pbtxt tensors (inputs {self.input_names}, outputs "
                f"{self.output_names}) do not match {onnx_path.name} (inputs "
                f"{sorted(graph_inputs)}, outputs {sorted(graph_outputs)})"
            )
        pb_utils.Logger.log_info(
            f"{self.model_name}: loaded {onnx_path} with ONNX Runtime {ort.__version__}, "
            f"{threads} intra-op threads"
        )

    def _inputs_of(self, request: Any) -> dict[str, NDArray[Any]]:
        """The request's input arrays by name, each [b, ...] with the config's dtype.

        Raises:
            ValueError: an input is missing or the inputs disagree on the batch size b.
        """
        arrays: dict[str, NDArray[Any]] = {}
        for name in self.input_names:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise ValueError(f"input '{name}' is missing")
            arrays[name] = np.ascontiguousarray(tensor.as_numpy(), dtype=self.input_dtypes[name])
        sizes = {a.shape[0] for a in arrays.values()}
        if len(sizes) != 1:
            shapes = {name: array.shape for name, array in arrays.items()}
            raise ValueError(f"inputs disagree on the batch size: {shapes}")
        return arrays

    def _respond(self, outputs: list[NDArray[Any]]) -> Any:
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor(name, np.ascontiguousarray(value))
                for name, value in zip(self.output_names, outputs, strict=True)
            ]
        )

    @staticmethod
    def _error(message: str) -> Any:
        return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))

    def execute(self, requests: list[Any]) -> list[Any]:
        """Run every request of this batch in one ONNX Runtime call.

        Returns one response per request, in order; a request that cannot be read or run gets
        an error response while the others are answered.
        """
        responses: list[Any] = [None] * len(requests)
        gathered: list[tuple[int, dict[str, NDArray[Any]]]] = []
        for index, request in enumerate(requests):
            try:
                gathered.append((index, self._inputs_of(request)))
            except Exception as exc:  # noqa: BLE001 - becomes this request's error
                responses[index] = self._error(f"{self.model_name}: bad request: {exc}")
        if gathered:
            feeds = {
                name: np.concatenate([arrays[name] for _, arrays in gathered], axis=0)
                if len(gathered) > 1
                else gathered[0][1][name]
                for name in self.input_names
            }
            try:
                outputs = self.session.run(self.output_names, feeds)
            except Exception:  # noqa: BLE001 - isolate the failing request below
                outputs = None
            if outputs is not None:
                sizes = [arrays[self.input_names[0]].shape[0] for _, arrays in gathered]
                bounds = np.cumsum([0, *sizes])
                for k, (index, _) in enumerate(gathered):
                    responses[index] = self._respond(
                        [out[bounds[k] : bounds[k + 1]] for out in outputs]
                    )
            else:
                for index, arrays in gathered:
                    try:
                        responses[index] = self._respond(
                            self.session.run(self.output_names, arrays)
                        )
                    except Exception as exc:  # noqa: BLE001 - this request's own error
                        responses[index] = self._error(
                            f"{self.model_name}: inference failed: {exc}"
                        )
        return responses

    def finalize(self) -> None:
        """Release the ONNX Runtime session."""
        self.session = None
