"""Deterministic per-task evaluation: argmax / Gaussian-mean actions, every task's episodes in lockstep."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from polyhead.taskspec import TaskSpec
from polyhead.trainer.envs import TaskEnvs
from polyhead.trainer.policy import MultiTaskPolicy


@torch.no_grad()
def evaluate(
    policy: MultiTaskPolicy, tasks: Sequence[TaskSpec], *, episodes: int, seed: int
) -> dict[str, list[float]]:
    """Run ``episodes`` episodes per task (env ``i`` of task ``k`` seeded ``seed + 1000 k + i``).

    Returns each task's undiscounted episode returns. The trunk runs once per step on the observations
    of every unfinished episode of every task (after each task's encoder), as a server batches them.
    """
    was_training = policy.training
    policy.eval()
    envs = [TaskEnvs(t, episodes, policy.observation_size, seed=seed + 1000 * k) for k, t in enumerate(tasks)]
    returns: dict[str, list[float]] = {t.id: [] for t in tasks}
    running = [np.arange(episodes) for _ in tasks]
    try:
        while any(len(r) for r in running):
            obs = np.concatenate([e.obs[r] for e, r in zip(envs, running, strict=True)])
            segments = [(t.id, len(r)) for t, r in zip(tasks, running, strict=True) if len(r)]
            features = policy.features(policy.normalize(torch.as_tensor(obs), segments), segments)
            start = 0
            for k, (task, task_envs) in enumerate(zip(tasks, envs, strict=True)):
                active = running[k]
                if not len(active):
                    continue
                actions = policy.head(task.id).deterministic(features[start : start + len(active)]).numpy()
                start += len(active)
                step = task_envs.step(active, actions)
                ended = step.terminated | step.truncated
                returns[task.id].extend(step.episode_returns)
                running[k] = active[~ended]
    finally:
        for e in envs:
            e.close()
        policy.train(was_training)
    return returns
