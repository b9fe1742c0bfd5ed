"""A torchrun worker for tests/trainer/test_distributed.py: checks that what the ranks compute together
equals what one process computes on the whole batch, and writes its findings as JSON.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/trainer/dist_worker.py OUT_DIR

Every rank builds the same data from fixed seeds, so it can compute the single-process answer itself
and compare it with the collective one.
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from polyhead.envs import task_spaces
from polyhead.taskspec import load_suite
from polyhead.trainer.config import GradSurgery, PPOConfig
from polyhead.trainer.distributed import Ranks, batch_moments
from polyhead.trainer.envs import TaskEnvs
from polyhead.trainer.evaluate import evaluate
from polyhead.trainer.policy import MultiTaskPolicy, PolicyConfig, build_policy
from polyhead.trainer.ppo import (
    MinibatchForward,
    TaskRollout,
    TaskState,
    UpdateStats,
    collect_rollout,
    compute_advantages,
    ppo_update,
)


def check_moments(ranks: Ranks) -> float:
    """Moments combined across ranks (rank 1 of 2 has an empty batch for statistic group 2) vs the
    moments of the concatenated data."""
    rng = np.random.default_rng(0)
    sizes = [7, 3]
    data = [rng.normal(loc=r, scale=1 + r, size=(sizes[r], 4)) for r in range(ranks.world_size)]
    if ranks.world_size > 1:
        data[1] = data[1][:0]  # one rank saw nothing: it must not disturb the result
    mine = torch.as_tensor(data[ranks.rank])
    mean, var, count = ranks.combine_moments(*batch_moments(mine))
    everything = torch.as_tensor(np.concatenate(data))
    want_mean, want_var, want_count = batch_moments(everything)
    return float(
        max(
            (mean - want_mean).abs().max(),
            (var - want_var).abs().max(),
            (count - want_count).abs().max(),
        )
    )


def check_evaluate(ranks: Ranks) -> bool:
    """The ranks' shared evaluation returns exactly one process's lists."""
    tasks = list(load_suite("classic-mixed").train_tasks)
    torch.manual_seed(0)
    policy = build_policy(PolicyConfig(), tasks, {t.id: task_spaces(t) for t in tasks})
    together = evaluate(policy, tasks, episodes=3, seed=11, ranks=ranks)
    alone = evaluate(policy, tasks, episodes=3, seed=11)
    return together == alone


def shard(rollout: TaskRollout, owned: np.ndarray) -> TaskRollout:
    """This rank's envs (columns) of a full [T, k] rollout."""
    return TaskRollout(
        obs=rollout.obs[:, owned],
        actions=rollout.actions[:, owned],
        logprobs=rollout.logprobs[:, owned],
        rewards=rollout.rewards[:, owned],
        episode_ends=rollout.episode_ends[:, owned],
        values=rollout.values[:, owned],
        next_value=rollout.next_value[owned],
    )


def check_update(ranks: Ranks, *, grad_surgery: GradSurgery = "none") -> dict[str, float]:
    """A DDP update on the ranks' uneven shards (3 envs: 2 on rank 0, 1 on rank 1) moves the weights as
    one process's update on the whole batch does. Returns the largest parameter difference ("error") and,
    for PCGrad, how far the one-process PCGrad update lands from the plain one ("projection"; 0 would
    mean no gradient was projected, and the comparison proves nothing about the projection)."""
    suite = load_suite("cartpole-family")
    tasks = list(suite.train_tasks)[:2]
    if grad_surgery != "none":  # a task whose actions are reversed: its gradients conflict with the others'
        tasks.append(next(t for t in suite.tasks if t.id == "cartpole-reversed"))
    config = PPOConfig(
        envs_per_task=3, num_steps=16, update_epochs=3, num_minibatches=1, grad_surgery=grad_surgery
    )
    torch.manual_seed(5)
    policy = build_policy(PolicyConfig(), tasks, {t.id: task_spaces(t) for t in tasks})
    states = [
        TaskState(task=t, envs=TaskEnvs(t, 3, 4, seed=100 * k), weight=1.0) for k, t in enumerate(tasks)
    ]
    full = collect_rollout(policy, states, [np.arange(3)] * len(tasks), config)  # same on every rank
    for s in states:
        s.envs.close()
    owned = ranks.owned(3)
    mine = {t: shard(r, owned) for t, r in full.items()}

    def optimizer(params: Iterator[torch.nn.Parameter]) -> torch.optim.Optimizer:
        if grad_surgery == "none":
            return torch.optim.Adam(params, lr=1e-3, eps=1e-5)
        # Plain SGD for PCGrad: the step is proportional to the gradient, so a projection shows in the
        # weights (Adam's first steps are about lr * sign(g) and hide most of it); a large rate, so the
        # trunk (whose gradient is small next to the heads') moves well above float32 resolution.
        return torch.optim.SGD(params, lr=10.0)

    def alone_update(config: PPOConfig) -> tuple[MultiTaskPolicy, UpdateStats]:
        alone = copy.deepcopy(policy)
        alone_opt = optimizer(alone.parameters())
        stats = ppo_update(
            alone,
            alone_opt,
            copy.deepcopy(full),
            dict.fromkeys(full, 1.0),
            config,
            generator=torch.Generator().manual_seed(0),
            surgery_generator=torch.Generator().manual_seed(42),
        )
        return alone, stats

    compute_advantages(full, config)
    alone, alone_stats = alone_update(config)
    plain, _ = alone_update(replace(config, grad_surgery="none"))

    together = copy.deepcopy(policy)
    opt = optimizer(together.parameters())
    forward = DistributedDataParallel(MinibatchForward(together))
    compute_advantages(mine, config, ranks=ranks)
    stats = ppo_update(
        together,
        opt,
        mine,
        dict.fromkeys(mine, 1.0),
        config,
        generator=torch.Generator().manual_seed(0),
        forward=forward,
        ranks=ranks,
        surgery_generator=torch.Generator().manual_seed(42),
    )
    start = {n: p.detach().clone() for n, p in policy.named_parameters()}
    moved = max(float((p.detach() - start[n]).abs().max()) for n, p in alone.named_parameters())
    diff = max(
        float((a.detach() - b.detach()).abs().max())
        for a, b in zip(alone.parameters(), together.parameters(), strict=True)
    )
    # PCGrad changes only the trunk's step; measured relative to how far the trunk moved.
    trunk = [n for n, _ in policy.named_parameters() if n.startswith("trunk.")]
    p_alone, p_plain, p_together = (dict(p.named_parameters()) for p in (alone, plain, together))
    trunk_moved = max(float((p_alone[n] - start[n]).abs().max()) for n in trunk)
    trunk_error = max(float((p_alone[n] - p_together[n]).abs().max()) for n in trunk)
    projection = max(float((p_alone[n] - p_plain[n]).abs().max()) for n in trunk)
    # The task-gradient cosines come from the global task gradients: one process's matrix.
    cosines_error = (
        float(np.abs(stats.grad_cosines - alone_stats.grad_cosines).max())
        if stats.grad_cosines is not None and alone_stats.grad_cosines is not None
        else float("nan")
    )
    # An update that moved nothing proves nothing.
    return {
        "error": diff if moved > 1e-4 else float("nan"),
        "cosines_error": cosines_error,
        "trunk_error": trunk_error / trunk_moved,
        "projection": projection / trunk_moved,
    }


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group(backend="gloo")
    ranks = Ranks.current()
    torch.set_num_threads(1)
    result = {
        "rank": ranks.rank,
        "world_size": ranks.world_size,
        "moments_error": check_moments(ranks),
        "evaluate_equal": check_evaluate(ranks),
        "update_error": check_update(ranks)["error"],
        "pcgrad": check_update(ranks, grad_surgery="pcgrad"),
    }
    (out / f"rank{ranks.rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
