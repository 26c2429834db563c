from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OptimizedInferenceRequest(_message.Message):
    __slots__ = ("model_name", "frame_id")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    frame_id: int
    def __init__(self, model_name: _Optional[str] = ..., frame_id: _Optional[int] = ...) -> None: ...

class OptimizedInferenceResponse(_message.Message):
    __slots__ = ("success", "prediction_data", "bounds", "processing_time_ms", "model_name", "frame_id", "prediction_shape", "error", "prepare_time_ms", "inference_time_ms", "composite_time_ms", "optimizations")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_DATA_FIELD_NUMBER: _ClassVar[int]
    BOUNDS_FIELD_NUMBER: _ClassVar[int]
    PROCESSING_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_SHAPE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PREPARE_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    COMPOSITE_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZATIONS_FIELD_NUMBER: _ClassVar[int]
    success: bool
    prediction_data: bytes
    bounds: _containers.RepeatedScalarFieldContainer[float]
    processing_time_ms: int
    model_name: str
    frame_id: int
    prediction_shape: str
    error: str
    prepare_time_ms: float
    inference_time_ms: float
    composite_time_ms: float
    optimizations: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, success: _Optional[bool] = ..., prediction_data: _Optional[bytes] = ..., bounds: _Optional[_Iterable[float]] = ..., processing_time_ms: _Optional[int] = ..., model_name: _Optional[str] = ..., frame_id: _Optional[int] = ..., prediction_shape: _Optional[str] = ..., error: _Optional[str] = ..., prepare_time_ms: _Optional[float] = ..., inference_time_ms: _Optional[float] = ..., composite_time_ms: _Optional[float] = ..., optimizations: _Optional[_Iterable[str]] = ...) -> None: ...

class BatchInferenceRequest(_message.Message):
    __slots__ = ("model_name", "frame_ids")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    FRAME_IDS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    frame_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model_name: _Optional[str] = ..., frame_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class BatchInferenceResponse(_message.Message):
    __slots__ = ("responses", "total_processing_time_ms", "avg_frame_time_ms")
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_PROCESSING_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    AVG_FRAME_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    responses: _containers.RepeatedCompositeFieldContainer[OptimizedInferenceResponse]
    total_processing_time_ms: int
    avg_frame_time_ms: float
    def __init__(self, responses: _Optional[_Iterable[_Union[OptimizedInferenceResponse, _Mapping]]] = ..., total_processing_time_ms: _Optional[int] = ..., avg_frame_time_ms: _Optional[float] = ...) -> None: ...

class BatchInferenceWithAudioRequest(_message.Message):
    __slots__ = ("model_name", "start_frame_id", "frame_count", "audio_chunks")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    START_FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    FRAME_COUNT_FIELD_NUMBER: _ClassVar[int]
    AUDIO_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    start_frame_id: int
    frame_count: int
    audio_chunks: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, model_name: _Optional[str] = ..., start_frame_id: _Optional[int] = ..., frame_count: _Optional[int] = ..., audio_chunks: _Optional[_Iterable[bytes]] = ...) -> None: ...

class LoadPackageRequest(_message.Message):
    __slots__ = ("package_name", "package_dir")
    PACKAGE_NAME_FIELD_NUMBER: _ClassVar[int]
    PACKAGE_DIR_FIELD_NUMBER: _ClassVar[int]
    package_name: str
    package_dir: str
    def __init__(self, package_name: _Optional[str] = ..., package_dir: _Optional[str] = ...) -> None: ...

class LoadPackageResponse(_message.Message):
    __slots__ = ("success", "package_name", "message", "initialization_time_ms", "frame_count", "device", "videos_loaded", "audio_features_shape", "memory_mapped_audio", "error")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    PACKAGE_NAME_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    INITIALIZATION_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    FRAME_COUNT_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    VIDEOS_LOADED_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FEATURES_SHAPE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MAPPED_AUDIO_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    success: bool
    package_name: str
    message: str
    initialization_time_ms: int
    frame_count: int
    device: str
    videos_loaded: _containers.RepeatedScalarFieldContainer[str]
    audio_features_shape: _containers.RepeatedScalarFieldContainer[int]
    memory_mapped_audio: bool
    error: str
    def __init__(self, success: _Optional[bool] = ..., package_name: _Optional[str] = ..., message: _Optional[str] = ..., initialization_time_ms: _Optional[int] = ..., frame_count: _Optional[int] = ..., device: _Optional[str] = ..., videos_loaded: _Optional[_Iterable[str]] = ..., audio_features_shape: _Optional[_Iterable[int]] = ..., memory_mapped_audio: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ("model_name",)
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    def __init__(self, model_name: _Optional[str] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("model_name", "total_requests", "avg_inference_time_ms", "min_inference_time_ms", "max_inference_time_ms", "frame_count", "device", "optimizations_active")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    TOTAL_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    AVG_INFERENCE_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    MIN_INFERENCE_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_INFERENCE_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    FRAME_COUNT_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZATIONS_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    total_requests: int
    avg_inference_time_ms: float
    min_inference_time_ms: float
    max_inference_time_ms: float
    frame_count: int
    device: str
    optimizations_active: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model_name: _Optional[str] = ..., total_requests: _Optional[int] = ..., avg_inference_time_ms: _Optional[float] = ..., min_inference_time_ms: _Optional[float] = ..., max_inference_time_ms: _Optional[float] = ..., frame_count: _Optional[int] = ..., device: _Optional[str] = ..., optimizations_active: _Optional[_Iterable[str]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("loaded_models", "count")
    LOADED_MODELS_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    loaded_models: _containers.RepeatedScalarFieldContainer[str]
    count: int
    def __init__(self, loaded_models: _Optional[_Iterable[str]] = ..., count: _Optional[int] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("healthy", "status", "loaded_models", "uptime_seconds")
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    LOADED_MODELS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    healthy: bool
    status: str
    loaded_models: int
    uptime_seconds: int
    def __init__(self, healthy: _Optional[bool] = ..., status: _Optional[str] = ..., loaded_models: _Optional[int] = ..., uptime_seconds: _Optional[int] = ...) -> None: ...

class GetVideoFrameRequest(_message.Message):
    __slots__ = ("model_name", "frame_id", "video_type")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    VIDEO_TYPE_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    frame_id: int
    video_type: str
    def __init__(self, model_name: _Optional[str] = ..., frame_id: _Optional[int] = ..., video_type: _Optional[str] = ...) -> None: ...

class GetVideoFrameResponse(_message.Message):
    __slots__ = ("success", "frame_data", "frame_id", "video_type", "error")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    FRAME_DATA_FIELD_NUMBER: _ClassVar[int]
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    VIDEO_TYPE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    success: bool
    frame_data: bytes
    frame_id: int
    video_type: str
    error: str
    def __init__(self, success: _Optional[bool] = ..., frame_data: _Optional[bytes] = ..., frame_id: _Optional[int] = ..., video_type: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class GetModelMetadataRequest(_message.Message):
    __slots__ = ("model_name",)
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    def __init__(self, model_name: _Optional[str] = ...) -> None: ...

class GetModelMetadataResponse(_message.Message):
    __slots__ = ("success", "model_name", "frame_count", "available_videos", "audio_path", "bounds", "error")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    FRAME_COUNT_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_VIDEOS_FIELD_NUMBER: _ClassVar[int]
    AUDIO_PATH_FIELD_NUMBER: _ClassVar[int]
    BOUNDS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    success: bool
    model_name: str
    frame_count: int
    available_videos: _containers.RepeatedScalarFieldContainer[str]
    audio_path: str
    bounds: _containers.RepeatedScalarFieldContainer[float]
    error: str
    def __init__(self, success: _Optional[bool] = ..., model_name: _Optional[str] = ..., frame_count: _Optional[int] = ..., available_videos: _Optional[_Iterable[str]] = ..., audio_path: _Optional[str] = ..., bounds: _Optional[_Iterable[float]] = ..., error: _Optional[str] = ...) -> None: ...
