"""One task's vectorised environments, stepped in the trainer's rollout and evaluation.

gymnasium's vector envs step all their sub-environments at once; gap task sampling steps a different
number of a task's environments in each rollout, so this small vector steps any subset of them. The
semantics are gymnasium's ``AutoresetMode.SAME_STEP``: when an episode ends, the returned observation is
already the next episode's first one and the final observation is reported separately (to bootstrap the
value of a truncated episode). Observations come back flattened and zero-padded to the trunk's input size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from polyhead.envs import make_env, task_spaces
from polyhead.errors import InvalidObservation
from polyhead.spaces import SpaceSpec, pad_observations, raw_to_env_action, space_from_gymnasium
from polyhead.spaces import observation_size as space_size
from polyhead.taskspec import TaskSpec


@dataclass
class StepResult:
    """What stepping envs ``indices`` returned (arrays follow the order of ``indices``)."""

    next_obs: npt.NDArray[np.float32]  # [k, D]: next observation (a reset one where an episode ended)
    rewards: npt.NDArray[np.float64]  # [k]
    terminated: npt.NDArray[np.bool_]  # [k]
    truncated: npt.NDArray[np.bool_]  # [k]
    final_obs: npt.NDArray[np.float32]  # [k, D]: the last observation of an ended episode (else next_obs)
    episode_returns: list[float]  # undiscounted returns of the episodes that ended in this step
    episode_lengths: list[int]


class TaskEnvs:
    """``count`` environments of one task, env ``i`` seeded ``seed + i``; actions are raw policy outputs.

    Sharded (under torchrun): only the envs of global indices ``rank, rank + world_size, ... < count``
    are built here (``indices``); every method takes local positions ``0 .. len(self) - 1``.
    """

    def __init__(
        self,
        task: TaskSpec,
        count: int,
        observation_size: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.task = task
        self.observation_size = observation_size
        self.indices = np.arange(rank, count, world_size, dtype=np.int64)
        self.envs = [make_env(task) for _ in self.indices]
        if self.envs:
            self.observation_space: SpaceSpec = space_from_gymnasium(self.envs[0].observation_space)
            self.action_space: SpaceSpec = space_from_gymnasium(self.envs[0].action_space)
        else:  # a rank that owns none of this task's envs (count < world_size) still knows its spaces
            self.observation_space, self.action_space = task_spaces(task)
        self.width = space_size(self.observation_space)
        if self.width > observation_size:
            raise InvalidObservation(
                f"task {task.id!r}: observations have {self.width} values; the trunk takes {observation_size}"
            )
        self._returns = np.zeros(len(self.envs))
        self._lengths = np.zeros(len(self.envs), dtype=np.int64)
        self.obs = np.zeros((len(self.envs), observation_size), dtype=np.float32)
        for i, (env, g) in enumerate(zip(self.envs, self.indices, strict=True)):
            env.action_space.seed(seed + int(g))
            obs, _ = env.reset(seed=seed + int(g))
            self.obs[i] = self._pad(obs)

    def __len__(self) -> int:
        return len(self.envs)

    def _pad(self, obs: Any) -> npt.NDArray[np.float32]:
        padded: npt.NDArray[np.float32] = pad_observations(
            np.asarray(obs, dtype=np.float32).reshape(1, -1), self.observation_size
        )[0]
        return padded

    def step(self, indices: npt.NDArray[np.int64], raw_actions: npt.NDArray[Any]) -> StepResult:
        """Step envs ``indices`` with raw actions (indices [k] or Gaussian [k, a] in [-1, 1] frame)."""
        env_actions = raw_to_env_action(np.asarray(raw_actions), self.action_space)
        k = len(indices)
        result = StepResult(
            next_obs=np.zeros((k, self.observation_size), np.float32),
            rewards=np.zeros(k),
            terminated=np.zeros(k, bool),
            truncated=np.zeros(k, bool),
            final_obs=np.zeros((k, self.observation_size), np.float32),
            episode_returns=[],
            episode_lengths=[],
        )
        w = self.width
        for j, i in enumerate(indices):
            env = self.envs[i]
            obs, reward, terminated, truncated, _ = env.step(env_actions[j])
            # Written straight into the zero-padded rows (the padding stays zero).
            result.final_obs[j, :w] = np.asarray(obs, dtype=np.float32).ravel()
            self._returns[i] += float(reward)
            self._lengths[i] += 1
            result.rewards[j] = float(reward)
            result.terminated[j] = terminated
            result.truncated[j] = truncated
            if terminated or truncated:
                result.episode_returns.append(float(self._returns[i]))
                result.episode_lengths.append(int(self._lengths[i]))
                self._returns[i] = 0.0
                self._lengths[i] = 0
                obs, _ = env.reset()
                result.next_obs[j, :w] = np.asarray(obs, dtype=np.float32).ravel()
            else:
                result.next_obs[j] = result.final_obs[j]
            self.obs[i] = result.next_obs[j]
        return result

    def close(self) -> None:
        for env in self.envs:
            env.close()
