from polyhead.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ActRequest(_message.Message):
    __slots__ = ("task_id", "observations", "deterministic", "seed", "return_log_prob", "return_value", "version", "episode_ids", "steps")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    OBSERVATIONS_FIELD_NUMBER: _ClassVar[int]
    DETERMINISTIC_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    RETURN_LOG_PROB_FIELD_NUMBER: _ClassVar[int]
    RETURN_VALUE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EPISODE_IDS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    observations: _types_pb2.Tensor
    deterministic: bool
    seed: int
    return_log_prob: bool
    return_value: bool
    version: int
    episode_ids: _containers.RepeatedScalarFieldContainer[str]
    steps: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, task_id: _Optional[str] = ..., observations: _Optional[_Union[_types_pb2.Tensor, _Mapping]] = ..., deterministic: _Optional[bool] = ..., seed: _Optional[int] = ..., return_log_prob: _Optional[bool] = ..., return_value: _Optional[bool] = ..., version: _Optional[int] = ..., episode_ids: _Optional[_Iterable[str]] = ..., steps: _Optional[_Iterable[int]] = ...) -> None: ...

class ActResponse(_message.Message):
    __slots__ = ("task_id", "head_version", "actions", "log_probs", "values", "raw_actions", "head_versions")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    HEAD_VERSION_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    LOG_PROBS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    RAW_ACTIONS_FIELD_NUMBER: _ClassVar[int]
    HEAD_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    head_version: int
    actions: _types_pb2.Tensor
    log_probs: _types_pb2.Tensor
    values: _types_pb2.Tensor
    raw_actions: _types_pb2.Tensor
    head_versions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, task_id: _Optional[str] = ..., head_version: _Optional[int] = ..., actions: _Optional[_Union[_types_pb2.Tensor, _Mapping]] = ..., log_probs: _Optional[_Union[_types_pb2.Tensor, _Mapping]] = ..., values: _Optional[_Union[_types_pb2.Tensor, _Mapping]] = ..., raw_actions: _Optional[_Union[_types_pb2.Tensor, _Mapping]] = ..., head_versions: _Optional[_Iterable[int]] = ...) -> None: ...

class Feedback(_message.Message):
    __slots__ = ("reward", "terminated", "truncated", "step", "final_observation")
    REWARD_FIELD_NUMBER: _ClassVar[int]
    TERMINATED_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    FINAL_OBSERVATION_FIELD_NUMBER: _ClassVar[int]
    reward: float
    terminated: bool
    truncated: bool
    step: int
    final_observation: _types_pb2.Tensor
    def __init__(self, reward: _Optional[float] = ..., terminated: _Optional[bool] = ..., truncated: _Optional[bool] = ..., step: _Optional[int] = ..., final_observation: _Optional[_Union[_types_pb2.Tensor, _Mapping]] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("task_id", "episode_id", "observation", "feedback", "deterministic", "seed", "return_log_prob", "return_value")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    EPISODE_ID_FIELD_NUMBER: _ClassVar[int]
    OBSERVATION_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    DETERMINISTIC_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    RETURN_LOG_PROB_FIELD_NUMBER: _ClassVar[int]
    RETURN_VALUE_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    episode_id: str
    observation: _types_pb2.Tensor
    feedback: Feedback
    deterministic: bool
    seed: int
    return_log_prob: bool
    return_value: bool
    def __init__(self, task_id: _Optional[str] = ..., episode_id: _Optional[str] = ..., observation: _Optional[_Union[_types_pb2.Tensor, _Mapping]] = ..., feedback: _Optional[_Union[Feedback, _Mapping]] = ..., deterministic: _Optional[bool] = ..., seed: _Optional[int] = ..., return_log_prob: _Optional[bool] = ..., return_value: _Optional[bool] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("task_id", "episode_id", "head_version", "action", "log_prob", "value", "step")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    EPISODE_ID_FIELD_NUMBER: _ClassVar[int]
    HEAD_VERSION_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    LOG_PROB_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    episode_id: str
    head_version: int
    action: _types_pb2.Tensor
    log_prob: _types_pb2.Tensor
    value: _types_pb2.Tensor
    step: int
    def __init__(self, task_id: _Optional[str] = ..., episode_id: _Optional[str] = ..., head_version: _Optional[int] = ..., action: _Optional[_Union[_types_pb2.Tensor, _Mapping]] = ..., log_prob: _Optional[_Union[_types_pb2.Tensor, _Mapping]] = ..., value: _Optional[_Union[_types_pb2.Tensor, _Mapping]] = ..., step: _Optional[int] = ...) -> None: ...

class ListTasksRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TaskInfo(_message.Message):
    __slots__ = ("task_id", "spec", "observation_space", "action_space", "active_version", "loaded_versions", "canary_version", "canary_percent", "regressed", "regression_detail", "reference_return")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    OBSERVATION_SPACE_FIELD_NUMBER: _ClassVar[int]
    ACTION_SPACE_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    LOADED_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    CANARY_VERSION_FIELD_NUMBER: _ClassVar[int]
    CANARY_PERCENT_FIELD_NUMBER: _ClassVar[int]
    REGRESSED_FIELD_NUMBER: _ClassVar[int]
    REGRESSION_DETAIL_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_RETURN_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    spec: _types_pb2.TaskSpec
    observation_space: _types_pb2.Space
    action_space: _types_pb2.Space
    active_version: int
    loaded_versions: _containers.RepeatedScalarFieldContainer[int]
    canary_version: int
    canary_percent: float
    regressed: bool
    regression_detail: str
    reference_return: float
    def __init__(self, task_id: _Optional[str] = ..., spec: _Optional[_Union[_types_pb2.TaskSpec, _Mapping]] = ..., observation_space: _Optional[_Union[_types_pb2.Space, _Mapping]] = ..., action_space: _Optional[_Union[_types_pb2.Space, _Mapping]] = ..., active_version: _Optional[int] = ..., loaded_versions: _Optional[_Iterable[int]] = ..., canary_version: _Optional[int] = ..., canary_percent: _Optional[float] = ..., regressed: _Optional[bool] = ..., regression_detail: _Optional[str] = ..., reference_return: _Optional[float] = ...) -> None: ...

class ListTasksResponse(_message.Message):
    __slots__ = ("tasks", "trunk_sha256", "observation_size", "max_batch_size")
    TASKS_FIELD_NUMBER: _ClassVar[int]
    TRUNK_SHA256_FIELD_NUMBER: _ClassVar[int]
    OBSERVATION_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[TaskInfo]
    trunk_sha256: str
    observation_size: int
    max_batch_size: int
    def __init__(self, tasks: _Optional[_Iterable[_Union[TaskInfo, _Mapping]]] = ..., trunk_sha256: _Optional[str] = ..., observation_size: _Optional[int] = ..., max_batch_size: _Optional[int] = ...) -> None: ...

class ExperienceReport(_message.Message):
    __slots__ = ("task_id", "episode_id", "reward", "terminated", "truncated", "observation", "action", "log_prob", "head_version", "step", "final_observation", "deterministic")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    EPISODE_ID_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    TERMINATED_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    OBSERVATION_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    LOG_PROB_FIELD_NUMBER: _ClassVar[int]
    HEAD_VERSION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    FINAL_OBSERVATION_FIELD_NUMBER: _ClassVar[int]
    DETERMINISTIC_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    episode_id: str
    reward: float
    terminated: bool
    truncated: bool
    observation: _types_pb2.Tensor
    action: _types_pb2.Tensor
    log_prob: float
    head_version: int
    step: int
    final_observation: _types_pb2.Tensor
    deterministic: bool
    def __init__(self, task_id: _Optional[str] = ..., episode_id: _Optional[str] = ..., reward: _Optional[float] = ..., terminated: _Optional[bool] = ..., truncated: _Optional[bool] = ..., observation: _Optional[_Union[_types_pb2.Tensor, _Mapping]] = ..., action: _Optional[_Union[_types_pb2.Tensor, _Mapping]] = ..., log_prob: _Optional[float] = ..., head_version: _Optional[int] = ..., step: _Optional[int] = ..., final_observation: _Optional[_Union[_types_pb2.Tensor, _Mapping]] = ..., deterministic: _Optional[bool] = ...) -> None: ...

class ReportExperienceResponse(_message.Message):
    __slots__ = ("accepted", "dropped", "episodes_completed")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    EPISODES_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    dropped: int
    episodes_completed: int
    def __init__(self, accepted: _Optional[int] = ..., dropped: _Optional[int] = ..., episodes_completed: _Optional[int] = ...) -> None: ...

class EchoRequest(_message.Message):
    __slots__ = ("payload",)
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    def __init__(self, payload: _Optional[bytes] = ...) -> None: ...

class EchoResponse(_message.Message):
    __slots__ = ("payload",)
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    def __init__(self, payload: _Optional[bytes] = ...) -> None: ...
