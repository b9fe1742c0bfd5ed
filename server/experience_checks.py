"""What experience must satisfy before it joins anything: the server's first line of defence.

Every check raises :class:`polyhead.errors.InvalidExperience` (INVALID_ARGUMENT through the status table)
naming the field, the value and what was expected; its ``reason`` is the
``polyhead_experience_dropped_total`` label the data plane counts it under. Nothing here touches state.

* reward: finite and ``|reward| <= max_abs_reward`` (a server setting): one 1e30 reward would dominate
  the updater's return statistics for good;
* step index: non-negative;
* full transitions: the observation of the task's shape and finite, the raw action inside the task's
  action space (Discrete: an integer index in ``[0, n)``; Box: the pre-squash vector of the space's shape,
  finite), the log-prob finite (and ``<= 0`` for Discrete, where it is the log of a probability), and the
  head version one the server has served for the task;
* a truncation's final observation: the task's shape, finite.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

import numpy as np
import numpy.typing as npt

from polyhead.errors import InvalidExperience, InvalidObservation
from polyhead.spaces import DiscreteSpec, SpaceSpec, validate_observations

#: Slack for a Discrete log-prob computed in float32 (log_softmax of the argmax can round to +1e-7).
LOG_PROB_TOLERANCE = 1e-5


def check_reward(reward: float, *, max_abs_reward: float, field: str = "reward") -> float:
    value = float(reward)
    if not math.isfinite(value):
        raise InvalidExperience(f"{field} is {value}; expected a finite number", reason="invalid_reward")
    if abs(value) > max_abs_reward:
        raise InvalidExperience(
            f"{field} is {value:g}; expected |{field}| <= {max_abs_reward:g} (server setting max_abs_reward)",
            reason="invalid_reward",
        )
    return value


def check_step(step: int, *, field: str = "step") -> int:
    if step < 0:
        raise InvalidExperience(
            f"{field} is {step}; expected a step index >= 0 (0 is an episode's first action)",
            reason="invalid_step",
        )
    return int(step)


def check_observation(
    obs: npt.NDArray[Any], space: SpaceSpec, *, field: str = "observation"
) -> npt.NDArray[np.float32]:
    """One observation of ``space``'s shape, finite; returned as float32 of that shape."""
    shape: tuple[int, ...] = () if isinstance(space, DiscreteSpec) else space.shape
    try:
        flat, batched = validate_observations(obs, space, max_batch=1)
    except InvalidObservation as exc:
        raise InvalidExperience(f"{field}: {exc}", reason="invalid_observation") from None
    if batched:
        raise InvalidExperience(
            f"{field} has shape {list(obs.shape)}; expected one observation of shape {list(shape)}",
            reason="invalid_observation",
        )
    out: npt.NDArray[np.float32] = flat[0].reshape(shape)
    return out


def check_action(action: npt.NDArray[Any], space: SpaceSpec, *, field: str = "action") -> npt.NDArray[Any]:
    """The raw policy action of a transition: Discrete index in ``[0, n)`` (int64 scalar) or the Box
    pre-squash vector of the space's shape (float32, finite)."""
    arr = np.asarray(action)
    if isinstance(space, DiscreteSpec):
        if arr.size != 1 or arr.dtype.kind not in "iu":
            raise InvalidExperience(
                f"{field} is {arr.dtype} of shape {list(arr.shape)}; expected one integer action index "
                f"in [0, {space.n})",
                reason="invalid_action",
            )
        index = int(arr.reshape(-1)[0])
        if not 0 <= index < space.n:
            raise InvalidExperience(
                f"{field} is {index}; expected an action index in [0, {space.n}) (the raw index: env "
                f"action minus the space's start {space.start})",
                reason="invalid_action",
            )
        return np.asarray(index, dtype=np.int64)
    shape = tuple(space.shape)
    if arr.dtype.kind not in "fiu" or tuple(arr.shape) != shape:
        raise InvalidExperience(
            f"{field} is {arr.dtype} of shape {list(arr.shape)}; expected a float vector of shape "
            f"{list(shape)}",
            reason="invalid_action",
        )
    out = arr.astype(np.float32)
    if not np.isfinite(out).all():
        raise InvalidExperience(
            f"{field} contains NaN or inf; expected finite values", reason="invalid_action"
        )
    return out


def check_log_prob(log_prob: float, space: SpaceSpec, *, field: str = "log_prob") -> float:
    value = float(log_prob)
    if not math.isfinite(value):
        raise InvalidExperience(
            f"{field} is {value}; expected a finite log-probability", reason="invalid_log_prob"
        )
    if isinstance(space, DiscreteSpec) and value > LOG_PROB_TOLERANCE:
        raise InvalidExperience(
            f"{field} is {value:g}; expected <= 0 (the log of a probability of a Discrete action)",
            reason="invalid_log_prob",
        )
    return value


def check_version(version: int, served: Collection[int], task_id: str, *, field: str = "head_version") -> int:
    if version not in served:
        raise InvalidExperience(
            f"{field} is {version}; expected a version task {task_id!r} has served here: {sorted(served)}",
            reason="unknown_version",
        )
    return int(version)
