"""gRPC requests that do not decode (issue 16): the bytes, the server's methods found by
reflection, one call carrying such bytes. Shared by tests/test_malformed.py (fake Triton) and
tests/test_robustness.py (the `lipsync gateway` process)."""
from __future__ import annotations

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

UNDECODABLE = (
    b"\x0f",  # field 1, wire type 7: no such wire type
    b"\x0e\x00",  # wire type 6
    b"\x00\x01",  # field number 0
    b"\x0c",  # end of a group that never started
    b"\x08" + b"\xff" * 10 + b"\x01",  # a varint of 11 bytes
    b"\x0a\x05ab",  # a length-delimited field 5 bytes long with 2 bytes left
    b"\x12\xff\xff\xff\xff\x0f",  # field 2, length 4 GiB
)
"""Protobuf encodings no message type decodes (`assert_undecodable` checks each method's)."""

Method = tuple[str, bool, bool, str]
"""(full method name, client streaming, server streaming, input message type)."""


async def served_methods(
    channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...] | None = None
) -> list[Method]:
    """(full method name, client streaming, server streaming, input type) of every method of
    every service the server lists by reflection (asked with ``metadata``: a gateway's token)."""
    call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(metadata=metadata)
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    services = [s.name for s in (await call.read()).list_services_response.service]
    methods = []
    for service in services:
        await call.write(reflection_pb2.ServerReflectionRequest(file_containing_symbol=service))
        for raw in (await call.read()).file_descriptor_response.file_descriptor_proto:
            fd = descriptor_pb2.FileDescriptorProto.FromString(raw)
            for s in fd.service:
                if f"{fd.package}.{s.name}" == service:
                    methods += [
                        (f"/{service}/{m.name}", m.client_streaming, m.server_streaming,
                         m.input_type.lstrip("."))
                        for m in s.method
                    ]
    await call.done_writing()
    return methods


def _raw(data: bytes) -> bytes:
    return data


async def send_undecodable(
    channel: grpc.aio.Channel, method: str, client_streaming: bool, server_streaming: bool,
    bad: bytes, good_first: bool, metadata: tuple[tuple[str, str], ...] | None = None,
) -> tuple[int, grpc.StatusCode, str]:
    """One call carrying ``bad`` (after one good, empty message when ``good_first``), with
    ``metadata`` (a token): the number of answers before its status, and the status."""
    answers = 0
    raw = {"request_serializer": _raw, "response_deserializer": _raw}  # bytes as they are
    try:
        if client_streaming:
            requests = [b"", bad] if good_first else [bad]
            if server_streaming:
                async for _ in channel.stream_stream(method, **raw)(iter(requests), metadata=metadata):
                    answers += 1
            else:
                await channel.stream_unary(method, **raw)(iter(requests), metadata=metadata)
        elif server_streaming:
            async for _ in channel.unary_stream(method, **raw)(bad, metadata=metadata):
                answers += 1
        else:
            await channel.unary_unary(method, **raw)(bad, metadata=metadata)
    except grpc.aio.AioRpcError as exc:
        return answers, exc.code(), exc.details() or ""
    return answers, grpc.StatusCode.OK, ""


def assert_undecodable(methods: list[Method]) -> None:
    """Each of `UNDECODABLE` really fails to decode as each method's input type."""
    for _, _, _, input_type in methods:
        cls = message_factory.GetMessageClass(descriptor_pool.Default().FindMessageTypeByName(input_type))
        for bad in UNDECODABLE:
            with pytest.raises(DecodeError):
                cls.FromString(bad)
