"""The three phases of multi-task PPO: collect a rollout, compute advantages, update the policy.

Read top to bottom like CleanRL's ppo.py (https://github.com/vwxyzjn/cleanrl/blob/master/cleanrl/ppo.py);
what differs is that every array exists once per task:

* the rollout steps each task's own environments, runs the trunk once per step on every task's
  observations together and each task's head on its slice;
* rewards are scaled per task by the running std of the task's discounted return (so CartPole's +1 and
  Acrobot's -1 train together; gymnasium's NormalizeReward, per task);
* advantages are normalised per task; the loss is the weighted sum of the tasks' PPO losses;
* optional gradient surgery (PCGrad) acts on the trunk's parameters only, where tasks share weights.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from polyhead.taskspec import TaskSpec
from polyhead.trainer.config import PPOConfig
from polyhead.trainer.distributed import Ranks, batch_moments
from polyhead.trainer.envs import StepResult, TaskEnvs
from polyhead.trainer.gae import compute_gae
from polyhead.trainer.pcgrad import cosine_matrix, pcgrad
from polyhead.trainer.policy import MultiTaskPolicy
from polyhead.trainer.running_stats import RunningMeanStd


@dataclass
class TaskState:
    """Everything per task that lives across rollouts."""

    task: TaskSpec
    envs: TaskEnvs
    weight: float
    return_rms: RunningMeanStd = field(default_factory=RunningMeanStd)
    discounted_returns: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    recent_returns: deque[float] = field(default_factory=lambda: deque(maxlen=20))
    episodes: int = 0

    def __post_init__(self) -> None:
        self.discounted_returns = np.zeros(len(self.envs))

    @property
    def recent_return(self) -> float:
        return float(np.mean(self.recent_returns)) if self.recent_returns else float("nan")


@dataclass
class TaskRollout:
    """One task's rollout ``[T, k]`` (k = envs stepped), then flattened into its batch after GAE."""

    obs: torch.Tensor  # normalised observations, as the acting policy saw them [T, k, D]
    actions: torch.Tensor  # raw actions [T, k] (index) or [T, k, a] (Gaussian, [-1, 1] frame)
    logprobs: torch.Tensor
    rewards: torch.Tensor  # scaled rewards, truncation bootstrap folded in
    episode_ends: torch.Tensor
    values: torch.Tensor
    next_value: torch.Tensor  # [k]
    advantages: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    returns: torch.Tensor = field(default_factory=lambda: torch.zeros(0))


# ============================================================================================================
# Phase 1: collect a rollout
# ============================================================================================================
@torch.no_grad()
def collect_rollout(
    policy: MultiTaskPolicy,
    states: list[TaskState],
    active: list[npt.NDArray[np.int64]],
    config: PPOConfig,
    *,
    ranks: Ranks | None = None,
) -> dict[str, TaskRollout]:
    """Step ``active[k]`` envs (local positions) of each task ``config.num_steps`` times with sampled actions.

    Updates the observation normaliser with every observation seen and each task's return statistics;
    appends finished episodes' undiscounted returns to ``TaskState.recent_returns``. Under torchrun
    (``ranks``) all three see every rank's environments, so they stay identical on every rank (one small
    collective per step, two more per rollout).
    """
    ranks = ranks or Ranks()
    T, D = config.num_steps, policy.observation_size
    device = policy.device  # the rollout's tensors live with the policy; the envs take numpy on the CPU
    sizes = [len(a) for a in active]
    buf: dict[str, dict[str, torch.Tensor]] = {}
    for state, k in zip(states, sizes, strict=True):
        head = policy.head(state.task.id)
        act_shape = () if head.distribution == "categorical" else (policy.action_spaces[state.task.id].size,)  # type: ignore[union-attr]
        buf[state.task.id] = {
            "obs": torch.zeros(T, k, D, device=device),
            "actions": torch.zeros(
                (T, k, *act_shape), dtype=torch.long if not act_shape else torch.float32, device=device
            ),
            "logprobs": torch.zeros(T, k, device=device),
            "rewards": torch.zeros(T, k, device=device),
            "episode_ends": torch.zeros(T, k, device=device),
            "values": torch.zeros(T, k, device=device),
        }
    # (step, global env index, return) of every episode that ends, to merge the ranks' in one order.
    episodes: list[list[tuple[int, int, float]]] = [[] for _ in states]

    def observations() -> npt.NDArray[np.float32]:
        return np.concatenate([s.envs.obs[a] for s, a in zip(states, active, strict=True)])

    # Rows of each task in the arrays below (each task's rows go through its own encoder).
    segments = [(s.task.id, k) for s, k in zip(states, sizes, strict=True)]
    # Each encoder's normaliser sees every observation it acts on, before it acts (every rank's).
    mean, var, count = ranks.combine_moments(*policy.observation_moments(observations(), segments))
    policy.update_normalizer_moments(mean, var, count)
    for step in range(T):
        raw = observations()
        obs_norm = policy.normalize(torch.as_tensor(raw, device=device), segments)
        features = policy.features(obs_norm, segments)
        start = 0
        results: list[StepResult] = []
        for n, (state, idx, k) in enumerate(zip(states, active, sizes, strict=True)):
            b = buf[state.task.id]
            head = policy.head(state.task.id)
            f, o = features[start : start + k], obs_norm[start : start + k]
            start += k
            dist = head.dist(f)
            action = dist.sample()
            b["obs"][step] = o
            b["actions"][step] = action
            b["logprobs"][step] = head.log_prob(dist, action)
            b["values"][step] = head.value(f, o)

            result = state.envs.step(idx, action.cpu().numpy())
            results.append(result)
            state.discounted_returns[idx] = state.discounted_returns[idx] * config.gamma + result.rewards
            ended_envs = state.envs.indices[idx[result.terminated | result.truncated]]
            episodes[n].extend(
                (step, int(i), r) for i, r in zip(ended_envs, result.episode_returns, strict=True)
            )

        # One exchange per step carries each task's discounted-return statistics (for reward scaling,
        # now) and the next observations' statistics (for the normaliser, before the next step); the
        # last step's next observations are the next rollout's first, folded in when it starts.
        next_raw = observations() if step < T - 1 else np.zeros((0, D), np.float32)
        moments = [
            batch_moments(torch.as_tensor(s.discounted_returns[idx]).reshape(-1, 1))
            for s, idx in zip(states, active, strict=True)
        ]
        next_segments = segments if step < T - 1 else [(t, 0) for t, _ in segments]
        moments.append(policy.observation_moments(next_raw, next_segments))
        mean, var, count = ranks.combine_moments(*(torch.cat(m) for m in zip(*moments, strict=True)))
        n_tasks = len(states)
        # Per-task return normalisation: divide rewards by the running std of the discounted return
        # (gymnasium NormalizeReward; Engstrom et al. 2020 "reward scaling"), over every rank's envs.
        if config.norm_reward:
            for n, state in enumerate(states):
                state.return_rms.update_moments(float(mean[n]), float(var[n]), float(count[n]))
        for state, idx, result in zip(states, active, results, strict=True):
            b = buf[state.task.id]
            head = policy.head(state.task.id)
            ended = result.terminated | result.truncated
            scale = state.return_rms.std if config.norm_reward else 1.0
            state.discounted_returns[idx[ended]] = 0.0
            rewards = torch.as_tensor(result.rewards / scale, dtype=torch.float32, device=device)
            # A time-limit truncation is not a failure: bootstrap γ V(s_final) (SB3's timeout handling).
            cut = result.truncated & ~result.terminated
            if cut.any():
                final_obs = torch.as_tensor(result.final_obs[cut], device=device)
                final_norm = policy.normalize(final_obs, state.task.id)
                final_value = head.value(policy.features(final_norm, state.task.id), final_norm)
                rewards[torch.as_tensor(cut, device=device)] += config.gamma * final_value
            b["rewards"][step] = rewards
            b["episode_ends"][step] = torch.as_tensor(ended, dtype=torch.float32, device=device)
        policy.update_normalizer_moments(mean[n_tasks:], var[n_tasks:], count[n_tasks:])

    # Every rank's finished episodes, in the order one process would have seen them (drives gap sampling).
    everyone = ranks.gather(episodes)
    for n, state in enumerate(states):
        merged = sorted(record for part in everyone for record in part[n])
        state.recent_returns.extend(r for _, _, r in merged)
        state.episodes += len(merged)

    rollouts: dict[str, TaskRollout] = {}
    raw = np.concatenate([s.envs.obs[a] for s, a in zip(states, active, strict=True)])
    obs_norm = policy.normalize(torch.as_tensor(raw, device=device), segments)
    features = policy.features(obs_norm, segments)
    start = 0
    for state, k in zip(states, sizes, strict=True):
        head = policy.head(state.task.id)
        next_value = head.value(features[start : start + k], obs_norm[start : start + k])
        start += k
        rollouts[state.task.id] = TaskRollout(next_value=next_value, **buf[state.task.id])
    return rollouts


# ============================================================================================================
# Phase 2: advantages (GAE) and per-task normalisation
# ============================================================================================================
def compute_advantages(
    rollouts: dict[str, TaskRollout], config: PPOConfig, *, ranks: Ranks | None = None
) -> None:
    """Fill each rollout's ``advantages`` and ``returns`` and flatten every array to its batch ``[T*k]``.

    Under torchrun (``ranks``) a task's advantages are normalised with the mean and std of every rank's
    share of its batch (a collective).
    """
    ranks = ranks or Ranks()
    for r in rollouts.values():
        advantages, returns = compute_gae(
            r.rewards,
            r.values,
            r.episode_ends,
            r.next_value,
            gamma=config.gamma,
            gae_lambda=config.gae_lambda,
        )
        D = r.obs.shape[-1]
        r.obs = r.obs.reshape(-1, D)
        r.actions = r.actions.reshape((-1, *r.actions.shape[2:]))
        r.logprobs = r.logprobs.reshape(-1)
        r.values = r.values.reshape(-1)
        r.returns = returns.reshape(-1)
        r.advantages = advantages.reshape(-1)
    if config.norm_adv:
        # Per task, so a task with large advantages does not drown the others' policy gradient.
        # (On the CPU, where every rank's statistics are combined.)
        moments = [batch_moments(r.advantages.reshape(-1, 1).cpu()) for r in rollouts.values()]
        mean, var, count = ranks.combine_moments(*(torch.cat(m) for m in zip(*moments, strict=True)))
        for n, r in enumerate(rollouts.values()):
            total = float(count[n])
            if total > 1:
                std = float(torch.sqrt(var[n] * total / (total - 1)))  # unbiased, as Tensor.std()
                r.advantages = (r.advantages - float(mean[n])) / (std + 1e-8)


# ============================================================================================================
# Phase 3: the PPO update
# ============================================================================================================
@dataclass
class UpdateStats:
    """Means over the update's minibatches, per task; ``grad_cosines`` when they were computed."""

    per_task: dict[str, dict[str, float]]
    grad_cosines: npt.NDArray[np.float64] | None
    epochs: int


class MinibatchForward(nn.Module):
    """The update's forward pass as a module, so DistributedDataParallel can wrap it.

    ``forward(obs, actions)``: a minibatch of normalised observations holding every task, task after task
    in the order of ``actions`` (task id -> that task's actions); returns each task's new log-probs,
    entropies and values. DDP all-reduces the gradients of what ran through its wrapped ``forward`` (and
    only that), so the update calls the policy through here.
    """

    def __init__(self, policy: MultiTaskPolicy) -> None:
        super().__init__()
        self.policy = policy

    def forward(
        self, obs: torch.Tensor, actions: dict[str, torch.Tensor]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        features = self.policy.features(obs, [(t, len(a)) for t, a in actions.items()])
        out = {}
        start = 0
        for t, action in actions.items():
            head, n = self.policy.head(t), len(action)
            f, o = features[start : start + n], obs[start : start + n]
            start += n
            dist = head.dist(f)
            out[t] = (head.log_prob(dist, action), head.entropy(dist), head.value(f, o))
        return out


def ppo_update(
    policy: MultiTaskPolicy,
    optimizer: torch.optim.Optimizer,
    rollouts: dict[str, TaskRollout],
    weights: dict[str, float],
    config: PPOConfig,
    *,
    generator: torch.Generator,
    forward: nn.Module | None = None,
    ranks: Ranks | None = None,
    surgery_generator: torch.Generator | None = None,
) -> UpdateStats:
    """``config.update_epochs`` epochs of clipped-surrogate PPO over minibatches holding every task.

    ``forward`` evaluates minibatches (default ``MinibatchForward(policy)``); under torchrun it is that
    module wrapped in DistributedDataParallel, and every rank calls this with its share of the batch.
    The ranks' gradients are averaged, so each rank's task loss is weighted by its share of the task's
    samples (``n_local * world_size / n_total``, 1 when the shards are equal) to give the gradient of the
    loss over the whole batch. The early stop on ``target_kl`` uses the mean KL over ranks, so every rank
    runs the same number of epochs; the returned statistics are means over ranks.

    With PCGrad or the cosine log under torchrun, each task's trunk gradient is averaged over the ranks
    (:func:`_all_reduce_grads`) before the projection, so every rank projects the same global task
    gradients. PCGrad's random task order comes from ``surgery_generator`` (default ``generator``), which
    must then be seeded alike on every rank (``generator`` shuffles each rank's own minibatches).
    """
    ranks = ranks or Ranks()
    forward = forward or MinibatchForward(policy)
    surgery_generator = surgery_generator or generator
    task_ids = list(rollouts)
    local_sizes = np.array([len(rollouts[t].logprobs) for t in task_ids], dtype=np.float64)
    share = dict(zip(task_ids, local_sizes / np.maximum(ranks.average(local_sizes), 1.0), strict=True))
    trunk_params = list(policy.trunk.parameters())
    all_params = list(policy.parameters())
    surgery = config.grad_surgery == "pcgrad"
    want_cosines = surgery or config.log_grad_cosines
    if want_cosines and ranks.distributed:
        # DDP would all-reduce the trunk's summed gradient in backward(), but PCGrad needs each task's
        # own global trunk gradient, and projecting after DDP's average would be a second pass over
        # already-averaged numbers. So this path runs the plain module (no DDP hook fires) and does the
        # one all-reduce itself: every task's flattened trunk gradient together with every parameter's
        # gradient, averaged over ranks exactly as DDP would. The task losses carry each rank's
        # sample share (below), so the average is the gradient over the whole batch. Every rank then
        # holds identical gradients and applies the identical step; the parameters stay in sync.
        forward = MinibatchForward(policy)
    sums: dict[str, dict[str, float]] = {t: {} for t in task_ids}
    count = 0
    cos_sum = np.zeros((len(task_ids), len(task_ids)))
    cos_count = 0
    epochs_done = 0
    for _epoch in range(config.update_epochs):
        epochs_done += 1
        chunks = {
            t: torch.tensor_split(
                torch.randperm(len(r.logprobs), generator=generator), config.num_minibatches
            )
            for t, r in rollouts.items()
        }
        epoch_kl: list[float] = []
        for mb in range(config.num_minibatches):
            mb_inds = {t: chunks[t][mb].to(policy.device) for t in task_ids}
            mb_obs = torch.cat([rollouts[t].obs[mb_inds[t]] for t in task_ids])
            outputs = forward(mb_obs, {t: rollouts[t].actions[mb_inds[t]] for t in task_ids})
            losses: list[torch.Tensor] = []
            for t in task_ids:
                r, inds = rollouts[t], mb_inds[t]
                newlogprob, entropy, newvalue = outputs[t]
                logratio = newlogprob - r.logprobs[inds]
                ratio = logratio.exp()
                with torch.no_grad():
                    # http://joschu.net/blog/kl-approx.html
                    approx_kl = ((ratio - 1) - logratio).mean()
                    clipfrac = ((ratio - 1.0).abs() > config.clip_coef).float().mean()

                mb_advantages = r.advantages[inds]
                # Clipped surrogate objective
                pg_loss1 = -mb_advantages * ratio
                pg_loss2 = -mb_advantages * torch.clamp(ratio, 1 - config.clip_coef, 1 + config.clip_coef)
                pg_loss = torch.max(pg_loss1, pg_loss2).mean()

                # Value loss, optionally clipped around the rollout's values
                mb_returns, mb_values = r.returns[inds], r.values[inds]
                if config.clip_vloss:
                    v_loss_unclipped = (newvalue - mb_returns) ** 2
                    v_clipped = mb_values + torch.clamp(
                        newvalue - mb_values, -config.clip_coef, config.clip_coef
                    )
                    v_loss_clipped = (v_clipped - mb_returns) ** 2
                    v_loss = 0.5 * torch.max(v_loss_unclipped, v_loss_clipped).mean()
                else:
                    v_loss = 0.5 * ((newvalue - mb_returns) ** 2).mean()

                entropy_loss = entropy.mean()
                loss = pg_loss - config.ent_coef * entropy_loss + v_loss * config.vf_coef
                losses.append(weights[t] * share[t] * loss)
                epoch_kl.append(float(approx_kl))
                for key, value in (
                    ("policy_loss", pg_loss),
                    ("value_loss", v_loss),
                    ("entropy", entropy_loss),
                    ("approx_kl", approx_kl),
                    ("clipfrac", clipfrac),
                ):
                    sums[t][key] = sums[t].get(key, 0.0) + float(value.detach())
            count += 1

            optimizer.zero_grad()
            total = torch.stack(losses).sum()
            if want_cosines:
                task_grads = torch.stack([_flat_grad(loss, trunk_params) for loss in losses])
                total.backward()  # type: ignore[no-untyped-call]
                if ranks.distributed:
                    task_grads = _all_reduce_grads(task_grads, all_params, ranks)
                cos_sum += cosine_matrix(task_grads).cpu().numpy()
                cos_count += 1
                if surgery:
                    _assign_flat_grad(trunk_params, pcgrad(task_grads, surgery_generator))
            else:
                total.backward()  # type: ignore[no-untyped-call]
            nn.utils.clip_grad_norm_(all_params, config.max_grad_norm, foreach=True)
            optimizer.step()

        if config.target_kl is not None:
            mean_kl = float(ranks.average(np.array([np.mean(epoch_kl)]))[0])
            if mean_kl > config.target_kl:
                break

    per_task = {t: {k: v / max(count, 1) for k, v in s.items()} for t, s in sums.items()}
    for t, r in rollouts.items():
        per_task[t]["explained_variance"] = _explained_variance(r.values, r.returns)
    if ranks.distributed:
        keys = [(t, k) for t in task_ids for k in per_task[t]]
        means = ranks.average(np.array([per_task[t][k] for t, k in keys]))
        for (t, k), value in zip(keys, means, strict=True):
            per_task[t][k] = float(value)
    return UpdateStats(
        per_task=per_task, grad_cosines=cos_sum / cos_count if cos_count else None, epochs=epochs_done
    )


def _flat_grad(loss: torch.Tensor, params: list[nn.Parameter]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).reshape(-1)
            for g, p in zip(grads, params, strict=True)
        ]
    )


def _all_reduce_grads(task_grads: torch.Tensor, params: list[nn.Parameter], ranks: Ranks) -> torch.Tensor:
    """Average over the ranks, in one all-reduce, the task gradients ``[n_tasks, n]`` and the ``.grad``
    of every parameter that has one (written back in place); returns the averaged task gradients.

    A collective. Every rank runs the same model on every task (each rank steps at least one env of
    every task), so the same parameters have gradients everywhere.
    """
    with_grad = [p for p in params if p.grad is not None]
    flat = torch.cat([task_grads.reshape(-1), *(p.grad.reshape(-1) for p in with_grad)])  # type: ignore[union-attr]
    ranks.mean_(flat)
    offset = task_grads.numel()
    for p in with_grad:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p))  # type: ignore[union-attr]
        offset += n
    return flat[: task_grads.numel()].view_as(task_grads)


def _assign_flat_grad(params: list[nn.Parameter], flat: torch.Tensor) -> None:
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def _explained_variance(values: torch.Tensor, returns: torch.Tensor) -> float:
    var_y = float(returns.var()) if returns.numel() > 1 else 0.0
    return float("nan") if var_y == 0 else 1.0 - float((returns - values).var()) / var_y


def allocate_envs(
    states: list[TaskState], config: PPOConfig, *, min_envs: int = 1
) -> list[npt.NDArray[np.int64]]:
    """Which envs (global indices) of each task step in the next rollout.

    ``uniform``: all ``envs_per_task``. ``gap``: the same total, shared in proportion to each task's
    normalised gap to its target return (plus a floor, so a solved task keeps practising), each task
    between ``min_envs`` (under torchrun: the number of ranks, so every rank steps every task) and
    ``2 * envs_per_task`` envs. A task without episodes yet or without a target counts as far from it.
    """
    n = config.envs_per_task
    if config.task_sampling == "uniform":
        return [np.arange(n) for _ in states]
    gaps = []
    for s in states:
        target, recent = s.task.target_return, s.recent_return
        if np.isnan(target) or np.isnan(recent):
            gaps.append(1.0)
        else:
            gaps.append(max(0.0, target - recent) / max(abs(target), 1.0))
    weights = np.asarray(gaps) + 0.1
    budget = n * len(states)
    counts = np.clip(np.round(weights / weights.sum() * budget), min_envs, 2 * n).astype(np.int64)
    # Make the counts add up to the budget: adjust the tasks with the most (or fewest) envs first.
    while counts.sum() != budget:
        if counts.sum() > budget:
            i = int(np.argmax(np.where(counts > min_envs, counts, -1)))
            counts[i] -= 1
        else:
            i = int(np.argmin(np.where(counts < 2 * n, counts, np.iinfo(np.int64).max)))
            counts[i] += 1
    return [np.arange(int(c)) for c in counts]


def summarize(
    stats: UpdateStats, states: list[TaskState], active: list[npt.NDArray[np.int64]]
) -> dict[str, Any]:
    """Flat per-task metrics of one iteration (``TASK/NAME`` keys), for the CSV and TensorBoard."""
    out: dict[str, Any] = {}
    for s, a in zip(states, active, strict=True):
        t = s.task.id
        out[f"{t}/episode_return"] = s.recent_return
        out[f"{t}/envs"] = len(a)
        for key, value in stats.per_task[t].items():
            out[f"{t}/{key}"] = value
    return out
