"""`gateway.triton_client.TritonGrpcClient` over a real gRPC channel to an in-process server that
speaks Triton's ``GRPCInferenceService`` (the servicer shipped in ``tritonclient``): the control
key metadata, the error kinds the lifecycle tells apart, and the contract checks on answers; and,
against the real tritonserver with its model-repository protocol restricted by key, that the
gateway loads models with the key and only with it."""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as triton_pb
from tritonclient.grpc import service_pb2_grpc as triton_grpc

from gateway.errors import TritonDeadline, TritonUnavailable
from gateway.model_lifecycle import ModelLifecycle, ModelPhase
from gateway.triton_client import CONTROL_KEY_HEADER, TritonGrpcClient
from lipsync.triton_local import free_ports
from tests.fixtures_triton import StartTriton

T = TypeVar("T")


class TritonLike(triton_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]  # untyped base (tritonclient)
    """Answers like Triton; records the metadata of each call; ``stall_s`` delays liveness."""

    def __init__(self) -> None:
        self.metadata: dict[str, dict[str, str | bytes]] = {}
        self.stall_s = 0.0
        self.pred_shape = [1, 320, 320, 3]

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await asyncio.sleep(self.stall_s)
        return triton_pb.ServerLiveResponse(live=True)

    async def RepositoryModelLoad(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        self.metadata[request.model_name] = {k: v for k, v in context.invocation_metadata() or ()}
        if request.model_name == "broken":
            await context.abort(grpc.StatusCode.INTERNAL, "failed to load 'broken': bad ONNX")
        return triton_pb.RepositoryModelLoadResponse()

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        out = np.zeros(self.pred_shape, np.uint8)
        return triton_pb.ModelInferResponse(
            model_name=request.model_name,
            outputs=[
                triton_pb.ModelInferResponse.InferOutputTensor(
                    name="pred", datatype="UINT8", shape=self.pred_shape
                )
            ],
            raw_output_contents=[out.tobytes()],
        )


def with_server(body: Callable[[TritonLike, str], Awaitable[T]]) -> T:
    async def run() -> T:
        servicer = TritonLike()
        server = grpc.aio.server()
        triton_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            return await body(servicer, f"127.0.0.1:{port}")
        finally:
            await server.stop(0)

    return asyncio.run(run())


@pytest.mark.parametrize("key", [None, "s3cret"])
def test_load_model_sends_the_control_key_only_when_set(key: str | None) -> None:
    async def body(servicer: TritonLike, url: str) -> None:
        client = TritonGrpcClient(url, control_key=key)
        try:
            await client.load_model("lipsync_a")
            assert await client.server_live()
            with pytest.raises(
                TritonUnavailable, match=r"load_model\('broken'\) failed: StatusCode.INTERNAL: .*bad ONNX"
            ):
                await client.load_model("broken")
        finally:
            await client.close()
        sent = {k: v for k, v in servicer.metadata["lipsync_a"].items() if CONTROL_KEY_HEADER in k}
        assert sent == ({} if key is None else {f"triton-grpc-protocol-{CONTROL_KEY_HEADER}": key})

    with_server(body)


def test_a_late_answer_is_a_deadline_and_a_refused_connection_is_not() -> None:
    async def body(servicer: TritonLike, url: str) -> None:
        servicer.stall_s = 1.0
        client = TritonGrpcClient(url, probe_timeout_s=0.05)
        try:
            with pytest.raises(TritonDeadline, match="DEADLINE_EXCEEDED"):
                await client.server_live()
        finally:
            await client.close()
        (port,) = free_ports(1)
        refused = TritonGrpcClient(f"127.0.0.1:{port}", probe_timeout_s=2.0)
        try:
            with pytest.raises(
                TritonUnavailable, match=rf"Triton at 127.0.0.1:{port} unreachable: StatusCode.UNAVAILABLE"
            ) as info:
                await refused.server_live()
            assert not isinstance(info.value, TritonDeadline)
        finally:
            await refused.close()

    with_server(body)


def test_an_answer_of_the_wrong_shape_is_refused() -> None:
    async def body(servicer: TritonLike, url: str) -> None:
        client = TritonGrpcClient(url)
        crop = np.zeros((1, 320, 320, 3), np.uint8)
        window = np.zeros((1, 16, 512), np.float32)
        try:
            assert (await client.infer_unet("lipsync_a", crop, window)).shape == (1, 320, 320, 3)
            servicer.pred_shape = [1, 16, 16, 3]
            with pytest.raises(
                TritonUnavailable, match=r"answered uint8 \[1, 16, 16, 3\], expected uint8 \[1, 320, 320, 3\]"
            ):
                await client.infer_unet("lipsync_a", crop, window)
        finally:
            await client.close()

    with_server(body)


def test_restricted_triton_loads_models_with_the_key_only(
    start_triton: StartTriton, demo_package: Any
) -> None:
    from lipsync.paths import MODEL_REPOSITORY_CPU

    key = "k" * 64
    restricted = f"--grpc-restricted-protocol=model-repository:{CONTROL_KEY_HEADER}={key}"
    server = start_triton(MODEL_REPOSITORY_CPU, load_models=("audio_encoder",), extra_args=[restricted])
    model = demo_package.manifest.model_name

    async def register(control_key: str | None) -> tuple[ModelPhase, str | None]:
        client = TritonGrpcClient(server.grpc_url, control_key=control_key, load_timeout_s=120.0)
        try:
            status = (await ModelLifecycle(client).register(model)).models[model]
            return status.phase, status.error
        finally:
            await client.close()

    phase, error = asyncio.run(register(None))
    assert phase is ModelPhase.UNAVAILABLE and "restricted" in (error or ""), error
    phase, error = asyncio.run(register("wrong"))
    assert phase is ModelPhase.UNAVAILABLE and "restricted" in (error or ""), error
    assert asyncio.run(register(key)) == (ModelPhase.READY, None)
