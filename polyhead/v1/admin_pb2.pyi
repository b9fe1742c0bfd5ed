from polyhead.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LoadHeadRequest(_message.Message):
    __slots__ = ("task_id", "version", "onnx", "repository_path", "head_json", "activate", "encoder_onnx", "canary_percent")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ONNX_FIELD_NUMBER: _ClassVar[int]
    REPOSITORY_PATH_FIELD_NUMBER: _ClassVar[int]
    HEAD_JSON_FIELD_NUMBER: _ClassVar[int]
    ACTIVATE_FIELD_NUMBER: _ClassVar[int]
    ENCODER_ONNX_FIELD_NUMBER: _ClassVar[int]
    CANARY_PERCENT_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    version: int
    onnx: bytes
    repository_path: str
    head_json: str
    activate: bool
    encoder_onnx: bytes
    canary_percent: float
    def __init__(self, task_id: _Optional[str] = ..., version: _Optional[int] = ..., onnx: _Optional[bytes] = ..., repository_path: _Optional[str] = ..., head_json: _Optional[str] = ..., activate: _Optional[bool] = ..., encoder_onnx: _Optional[bytes] = ..., canary_percent: _Optional[float] = ...) -> None: ...

class HeadInfo(_message.Message):
    __slots__ = ("task_id", "version", "active", "head_sha256", "trunk_sha256", "loaded_at", "eval_return", "source", "spec", "canary", "canary_percent")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    HEAD_SHA256_FIELD_NUMBER: _ClassVar[int]
    TRUNK_SHA256_FIELD_NUMBER: _ClassVar[int]
    LOADED_AT_FIELD_NUMBER: _ClassVar[int]
    EVAL_RETURN_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    CANARY_FIELD_NUMBER: _ClassVar[int]
    CANARY_PERCENT_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    version: int
    active: bool
    head_sha256: str
    trunk_sha256: str
    loaded_at: float
    eval_return: float
    source: str
    spec: _types_pb2.TaskSpec
    canary: bool
    canary_percent: float
    def __init__(self, task_id: _Optional[str] = ..., version: _Optional[int] = ..., active: _Optional[bool] = ..., head_sha256: _Optional[str] = ..., trunk_sha256: _Optional[str] = ..., loaded_at: _Optional[float] = ..., eval_return: _Optional[float] = ..., source: _Optional[str] = ..., spec: _Optional[_Union[_types_pb2.TaskSpec, _Mapping]] = ..., canary: _Optional[bool] = ..., canary_percent: _Optional[float] = ...) -> None: ...

class SetCanaryRequest(_message.Message):
    __slots__ = ("task_id", "version", "canary_percent")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CANARY_PERCENT_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    version: int
    canary_percent: float
    def __init__(self, task_id: _Optional[str] = ..., version: _Optional[int] = ..., canary_percent: _Optional[float] = ...) -> None: ...

class PromoteCanaryRequest(_message.Message):
    __slots__ = ("task_id", "version")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    version: int
    def __init__(self, task_id: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ClearCanaryRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class CanaryState(_message.Message):
    __slots__ = ("task_id", "stable_version", "canary_version", "canary_percent", "cleared_version")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    STABLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CANARY_VERSION_FIELD_NUMBER: _ClassVar[int]
    CANARY_PERCENT_FIELD_NUMBER: _ClassVar[int]
    CLEARED_VERSION_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    stable_version: int
    canary_version: int
    canary_percent: float
    cleared_version: int
    def __init__(self, task_id: _Optional[str] = ..., stable_version: _Optional[int] = ..., canary_version: _Optional[int] = ..., canary_percent: _Optional[float] = ..., cleared_version: _Optional[int] = ...) -> None: ...

class LoadHeadResponse(_message.Message):
    __slots__ = ("head", "active_version", "load_seconds")
    HEAD_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    head: HeadInfo
    active_version: int
    load_seconds: float
    def __init__(self, head: _Optional[_Union[HeadInfo, _Mapping]] = ..., active_version: _Optional[int] = ..., load_seconds: _Optional[float] = ...) -> None: ...

class SetActiveVersionRequest(_message.Message):
    __slots__ = ("task_id", "version")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    version: int
    def __init__(self, task_id: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class SetActiveVersionResponse(_message.Message):
    __slots__ = ("previous_version", "active_version", "swap_seconds")
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    SWAP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    previous_version: int
    active_version: int
    swap_seconds: float
    def __init__(self, previous_version: _Optional[int] = ..., active_version: _Optional[int] = ..., swap_seconds: _Optional[float] = ...) -> None: ...

class UnloadHeadRequest(_message.Message):
    __slots__ = ("task_id", "version", "all_versions")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ALL_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    version: int
    all_versions: bool
    def __init__(self, task_id: _Optional[str] = ..., version: _Optional[int] = ..., all_versions: _Optional[bool] = ...) -> None: ...

class UnloadHeadResponse(_message.Message):
    __slots__ = ("unloaded_versions",)
    UNLOADED_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    unloaded_versions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, unloaded_versions: _Optional[_Iterable[int]] = ...) -> None: ...

class ListHeadsRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class ListHeadsResponse(_message.Message):
    __slots__ = ("heads",)
    HEADS_FIELD_NUMBER: _ClassVar[int]
    heads: _containers.RepeatedCompositeFieldContainer[HeadInfo]
    def __init__(self, heads: _Optional[_Iterable[_Union[HeadInfo, _Mapping]]] = ...) -> None: ...

class StreamExperienceRequest(_message.Message):
    __slots__ = ("task_ids",)
    TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    task_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, task_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class EpisodeSegment(_message.Message):
    __slots__ = ("task_id", "episode_id", "observations", "actions", "log_probs", "rewards", "head_versions", "terminated", "truncated", "start_step", "episode_return", "episode_length", "next_observation", "deterministic", "episode_ordinal")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    EPISODE_ID_FIELD_NUMBER: _ClassVar[int]
    OBSERVATIONS_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    LOG_PROBS_FIELD_NUMBER: _ClassVar[int]
    REWARDS_FIELD_NUMBER: _ClassVar[int]
    HEAD_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    TERMINATED_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    START_STEP_FIELD_NUMBER: _ClassVar[int]
    EPISODE_RETURN_FIELD_NUMBER: _ClassVar[int]
    EPISODE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    NEXT_OBSERVATION_FIELD_NUMBER: _ClassVar[int]
    DETERMINISTIC_FIELD_NUMBER: _ClassVar[int]
    EPISODE_ORDINAL_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    episode_id: str
    observations: _types_pb2.Tensor
    actions: _types_pb2.Tensor
    log_probs: _types_pb2.Tensor
    rewards: _types_pb2.Tensor
    head_versions: _containers.RepeatedScalarFieldContainer[int]
    terminated: bool
    truncated: bool
    start_step: int
    episode_return: float
    episode_length: int
    next_observation: _types_pb2.Tensor
    deterministic: _containers.RepeatedScalarFieldContainer[bool]
    episode_ordinal: int
    def __init__(self, task_id: _Optional[str] = ..., episode_id: _Optional[str] = ..., observations: _Optional[_Union[_types_pb2.Tensor, _Mapping]] = ..., actions: _Optional[_Union[_types_pb2.Tensor, _Mapping]] = ..., log_probs: _Optional[_Union[_types_pb2.Tensor, _Mapping]] = ..., rewards: _Optional[_Union[_types_pb2.Tensor, _Mapping]] = ..., head_versions: _Optional[_Iterable[int]] = ..., terminated: _Optional[bool] = ..., truncated: _Optional[bool] = ..., start_step: _Optional[int] = ..., episode_return: _Optional[float] = ..., episode_length: _Optional[int] = ..., next_observation: _Optional[_Union[_types_pb2.Tensor, _Mapping]] = ..., deterministic: _Optional[_Iterable[bool]] = ..., episode_ordinal: _Optional[int] = ...) -> None: ...
