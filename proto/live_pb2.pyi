from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LiveRequest(_message.Message):
    __slots__ = ("start", "pcm", "control")
    START_FIELD_NUMBER: _ClassVar[int]
    PCM_FIELD_NUMBER: _ClassVar[int]
    CONTROL_FIELD_NUMBER: _ClassVar[int]
    start: LiveStart
    pcm: bytes
    control: LiveControl
    def __init__(self, start: _Optional[_Union[LiveStart, _Mapping]] = ..., pcm: _Optional[bytes] = ..., control: _Optional[_Union[LiveControl, _Mapping]] = ...) -> None: ...

class LiveStart(_message.Message):
    __slots__ = ("avatar", "sample_rate_hz")
    AVATAR_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    avatar: str
    sample_rate_hz: int
    def __init__(self, avatar: _Optional[str] = ..., sample_rate_hz: _Optional[int] = ...) -> None: ...

class LiveControl(_message.Message):
    __slots__ = ("command",)
    class Command(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        COMMAND_UNSPECIFIED: _ClassVar[LiveControl.Command]
        FLUSH: _ClassVar[LiveControl.Command]
        INTERRUPT: _ClassVar[LiveControl.Command]
    COMMAND_UNSPECIFIED: LiveControl.Command
    FLUSH: LiveControl.Command
    INTERRUPT: LiveControl.Command
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    command: LiveControl.Command
    def __init__(self, command: _Optional[_Union[LiveControl.Command, str]] = ...) -> None: ...

class LiveFrame(_message.Message):
    __slots__ = ("seq", "pts_s", "jpeg", "bounds", "speaking", "video_frame", "error", "late")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    PTS_S_FIELD_NUMBER: _ClassVar[int]
    JPEG_FIELD_NUMBER: _ClassVar[int]
    BOUNDS_FIELD_NUMBER: _ClassVar[int]
    SPEAKING_FIELD_NUMBER: _ClassVar[int]
    VIDEO_FRAME_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    LATE_FIELD_NUMBER: _ClassVar[int]
    seq: int
    pts_s: float
    jpeg: bytes
    bounds: _containers.RepeatedScalarFieldContainer[float]
    speaking: bool
    video_frame: int
    error: str
    late: bool
    def __init__(self, seq: _Optional[int] = ..., pts_s: _Optional[float] = ..., jpeg: _Optional[bytes] = ..., bounds: _Optional[_Iterable[float]] = ..., speaking: _Optional[bool] = ..., video_frame: _Optional[int] = ..., error: _Optional[str] = ..., late: _Optional[bool] = ...) -> None: ...
