"""Per-task evaluation, every task's episodes in lockstep: deterministic (argmax / Gaussian-mean actions) by
default, or sampled (what clients acting with sampled actions see, for comparisons with live returns)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from polyhead.taskspec import TaskSpec
from polyhead.trainer.distributed import Ranks
from polyhead.trainer.envs import TaskEnvs
from polyhead.trainer.policy import MultiTaskPolicy


@torch.no_grad()
def evaluate(
    policy: MultiTaskPolicy,
    tasks: Sequence[TaskSpec],
    *,
    episodes: int,
    seed: int,
    ranks: Ranks | None = None,
    deterministic: bool = True,
) -> dict[str, list[float]]:
    """Run ``episodes`` episodes per task (env ``i`` of task ``k`` seeded ``seed + 1000 k + i``).

    Returns each task's undiscounted episode returns, in the order the episodes ended (then by env). The
    trunk runs once per step on the observations of every unfinished episode of every task (after each
    task's encoder), as a server would batch them. Under torchrun (``ranks``) each rank runs its share of
    the episodes and every rank gets the same full lists (a collective), equal to what one process would
    have returned.

    ``deterministic=False`` samples actions from each head's distribution (a torch generator seeded with
    ``seed`` and the rank, so the global RNG is untouched).
    """
    ranks = ranks or Ranks()
    was_training = policy.training
    policy.eval()
    envs = [
        TaskEnvs(
            t,
            episodes,
            policy.observation_size,
            seed=seed + 1000 * k,
            rank=ranks.rank,
            world_size=ranks.world_size,
        )
        for k, t in enumerate(tasks)
    ]
    records: dict[str, list[tuple[int, int, float]]] = {t.id: [] for t in tasks}
    running = [np.arange(len(e)) for e in envs]
    step = 0
    generator = torch.Generator().manual_seed(seed + 7919 * ranks.rank)  # a CPU one: samples on the CPU
    device = policy.device
    try:
        while any(len(r) for r in running):
            obs = np.concatenate([e.obs[r] for e, r in zip(envs, running, strict=True)])
            segments = [(t.id, len(r)) for t, r in zip(tasks, running, strict=True) if len(r)]
            x = torch.as_tensor(obs, device=device)
            features = policy.features(policy.normalize(x, segments), segments)
            start = 0
            for k, (task, task_envs) in enumerate(zip(tasks, envs, strict=True)):
                active = running[k]
                if not len(active):
                    continue
                head, rows = policy.head(task.id), features[start : start + len(active)]
                if deterministic:
                    actions = head.deterministic(rows).cpu().numpy()
                else:
                    first, log_std = head.actor_params(rows)
                    first, log_std = first.cpu(), None if log_std is None else log_std.cpu()
                    if log_std is None:
                        actions = torch.multinomial(first.softmax(-1), 1, generator=generator)[:, 0].numpy()
                    else:
                        noise = torch.randn(first.shape, generator=generator)
                        actions = (first + log_std.exp() * noise).numpy()
                start += len(active)
                result = task_envs.step(active, actions)
                ended = result.terminated | result.truncated
                ended_envs = task_envs.indices[active[ended]]
                records[task.id].extend(
                    (step, int(i), r) for i, r in zip(ended_envs, result.episode_returns, strict=True)
                )
                running[k] = active[~ended]
            step += 1
    finally:
        for e in envs:
            e.close()
        policy.train(was_training)
    everyone = ranks.gather(records)
    return {t.id: [r for _, _, r in sorted(x for part in everyone for x in part[t.id])] for t in tasks}
