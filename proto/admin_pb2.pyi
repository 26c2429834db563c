from . import lipsync_pb2 as _lipsync_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class AdminLoadPackageRequest(_message.Message):
    __slots__ = ("package_name", "package_dir", "replace")
    PACKAGE_NAME_FIELD_NUMBER: _ClassVar[int]
    PACKAGE_DIR_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    package_name: str
    package_dir: str
    replace: bool
    def __init__(self, package_name: _Optional[str] = ..., package_dir: _Optional[str] = ..., replace: _Optional[bool] = ...) -> None: ...

class UnloadPackageRequest(_message.Message):
    __slots__ = ("package_name",)
    PACKAGE_NAME_FIELD_NUMBER: _ClassVar[int]
    package_name: str
    def __init__(self, package_name: _Optional[str] = ...) -> None: ...

class UnloadPackageResponse(_message.Message):
    __slots__ = ("success", "package_name", "message", "error")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    PACKAGE_NAME_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    success: bool
    package_name: str
    message: str
    error: str
    def __init__(self, success: _Optional[bool] = ..., package_name: _Optional[str] = ..., message: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...
