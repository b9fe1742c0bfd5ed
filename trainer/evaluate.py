"""Per-task evaluation, every task's episodes in lockstep: deterministic (argmax / Gaussian-mean actions) by
default, or sampled (what clients acting with sampled actions see, for comparisons with live returns)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from polyhead.taskspec import TaskSpec
from polyhead.trainer.envs import TaskEnvs
from polyhead.trainer.policy import MultiTaskPolicy


@torch.no_grad()
def evaluate(
    policy: MultiTaskPolicy,
    tasks: Sequence[TaskSpec],
    *,
    episodes: int,
    seed: int,
    deterministic: bool = True,
) -> dict[str, list[float]]:
    """Run ``episodes`` episodes per task (env ``i`` of task ``k`` seeded ``seed + 1000 k + i``).

    ``deterministic=False`` samples actions from each head's distribution (a torch generator seeded with
    ``seed``, so the global RNG is untouched).

    Returns each task's undiscounted episode returns. The trunk runs once per step on the observations
    of every unfinished episode of every task, as a server would batch them.
    """
    was_training = policy.training
    policy.eval()
    envs = [TaskEnvs(t, episodes, policy.observation_size, seed=seed + 1000 * k) for k, t in enumerate(tasks)]
    returns: dict[str, list[float]] = {t.id: [] for t in tasks}
    running = [np.arange(episodes) for _ in tasks]
    generator = torch.Generator().manual_seed(seed)
    try:
        while any(len(r) for r in running):
            obs = np.concatenate([e.obs[r] for e, r in zip(envs, running, strict=True)])
            features, _ = policy.trunk(torch.as_tensor(obs))
            start = 0
            for k, (task, task_envs) in enumerate(zip(tasks, envs, strict=True)):
                active = running[k]
                if not len(active):
                    continue
                head, rows = policy.head(task.id), features[start : start + len(active)]
                if deterministic:
                    actions = head.deterministic(rows).numpy()
                else:
                    first, log_std = head.actor_params(rows)
                    if log_std is None:
                        actions = torch.multinomial(first.softmax(-1), 1, generator=generator)[:, 0].numpy()
                    else:
                        noise = torch.randn(first.shape, generator=generator)
                        actions = (first + log_std.exp() * noise).numpy()
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
