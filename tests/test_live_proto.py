"""The live-session gRPC contract (issue 10): package, service, messages and field numbers.

Clients are written against these names and numbers; a change here breaks them. The seed
service's stubs must keep importing beside the live ones (one process serves both).
"""
from __future__ import annotations

from google.protobuf import descriptor_pool
from google.protobuf.message import Message

from proto import lipsync_pb2, lipsync_pb2_grpc, live_pb2, live_pb2_grpc


def fields(message: type[Message]) -> dict[str, int]:
    return {f.name: f.number for f in message.DESCRIPTOR.fields}


def test_live_and_seed_stubs_import_side_by_side() -> None:
    pool = descriptor_pool.Default()
    assert pool.FindServiceByName("lipsync.live.v1.LiveLipSync").methods_by_name["Stream"]
    assert pool.FindServiceByName("optimized_lipsyncsrv.OptimizedLipSyncService")
    assert live_pb2.DESCRIPTOR.package == "lipsync.live.v1"
    assert lipsync_pb2.DESCRIPTOR.package == "optimized_lipsyncsrv"
    assert hasattr(live_pb2_grpc, "LiveLipSyncStub") and hasattr(
        live_pb2_grpc, "add_LiveLipSyncServicer_to_server"
    )
    assert hasattr(lipsync_pb2_grpc, "OptimizedLipSyncServiceStub")


def test_stream_is_bidirectional() -> None:
    method = live_pb2.DESCRIPTOR.services_by_name["LiveLipSync"].methods_by_name["Stream"]
    assert method.client_streaming and method.server_streaming
    assert method.input_type.full_name == "lipsync.live.v1.LiveRequest"
    assert method.output_type.full_name == "lipsync.live.v1.LiveFrame"


def test_live_field_numbers() -> None:
    assert fields(live_pb2.LiveRequest) == {"start": 1, "pcm": 2, "control": 3}
    assert [f.name for f in live_pb2.LiveRequest.DESCRIPTOR.oneofs_by_name["kind"].fields] == [
        "start",
        "pcm",
        "control",
    ]
    assert fields(live_pb2.LiveStart) == {"avatar": 1, "sample_rate_hz": 2}
    assert fields(live_pb2.LiveControl) == {"command": 1}
    assert dict(live_pb2.LiveControl.Command.items()) == {
        "COMMAND_UNSPECIFIED": 0,
        "FLUSH": 1,
        "INTERRUPT": 2,
    }
    frame = fields(live_pb2.LiveFrame)
    assert {k: v for k, v in frame.items() if v <= 7} == {
        "seq": 1, "pts_s": 2, "jpeg": 3, "bounds": 4, "speaking": 5, "video_frame": 6, "error": 7,
    }
    assert frame["late"] == 8  # addition after the fields


def test_live_frame_round_trips() -> None:
    frame = live_pb2.LiveFrame(seq=2**40, pts_s=2**40 * 0.04, jpeg=b"\xff\xd8", bounds=[1.5, 2, 3, 4],
                               speaking=True, video_frame=7, error="bad_request: x", late=False)
    back = live_pb2.LiveFrame.FromString(frame.SerializeToString())
    assert back == frame and back.seq == 2**40 and list(back.bounds) == [1.5, 2.0, 3.0, 4.0]
    req = live_pb2.LiveRequest(start=live_pb2.LiveStart(avatar="demo", sample_rate_hz=48000))
    assert live_pb2.LiveRequest.FromString(req.SerializeToString()).WhichOneof("kind") == "start"
