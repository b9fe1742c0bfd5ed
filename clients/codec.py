"""numpy <-> request/response messages for the data plane, shared by the sync and asyncio clients.

Observations go out as they are given (cast to float32 when they are floats); the server validates them
and answers INVALID_ARGUMENT with a message naming what was wrong, so validation lives in one place.
Actions come back post-processed by the server and are decoded here into the task's action space:
Discrete -> int64 (a 0-d array for one observation, ``[B]`` for a batch), Box -> the space's dtype,
``[*shape]`` or ``[B, *shape]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from polyhead.clients.catalog import RemoteTask
from polyhead.clients.errors import ProtocolError
from polyhead.errors import InvalidArgument
from polyhead.spaces import BoxSpec, DiscreteSpec
from polyhead.tensors import from_proto, is_empty, to_proto
from polyhead.v1 import policy_pb2


@dataclass(frozen=True)
class ActResult:
    """One ``Act`` answer, decoded. Optional fields are None unless requested."""

    task_id: str
    head_version: int
    actions: npt.NDArray[Any]
    log_probs: npt.NDArray[np.float32] | None = None
    values: npt.NDArray[np.float32] | None = None
    raw_actions: npt.NDArray[np.float32] | None = None


@dataclass(frozen=True)
class StepResult:
    """One ``ActStream`` answer, decoded. ``action`` is None for a final report (no observation)."""

    episode_id: str
    step: int
    head_version: int
    action: npt.NDArray[Any] | None
    log_prob: float | None = None
    value: float | None = None


def encode_observations(observations: npt.ArrayLike) -> Any:
    arr = np.asarray(observations)
    # to_proto keeps float64 exact; observations travel as float32, the trunk's input dtype (halves bytes).
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    return to_proto(arr)


def act_request(
    task_id: str,
    observations: npt.ArrayLike,
    *,
    deterministic: bool = False,
    seed: int | None = None,
    version: int = 0,
    return_log_prob: bool = False,
    return_value: bool = False,
    episode_ids: Sequence[str] | None = None,
    steps: Sequence[int] | None = None,
) -> policy_pb2.ActRequest:
    """One ``Act`` request. With ``episode_ids`` the server records the actions for the experience feed;
    ``steps`` (each observation's step index within its episode) makes a retried call record nothing twice.
    """
    req = policy_pb2.ActRequest(
        task_id=task_id,
        observations=encode_observations(observations),
        deterministic=deterministic,
        return_log_prob=return_log_prob,
        return_value=return_value,
        version=version,
        episode_ids=list(episode_ids or ()),
        steps=list(steps or ()),
    )
    if seed is not None:
        req.seed = seed
    return req


def _decode(tensor: Any, field: str) -> npt.NDArray[Any]:
    try:
        return np.asarray(from_proto(tensor, field=field))
    except InvalidArgument as exc:
        raise ProtocolError(f"server sent a malformed {field}: {exc}") from exc


def decode_actions(tensor: Any, task: RemoteTask | None, *, field: str = "actions") -> npt.NDArray[Any]:
    """Actions in the task's action space; checks them against it (a mismatch is a ProtocolError)."""
    actions = _decode(tensor, field)
    if task is None:
        return actions
    space = task.action_space
    if isinstance(space, DiscreteSpec):
        if actions.dtype.kind not in "iu":
            raise ProtocolError(f"{field}: Discrete task {task.task_id} got {actions.dtype} actions")
        return actions.astype(np.int64, copy=False)
    assert isinstance(space, BoxSpec)
    shape = tuple(space.shape)
    if tuple(actions.shape[-len(shape) :] if shape else ()) != shape:
        raise ProtocolError(
            f"{field}: task {task.task_id} expects actions of shape {list(shape)}, got {list(actions.shape)}"
        )
    return actions.astype(np.dtype(space.dtype), copy=False)


def _optional(tensor: Any, field: str) -> npt.NDArray[np.float32] | None:
    if is_empty(tensor):
        return None
    return _decode(tensor, field).astype(np.float32, copy=False)


def act_result(resp: policy_pb2.ActResponse, task: RemoteTask | None) -> ActResult:
    return ActResult(
        task_id=resp.task_id,
        head_version=resp.head_version,
        actions=decode_actions(resp.actions, task),
        log_probs=_optional(resp.log_probs, "log_probs"),
        values=_optional(resp.values, "values"),
        raw_actions=_optional(resp.raw_actions, "raw_actions"),
    )


def step_request(
    task_id: str,
    episode_id: str,
    observation: npt.ArrayLike | None,
    *,
    reward: float | None = None,
    terminated: bool = False,
    truncated: bool = False,
    deterministic: bool = False,
    seed: int | None = None,
    return_log_prob: bool = False,
    return_value: bool = False,
    feedback_step: int | None = None,
    final_observation: npt.ArrayLike | None = None,
) -> policy_pb2.StepRequest:
    """One ``ActStream`` message. ``feedback_step`` names the action the reward answers;
    ``final_observation`` (on truncation) lets the updater bootstrap from the state the episode was cut in.
    """
    req = policy_pb2.StepRequest(
        task_id=task_id,
        episode_id=episode_id,
        deterministic=deterministic,
        return_log_prob=return_log_prob,
        return_value=return_value,
    )
    if observation is not None:
        req.observation.CopyFrom(encode_observations(observation))
    if reward is not None or terminated or truncated:
        req.feedback.reward = 0.0 if reward is None else float(reward)
        req.feedback.terminated = terminated
        req.feedback.truncated = truncated
        if feedback_step is not None:
            req.feedback.step = feedback_step
        if final_observation is not None:
            req.feedback.final_observation.CopyFrom(encode_observations(final_observation))
    if seed is not None:
        req.seed = seed
    return req


def step_result(resp: policy_pb2.StepResponse, task: RemoteTask | None) -> StepResult:
    action = None if is_empty(resp.action) else decode_actions(resp.action, task, field="action")
    log_prob = _optional(resp.log_prob, "log_prob")
    value = _optional(resp.value, "value")
    return StepResult(
        episode_id=resp.episode_id,
        step=resp.step,
        head_version=resp.head_version,
        action=action,
        log_prob=None if log_prob is None else float(log_prob.reshape(-1)[0]),
        value=None if value is None else float(value.reshape(-1)[0]),
    )
