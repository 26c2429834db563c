"""Tokens and TLS on a real `GatewayServer` (loopback, free ports) whose Triton is the in-process
fake: with ``LIPSYNC_AUTH_TOKEN`` set, every gRPC method the server serves and every HTTP route
the app has refuses a caller without the token (UNAUTHENTICATED / 401), except the health
checks, /metrics and the page's own files; with the token everything works, over TLS too
(certificates from a throw-away CA, `tests.tls_files`), mutual TLS included. The RPCs and routes
are enumerated from the running server, so one added later is covered without editing this."""

from __future__ import annotations

import asyncio
import importlib
import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ValidationError
from tritonclient.grpc import service_pb2_grpc as triton_grpc

from gateway.config import GatewaySettings
from gateway.context import GatewayContext
from gateway.server import GatewayServer
from gateway.tls import TlsConfigError
from gateway.ws_protocol import FrameReply, decode_reply, encode_request
from lipsync.paths import REPO_ROOT
from proto import lipsync_pb2 as pb
from proto import lipsync_pb2_grpc as pbg
from tests.fake_gateway import serve_on_fake
from tests.fake_triton import FakeTriton, fake_triton
from tests.fixtures_gateway import ADMIN_TOKEN, CLIENT_TOKEN, bearer
from tests.test_triton_client import TritonLike
from tests.tls_files import TlsFiles, make_tls_files
from tests.undecodable import Method, served_methods

AVATAR = "synthetic"
OPEN_GRPC = {"grpc.health.v1.Health"}
OPEN_ROUTES = {"/healthz", "/readyz", "/metrics", "/", "/static/{name}"}
"""Open without a token: health, readiness (reduced), metrics, the page and its files."""
ASK = "send the gateway's token (LIPSYNC_AUTH_TOKEN) as `authorization: Bearer <token>`"
"""What a call without the token is told."""
PAGE = {"/", "/static/{name}"}
"""The page's routes: open, but not for a WebSocket upgrade."""


@pytest.fixture
def root(make_package: Any) -> Path:
    frames = np.random.default_rng(0).integers(0, 256, (10, 48, 64, 3), dtype=np.uint8)
    return Path(make_package(name=AVATAR, frames=frames).parent)


@pytest.fixture
def tls(tmp_path: Path) -> TlsFiles:
    return make_tls_files(tmp_path / "tls")


def fake() -> Any:
    return fake_triton(f"lipsync_{AVATAR}", loaded=("audio_encoder",))


def tls_settings(files: TlsFiles, **more: Any) -> dict[str, Any]:
    return {"tls_cert": files.cert, "tls_key": files.key, **more}


# ----------------------------------------------------------------------------- gRPC


async def every_method(channel: grpc.aio.Channel, token: str) -> list[Method]:
    """Every method the server lists by reflection, and every method of the services the
    project's proto files declare (their stubs imported), listed or not."""
    methods = await served_methods(channel, bearer(token))
    listed = {name for name, *_ in methods}
    for proto in (REPO_ROOT / "proto").glob("*.proto"):
        module = importlib.import_module(f"proto.{proto.stem}_pb2")
        for service in module.DESCRIPTOR.services_by_name.values():
            methods += [
                (
                    f"/{service.full_name}/{m.name}",
                    m.client_streaming,
                    m.server_streaming,
                    m.input_type.full_name,
                )
                for m in service.methods
                if f"/{service.full_name}/{m.name}" not in listed
            ]
    return methods


def raw(data: bytes) -> bytes:
    """The identity (de)serializer: messages as bytes."""
    return data


async def call_raw(channel: grpc.aio.Channel, method: Method, metadata: Any) -> grpc.StatusCode:
    """Call ``method`` with one empty message (none for a client stream): the status code it
    ends with, or OK once a server stream has sent its first answer."""
    path, client_streaming, server_streaming, _ = method

    async def nothing() -> AsyncIterator[bytes]:
        return
        yield b""

    try:
        if client_streaming and server_streaming:
            async for _ in channel.stream_stream(path, request_serializer=raw, response_deserializer=raw)(
                nothing(), metadata=metadata, timeout=10
            ):
                break
        elif client_streaming:
            await channel.stream_unary(path, request_serializer=raw, response_deserializer=raw)(
                nothing(), metadata=metadata, timeout=10
            )
        elif server_streaming:
            async for _ in channel.unary_stream(path, request_serializer=raw, response_deserializer=raw)(
                b"", metadata=metadata, timeout=10
            ):
                break
        else:
            await channel.unary_unary(path, request_serializer=raw, response_deserializer=raw)(
                b"", metadata=metadata, timeout=10
            )
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "tls"])
def test_every_grpc_method_needs_the_token_except_health(root: Path, tls: TlsFiles, secure: bool) -> None:
    async def body(server: GatewayServer, _: FakeTriton) -> None:
        async with (
            grpc.aio.secure_channel(server.grpc_address, grpc_credentials(tls))
            if secure
            else grpc.aio.insecure_channel(server.grpc_address)
        ) as channel:
            methods = await every_method(channel, CLIENT_TOKEN)
            assert len(methods) >= 12  # seed 10 + admin 2, at least
            for method in methods:
                path = method[0]
                service, name = path.split("/")[1:]
                for metadata in (None, bearer("not-the-token-at-all"), (("authorization", CLIENT_TOKEN),)):
                    code = await call_raw(channel, method, metadata)
                    if service in OPEN_GRPC:
                        assert code is not grpc.StatusCode.UNAUTHENTICATED, path
                    else:
                        assert code is grpc.StatusCode.UNAUTHENTICATED, (path, metadata, code)
                code = await call_raw(channel, method, bearer(CLIENT_TOKEN))
                if service == "optimized_lipsyncsrv.OptimizedLipSyncAdmin" or name == "LoadPackage":
                    assert code is grpc.StatusCode.PERMISSION_DENIED, path
                    assert await call_raw(channel, method, bearer(ADMIN_TOKEN)) is grpc.StatusCode.OK
                else:
                    refused = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
                    assert code not in refused, (path, code)

            stub = pbg.OptimizedLipSyncServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ListModels(pb.ListModelsRequest())
            assert err.value.details() == (f"unauthenticated: {ASK}")
            r = await stub.GenerateInference(
                pb.OptimizedInferenceRequest(model_name=AVATAR, frame_id=3), metadata=bearer(CLIENT_TOKEN)
            )
            assert r.success and r.prediction_data[:2] == b"\xff\xd8"
            # the admin token may make every call
            assert (
                await stub.ListModels(pb.ListModelsRequest(), metadata=bearer(ADMIN_TOKEN))
            ).loaded_models == [AVATAR]
            health = health_pb2_grpc.HealthStub(channel)
            assert (
                await health.Check(health_pb2.HealthCheckRequest())
            ).status == health_pb2.HealthCheckResponse.SERVING

    transport = tls_settings(tls) if secure else {}
    serve_on_fake(root, fake(), body, auth_token=CLIENT_TOKEN, admin_token=ADMIN_TOKEN, **transport)


def test_without_a_token_setting_clients_need_none(root: Path) -> None:
    async def body(server: GatewayServer, _: FakeTriton) -> None:
        async with grpc.aio.insecure_channel(server.grpc_address) as channel:
            stub = pbg.OptimizedLipSyncServiceStub(channel)
            r = await stub.GenerateInference(pb.OptimizedInferenceRequest(model_name=AVATAR, frame_id=3))
            assert r.success
        async with aiohttp.ClientSession() as session, session.get(f"{server.http_url}/api/avatars") as resp:
            assert resp.status == 200

    serve_on_fake(root, fake(), body)


# ----------------------------------------------------------------------------- HTTP


def route_paths(app: Any) -> list[tuple[str, str, str]]:
    """``(method, canonical, concrete path)`` of every route of the app."""
    out = []
    for route in app.router.routes():
        canonical = route.resource.canonical
        path = (
            "/static/app.js"
            if canonical == "/static/{name}"
            else (canonical.replace("{name}", AVATAR).replace("{frame_id}", "0"))
        )
        out.append((route.method, canonical, path))
    return out


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "tls"])
def test_every_http_route_needs_the_token_except_health_metrics_and_page(
    root: Path, tls: TlsFiles, secure: bool
) -> None:
    async def body(server: GatewayServer, _: FakeTriton) -> None:
        assert server.http_url.startswith("https://" if secure else "http://")
        routes = route_paths(server.http_app)
        assert {c for _, c, _ in routes} >= {"/ws", "/api/avatars", "/api/stats", "/readyz"}
        connector = aiohttp.TCPConnector(ssl=client_ssl(tls) if secure else True)
        async with aiohttp.ClientSession(connector=connector) as session:
            for method, canonical, path in routes:
                url = f"{server.http_url}{path}"
                async with session.request(method, url) as resp:
                    if canonical in OPEN_ROUTES:
                        assert resp.status != 401, (method, path)
                    else:
                        assert resp.status == 401, (method, path, resp.status)
                        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
                        if method == "GET":
                            assert await resp.json() == {
                                "error": "unauthenticated",
                                "message": ASK,
                            }
                async with session.request(
                    method, url, headers={"Authorization": "Bearer wrong-token-0000000"}
                ) as resp:
                    assert (resp.status == 401) is (canonical not in OPEN_ROUTES), (method, path)
                async with session.request(
                    method, url, headers={"Authorization": f"Bearer {CLIENT_TOKEN}"}
                ) as resp:
                    assert resp.status != 401, (method, path)
                if method == "GET":  # a WebSocket upgrade on any route needs the token, the page's too
                    with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                        await session.ws_connect(url.replace("http", "ws", 1))
                    assert (err.value.status == 401) is (canonical not in OPEN_ROUTES - PAGE), (
                        path,
                        err.value.status,
                    )
            # an unknown path says nothing either
            async with session.get(f"{server.http_url}/api/nothing") as resp:
                assert resp.status == 401

    serve_on_fake(root, fake(), body, auth_token=CLIENT_TOKEN, **(tls_settings(tls) if secure else {}))


async def ws_frame(session: aiohttp.ClientSession, url: str, **kwargs: Any) -> FrameReply:
    async with session.ws_connect(url, **kwargs) as ws:
        await ws.send_bytes(encode_request(AVATAR, 2))
        reply = decode_reply((await ws.receive(timeout=10)).data)
    assert isinstance(reply, FrameReply) and reply.frame_id == 2
    return reply


def test_websocket_takes_the_token_as_header_or_query(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def body(server: GatewayServer, _: FakeTriton) -> None:
        ws_url = server.http_url.replace("http", "ws") + "/ws"
        async with aiohttp.ClientSession() as session:
            base = server.http_url.replace("http", "ws")
            for url in (ws_url, f"{ws_url}?token=nope-nope-nope-nope", f"{base}/", f"{base}/live"):
                with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                    await session.ws_connect(url)
                assert err.value.status == 401, url
            await ws_frame(session, f"{ws_url}?token={CLIENT_TOKEN}")
            await ws_frame(session, ws_url, headers={"Authorization": f"Bearer {CLIENT_TOKEN}"})
            async with session.ws_connect(f"{base}/live?token={CLIENT_TOKEN}") as live:
                assert not live.closed
            # the query token is for WebSockets only
            async with session.get(f"{server.http_url}/api/stats?token={CLIENT_TOKEN}") as resp:
                assert resp.status == 401

    with caplog.at_level(logging.INFO, logger="aiohttp.access"):
        serve_on_fake(root, fake(), body, auth_token=CLIENT_TOKEN)
    access = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    assert any('"GET /ws?token=REDACTED HTTP/1.1" 101' in line for line in access), access
    assert not any(CLIENT_TOKEN in line for line in access), "a token reached the access log"


def test_readyz_is_reduced_for_callers_without_the_token(root: Path) -> None:
    async def body(server: GatewayServer, _: FakeTriton) -> None:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{server.http_url}/readyz") as resp:
                assert resp.status == 200 and await resp.json() == {"ready": True, "reason": None}
            async with session.get(
                f"{server.http_url}/readyz", headers={"Authorization": f"Bearer {CLIENT_TOKEN}"}
            ) as resp:
                full = await resp.json()
            assert full["triton"]["url"] == "fake-triton:8001" and full["avatars"] == [AVATAR]
            assert server.ctx is not None
            await server.ctx.store.unload(AVATAR)
            async with session.get(f"{server.http_url}/readyz") as resp:
                assert resp.status == 503 and await resp.json() == {"ready": False, "reason": "no_avatar"}
            async with session.get(f"http://127.0.0.1:{server.health_port}/readyz") as resp:
                assert resp.status == 503 and await resp.json() == {"ready": False, "reason": "no_avatar"}
            async with session.get(f"http://127.0.0.1:{server.health_port}/metrics") as resp:
                assert resp.status == 200 and "lipsync_gateway" in await resp.text()
            async with session.get(f"http://127.0.0.1:{server.health_port}/api/avatars") as resp:
                assert resp.status == 404, "the health port serves health, readiness and metrics only"

    serve_on_fake(root, fake(), body, auth_token=CLIENT_TOKEN, health_port=0)


def settings(**values: Any) -> GatewaySettings:
    """`GatewaySettings` from ``values`` alone (validators run; no environment)."""
    return GatewaySettings.model_validate(values)


# ----------------------------------------------------------------------------- TLS


def client_ssl(files: TlsFiles, *, client_cert: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(files.ca))
    if client_cert:
        context.load_cert_chain(files.client_cert, files.client_key)
    return context


def grpc_credentials(files: TlsFiles, *, client_cert: bool = False) -> grpc.ChannelCredentials:
    if not client_cert:
        return grpc.ssl_channel_credentials(root_certificates=files.ca.read_bytes())
    return grpc.ssl_channel_credentials(
        root_certificates=files.ca.read_bytes(),
        private_key=files.client_key.read_bytes(),
        certificate_chain=files.client_cert.read_bytes(),
    )


def test_everything_works_over_tls_with_the_token(root: Path, tls: TlsFiles) -> None:
    async def body(server: GatewayServer, _: FakeTriton) -> None:
        assert server.http_url.startswith("https://")
        async with grpc.aio.secure_channel(server.grpc_address, grpc_credentials(tls)) as channel:
            stub = pbg.OptimizedLipSyncServiceStub(channel)
            md = bearer(CLIENT_TOKEN)
            r = await stub.GenerateInference(
                pb.OptimizedInferenceRequest(model_name=AVATAR, frame_id=3), metadata=md
            )
            assert r.success and r.prediction_data[:2] == b"\xff\xd8"
            batch = await stub.GenerateBatchInference(
                pb.BatchInferenceRequest(model_name=AVATAR, frame_ids=[1, 2]), metadata=md
            )
            assert [x.success for x in batch.responses] == [True, True]
            answers = [
                a
                async for a in stub.StreamInference(
                    iter([pb.OptimizedInferenceRequest(model_name=AVATAR, frame_id=i) for i in range(4)]),
                    metadata=md,
                )
            ]
            assert [a.frame_id for a in answers] == [0, 1, 2, 3] and all(a.success for a in answers)
            assert (
                await stub.GetModelMetadata(pb.GetModelMetadataRequest(model_name=AVATAR), metadata=md)
            ).success
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ListModels(pb.ListModelsRequest())
            assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
        # a plain-text client gets nothing
        async with grpc.aio.insecure_channel(server.grpc_address) as plain:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await pbg.OptimizedLipSyncServiceStub(plain).ListModels(
                    pb.ListModelsRequest(), metadata=bearer(CLIENT_TOKEN), timeout=5
                )
            assert err.value.code() is grpc.StatusCode.UNAVAILABLE

        context = client_ssl(tls)
        headers = {"Authorization": f"Bearer {CLIENT_TOKEN}"}
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{server.http_url}/api/avatars", ssl=context, headers=headers) as resp:
                assert resp.status == 200 and (await resp.json())["avatars"][0]["name"] == AVATAR
            async with session.get(
                f"{server.http_url}/api/avatars/{AVATAR}/frames/1.jpg", ssl=context, headers=headers
            ) as resp:
                assert resp.status == 200 and (await resp.read())[:2] == b"\xff\xd8"
            async with session.get(f"{server.http_url}/api/avatars", ssl=context) as resp:
                assert resp.status == 401
            async with session.get(f"{server.http_url}/", ssl=context) as resp:
                assert resp.status == 200 and "<canvas" in await resp.text()
            await ws_frame(
                session, server.http_url.replace("https", "wss") + f"/ws?token={CLIENT_TOKEN}", ssl=context
            )
            with pytest.raises(aiohttp.ClientConnectorCertificateError):  # not our CA: refused
                await session.get(
                    f"{server.http_url}/healthz", ssl=ssl.create_default_context(cafile=str(tls.other_ca))
                )

    serve_on_fake(root, fake(), body, auth_token=CLIENT_TOKEN, **tls_settings(tls))


def test_mutual_tls_needs_a_client_certificate(root: Path, tls: TlsFiles) -> None:
    async def body(server: GatewayServer, _: FakeTriton) -> None:
        for cert, ok in ((False, False), (True, True)):
            async with grpc.aio.secure_channel(
                server.grpc_address, grpc_credentials(tls, client_cert=cert)
            ) as channel:
                call = pbg.OptimizedLipSyncServiceStub(channel).ListModels(pb.ListModelsRequest(), timeout=5)
                if ok:
                    assert (await call).loaded_models == [AVATAR]
                else:
                    with pytest.raises(grpc.aio.AioRpcError):
                        await call
            async with aiohttp.ClientSession() as session:
                if ok:
                    async with session.get(
                        f"{server.http_url}/api/stats", ssl=client_ssl(tls, client_cert=True)
                    ) as resp:
                        assert resp.status == 200
                else:
                    with pytest.raises(aiohttp.ClientError):
                        async with session.get(f"{server.http_url}/api/stats", ssl=client_ssl(tls)) as resp:
                            await resp.read()
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{server.health_port}/healthz") as resp,
        ):
            assert resp.status == 200, "the health port needs no client certificate"

    serve_on_fake(root, fake(), body, health_port=0, **tls_settings(tls, tls_client_ca=tls.ca))


def test_tls_settings_come_as_a_pair_and_as_usable_files(tls: TlsFiles, tmp_path: Path, root: Path) -> None:
    with pytest.raises(ValidationError, match="set both LIPSYNC_TLS_CERT and LIPSYNC_TLS_KEY, or neither"):
        settings(tls_cert=tls.cert)
    with pytest.raises(ValidationError, match="LIPSYNC_TLS_CLIENT_CA"):
        settings(tls_client_ca=tls.ca)
    with pytest.raises(ValidationError, match="is not a file"):
        settings(tls_cert=tmp_path / "missing.pem", tls_key=tls.key)
    # a key that does not match the certificate: refused before anything is bound
    with pytest.raises(TlsConfigError, match="LIPSYNC_TLS_CERT"):
        serve_on_fake(
            root, fake(), lambda s, f: pytest.fail("started"), tls_cert=tls.cert, tls_key=tls.client_key
        )


def test_triton_over_tls_with_the_setting(tls: TlsFiles, tmp_path: Path) -> None:
    """A Triton-like gRPC server with TLS (`tests.test_triton_client.TritonLike`): a gateway
    context with ``triton_tls`` and the CA reaches it; without ``triton_tls`` it does not."""

    async def live(port: int, **tls_options: Any) -> bool:
        values = {"triton_url": f"127.0.0.1:{port}", "packages_root": tmp_path, "triton_probe_timeout_s": 5}
        ctx = await GatewayContext.create(settings(**values, **tls_options))
        try:
            return ctx.lifecycle.snapshot().live
        finally:
            await ctx.close()

    async def run() -> None:
        server = grpc.aio.server()
        triton_grpc.add_GRPCInferenceServiceServicer_to_server(TritonLike(), server)
        credentials = grpc.ssl_server_credentials([(tls.key.read_bytes(), tls.cert.read_bytes())])
        port = server.add_secure_port("127.0.0.1:0", credentials)
        await server.start()
        try:
            assert await live(port, triton_tls=True, triton_tls_ca=tls.ca)
            assert not await live(port)
            assert not await live(port, triton_tls=True, triton_tls_ca=tls.other_ca), "another CA's server"
        finally:
            await server.stop(0)

    asyncio.run(run())


# ----------------------------------------------------------------------------- settings, start-up


def test_tokens_are_checked_and_never_echoed() -> None:
    assert settings(auth_token="").auth_token is None, "an empty variable is no token"
    for bad in ("short", "has a space in it!!", "x" * 15):
        with pytest.raises(ValidationError) as err:
            settings(auth_token=bad)
        assert bad not in str(err.value)
    with pytest.raises(ValidationError, match="must differ") as err:
        settings(auth_token=CLIENT_TOKEN, admin_token=CLIENT_TOKEN)
    assert CLIENT_TOKEN not in str(err.value)
    assert CLIENT_TOKEN not in repr(settings(auth_token=CLIENT_TOKEN))


@pytest.mark.parametrize(
    ("host", "token", "warned"),
    [
        ("0.0.0.0", None, "LIPSYNC_AUTH_TOKEN is not set"),
        ("127.0.0.1", None, None),
        ("0.0.0.0", CLIENT_TOKEN, "TLS is off"),
    ],
)
def test_warning_when_served_beyond_loopback_without_protection(
    root: Path, caplog: pytest.LogCaptureFixture, host: str, token: str | None, warned: str | None
) -> None:
    async def body(server: GatewayServer, _: FakeTriton) -> None:
        return None

    with caplog.at_level(logging.WARNING, logger="gateway.auth"):
        serve_on_fake(root, fake(), body, host=host, auth_token=token)
    messages = [r.getMessage() for r in caplog.records if r.name == "gateway.auth"]
    if warned is None:
        assert messages == []
    else:
        assert len(messages) == 1 and warned in messages[0]
