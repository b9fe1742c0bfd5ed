"""``RemotePolicy``: a served head as a plain callable, for users' own loops and gymnasium vector envs.

    envs = gymnasium.vector.SyncVectorEnv([lambda: make_env(spec)] * 8)
    policy = RemotePolicy(client, "cartpole", deterministic=True)
    obs, _ = envs.reset(seed=0)
    obs, rewards, terms, truncs, _ = envs.step(policy(obs))   # one Act call for all 8 observations

A call with one observation returns one action; a call with a batch ``[B, *obs_shape]`` (what a vector
env gives) returns ``[B]`` (Discrete) or ``[B, *act_shape]`` (Box) in one request. The head version of
the latest call is in ``last_version``; every version seen in ``versions_seen``.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import numpy.typing as npt

from polyhead.clients.policy_client import PolicyClient


class RemotePolicy:
    """``policy(obs) -> action`` backed by ``PolicyClient.act``."""

    def __init__(
        self,
        client: PolicyClient,
        task_id: str,
        *,
        deterministic: bool = False,
        seed: int | None = None,
        version: int = 0,
        timeout: float | None = None,
    ) -> None:
        self.client = client
        self.task = client.task(task_id)
        self.deterministic = deterministic
        self.version = version
        self.timeout = timeout
        # A fresh seed per call from one base seed: reproducible runs without repeating samples.
        self._seeds = None if seed is None else itertools.count(seed)
        self.last_version: int | None = None
        self.versions_seen: set[int] = set()
        self.calls = 0

    def __call__(self, obs: npt.ArrayLike) -> npt.NDArray[Any]:
        result = self.client.act(
            self.task.task_id,
            np.asarray(obs),
            deterministic=self.deterministic,
            seed=None if self._seeds is None else next(self._seeds),
            version=self.version,
            timeout=self.timeout,
        )
        self.calls += 1
        self.last_version = result.head_version
        self.versions_seen.add(result.head_version)
        return result.actions
