"""The admin service ``optimized_lipsyncsrv.OptimizedLipSyncAdmin`` (proto/admin.proto) on a real
`GatewayServer` whose Triton is the in-process fake: who may call it, replacing an avatar only
with ``replace``, unloading; and the seed service's wire contract, unchanged by the addition."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pb2, text_format

from gateway.server import GatewayServer
from proto import admin_pb2 as admin_pb
from proto import admin_pb2_grpc as admin_pbg
from proto import lipsync_pb2 as pb
from proto import lipsync_pb2_grpc as pbg
from tests.fake_gateway import serve_on_fake
from tests.fake_triton import FakeTriton, fake_triton
from tests.fixtures_gateway import ADMIN_TOKEN, CLIENT_TOKEN, bearer

SEED_CONTRACT = Path(__file__).parent / "data" / "seed_service.txtpb"
"""The seed service and its messages as descriptors (text format), written from the proto as it
was before the admin service was added."""


def seed_contract_text() -> str:
    """``OptimizedLipSyncService`` and every message its methods take or return, as text."""
    service = pb.DESCRIPTOR.services_by_name["OptimizedLipSyncService"]
    as_proto = descriptor_pb2.ServiceDescriptorProto()
    service.CopyToProto(as_proto)
    parts = [f"# service {service.full_name}", text_format.MessageToString(as_proto)]
    names = sorted(
        {m.input_type.full_name for m in service.methods} | {m.output_type.full_name for m in service.methods}
    )
    for name in names:
        message = descriptor_pb2.DescriptorProto()
        pb.DESCRIPTOR.pool.FindMessageTypeByName(name).CopyToProto(message)
        parts += [f"# message {name}", text_format.MessageToString(message)]
    return "\n".join(parts)


def test_seed_service_contract_is_byte_identical() -> None:
    assert seed_contract_text() == SEED_CONTRACT.read_text()


def test_admin_service_shape() -> None:
    service = admin_pb.DESCRIPTOR.services_by_name["OptimizedLipSyncAdmin"]
    assert service.full_name == "optimized_lipsyncsrv.OptimizedLipSyncAdmin"
    assert {m.name: (m.input_type.name, m.output_type.name) for m in service.methods} == {
        "LoadPackage": ("AdminLoadPackageRequest", "LoadPackageResponse"),
        "UnloadPackage": ("UnloadPackageRequest", "UnloadPackageResponse"),
    }
    fields = {f.name: f.number for f in admin_pb.AdminLoadPackageRequest.DESCRIPTOR.fields}
    assert fields == {"package_name": 1, "package_dir": 2, "replace": 3}
    seed_messages = set(pb.DESCRIPTOR.message_types_by_name)
    assert not seed_messages & set(admin_pb.DESCRIPTOR.message_types_by_name), "new messages get new names"


@pytest.fixture
def root(make_package: Any) -> Path:
    for k, name in enumerate(("alice", "bob")):
        frames = np.random.default_rng(k).integers(0, 256, (10, 48, 64, 3), dtype=np.uint8)
        folder = make_package(name=name, frames=frames)
    return Path(folder.parent)


def fake() -> Any:
    return fake_triton("lipsync_alice", "lipsync_bob", loaded=("audio_encoder",))


async def frame0(channel: grpc.aio.Channel, avatar: str, metadata: Any = None) -> bytes:
    r = await pbg.OptimizedLipSyncServiceStub(channel).GetVideoFrame(
        pb.GetVideoFrameRequest(model_name=avatar, frame_id=0), metadata=metadata
    )
    assert r.success, r.error
    return bytes(r.frame_data)


@pytest.mark.parametrize(
    ("auth", "metadata", "code", "words"),
    [
        (None, None, grpc.StatusCode.UNAUTHENTICATED, "send the admin token (LIPSYNC_ADMIN_TOKEN)"),
        (
            None,
            bearer("some-other-token-123456"),
            grpc.StatusCode.UNAUTHENTICATED,
            "the token sent is not the admin token",
        ),
        (CLIENT_TOKEN, bearer(CLIENT_TOKEN), grpc.StatusCode.PERMISSION_DENIED, "it needs the admin token"),
        (CLIENT_TOKEN, bearer(ADMIN_TOKEN), grpc.StatusCode.OK, ""),
        (None, bearer(ADMIN_TOKEN), grpc.StatusCode.OK, ""),
    ],
)
def test_admin_calls_need_the_admin_token(
    root: Path, auth: str | None, metadata: Any, code: grpc.StatusCode, words: str
) -> None:
    async def body(server: GatewayServer, _: FakeTriton) -> None:
        async with grpc.aio.insecure_channel(server.grpc_address) as channel:
            admin = admin_pbg.OptimizedLipSyncAdminStub(channel)
            seed = pbg.OptimizedLipSyncServiceStub(channel)
            for call in (
                admin.UnloadPackage(admin_pb.UnloadPackageRequest(package_name="nobody"), metadata=metadata),
                admin.LoadPackage(admin_pb.AdminLoadPackageRequest(package_dir="alice"), metadata=metadata),
                seed.LoadPackage(pb.LoadPackageRequest(package_dir="alice"), metadata=metadata),
            ):
                if code is grpc.StatusCode.OK:
                    await call
                else:
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await call
                    assert err.value.code() is code and words in (err.value.details() or "")

    serve_on_fake(root, fake(), body, auth_token=auth, admin_token=ADMIN_TOKEN)


def test_replace_flag_unload_and_reload(root: Path) -> None:
    async def body(server: GatewayServer, _: FakeTriton) -> None:
        md = bearer(ADMIN_TOKEN)
        async with grpc.aio.insecure_channel(server.grpc_address) as channel:
            admin = admin_pbg.OptimizedLipSyncAdminStub(channel)
            seed = pbg.OptimizedLipSyncServiceStub(channel)
            alice, bob = await frame0(channel, "alice"), await frame0(channel, "bob")
            assert alice != bob
            r = await admin.LoadPackage(
                admin_pb.AdminLoadPackageRequest(package_dir="bob", package_name="alice"), metadata=md
            )
            assert not r.success and "replace=true" in r.error and await frame0(channel, "alice") == alice

            # bob out, then bob's folder in as alice: replace
            u = await admin.UnloadPackage(admin_pb.UnloadPackageRequest(package_name="bob"), metadata=md)
            assert u.success and u.package_name == "bob" and "MiB of frames released" in u.message
            assert (await seed.ListModels(pb.ListModelsRequest())).loaded_models == ["alice"]
            gone = await seed.GenerateInference(pb.OptimizedInferenceRequest(model_name="bob", frame_id=0))
            assert gone.error.startswith("unknown_avatar: avatar 'bob' is not loaded")
            r = await admin.LoadPackage(
                admin_pb.AdminLoadPackageRequest(package_dir="bob", package_name="alice", replace=True),
                metadata=md,
            )
            assert r.success and r.package_name == "alice", r.error
            assert await frame0(channel, "alice") == bob
            assert (await seed.ListModels(pb.ListModelsRequest())).loaded_models == ["alice"]
            assert server.ctx is not None
            snapshot = server.ctx.lifecycle.snapshot()
            assert "lipsync_alice" not in snapshot.models, "the replaced avatar's model is no longer required"
            assert "lipsync_alice" not in server.ctx.store
            assert server.ctx.store.get("lipsync_bob").name == "alice"

            again = await admin.UnloadPackage(admin_pb.UnloadPackageRequest(package_name="bob"), metadata=md)
            assert not again.success and again.error.startswith("unknown_avatar: ")
            assert (await seed.HealthCheck(pb.HealthRequest())).healthy
            await admin.UnloadPackage(admin_pb.UnloadPackageRequest(package_name="alice"), metadata=md)
            assert not (await seed.HealthCheck(pb.HealthRequest())).healthy, "no avatar: not ready"
            r = await admin.LoadPackage(admin_pb.AdminLoadPackageRequest(package_dir="alice"), metadata=md)
            assert (
                r.success
                and r.frame_count > 0
                and list(r.videos_loaded) == ["full_body", "face_regions", "masked_regions"]
            )
            assert await frame0(channel, "alice") == alice

    serve_on_fake(root, fake(), body, admin_token=ADMIN_TOKEN)
