"""PPO on one task's head over the frozen trunk: collect (locally), build a batch (remote), update.

The same phases as :mod:`polyhead.trainer.ppo` (whose ``TaskRollout``, ``compute_advantages`` and
``ppo_update``
are reused), with three differences that make it *head-only*:

* the optimiser holds the new head's parameters only (policy layer(s), log-std, value function), and the
  trunk has ``requires_grad`` off, so ``ppo_update`` cannot move it;
* the rollout never calls ``ObsNormalizer.update``: observations are normalised with the statistics
  frozen into ``trunk.onnx`` (a server applies exactly those);
* remote experience arrives as episode segments acted by *published versions* of the head; the batch keeps
  each step's recorded log-prob of its acting version, so PPO's ratio ``π_θ(a|s) / π_version(a|s)`` is the
  importance weight that makes slightly stale data usable (and the clip bounds what stale data can do).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from polyhead.spaces import DiscreteSpec, action_dim, pad_observations
from polyhead.trainer.config import PPOConfig
from polyhead.trainer.gae import compute_gae
from polyhead.trainer.policy import MultiTaskPolicy
from polyhead.trainer.ppo import TaskRollout, TaskState, UpdateStats, compute_advantages, ppo_update
from polyhead.trainer.running_stats import RunningMeanStd


# ============================================================================================================
# Phase 1 (local): collect a rollout of the new task with the frozen trunk
# ============================================================================================================
@torch.no_grad()
def collect_head_rollout(policy: MultiTaskPolicy, state: TaskState, config: PPOConfig) -> TaskRollout:
    """Step every env of ``state`` ``config.num_steps`` times with actions sampled from the task's head.

    Like :func:`polyhead.trainer.ppo.collect_rollout` for one task, except that the observation normaliser is
    only read. Rewards are scaled by the running std of the discounted return (``state.return_rms``).
    """
    task_id = state.task.id
    head = policy.head(task_id)
    T, k, D = config.num_steps, len(state.envs), policy.observation_size
    idx = np.arange(k)
    gaussian = head.distribution == "gaussian"
    act_shape: tuple[int, ...] = (policy.action_spaces[task_id].size,) if gaussian else ()  # type: ignore[union-attr]
    obs_buf = torch.zeros(T, k, D)
    actions = torch.zeros((T, k, *act_shape), dtype=torch.float32 if gaussian else torch.long)
    logprobs, rewards_buf = torch.zeros(T, k), torch.zeros(T, k)
    ends, values = torch.zeros(T, k), torch.zeros(T, k)
    for step in range(T):
        obs_norm = policy.normalize(torch.as_tensor(state.envs.obs), task_id)
        features = policy.features(obs_norm, task_id)
        dist = head.dist(features)
        action = dist.sample()
        obs_buf[step] = obs_norm
        actions[step] = action
        logprobs[step] = head.log_prob(dist, action)
        values[step] = head.value(features, obs_norm)
        result = state.envs.step(idx, action.numpy())
        ended = result.terminated | result.truncated
        state.discounted_returns = state.discounted_returns * config.gamma + result.rewards
        scale = 1.0
        if config.norm_reward:
            state.return_rms.update(state.discounted_returns)
            scale = state.return_rms.std
        state.discounted_returns[ended] = 0.0
        rewards = torch.as_tensor(result.rewards / scale, dtype=torch.float32)
        # A time-limit truncation is not a failure: bootstrap γ V(s_final) (SB3's timeout handling).
        cut = result.truncated & ~result.terminated
        if cut.any():
            final_norm = policy.normalize(torch.as_tensor(result.final_obs[cut]), task_id)
            rewards[torch.as_tensor(cut)] += config.gamma * head.value(
                policy.features(final_norm, task_id), final_norm
            )
        rewards_buf[step] = rewards
        ends[step] = torch.as_tensor(ended, dtype=torch.float32)
        state.recent_returns.extend(result.episode_returns)
        state.episodes += len(result.episode_returns)
    obs_norm = policy.normalize(torch.as_tensor(state.envs.obs), task_id)
    next_value = head.value(policy.features(obs_norm, task_id), obs_norm)
    return TaskRollout(
        obs=obs_buf,
        actions=actions,
        logprobs=logprobs,
        rewards=rewards_buf,
        episode_ends=ends,
        values=values,
        next_value=next_value,
    )


# ============================================================================================================
# Phase 1 (remote): turn episode segments acted by published versions into a batch
# ============================================================================================================
@dataclass(frozen=True)
class SegmentData:
    """One episode segment from the server's experience feed, decoded (see admin.proto EpisodeSegment)."""

    episode_id: str
    observations: npt.NDArray[np.float32]  # [T, d] as the client sent them (not padded)
    actions: npt.NDArray[Any]  # int64 [T] or float32 [T, a]
    log_probs: npt.NDArray[np.float32]  # [T] under the acting version
    rewards: npt.NDArray[np.float32]  # [T]
    head_versions: tuple[int, ...]
    terminated: bool
    truncated: bool
    episode_return: float  # NaN unless the segment ends the episode
    next_observation: npt.NDArray[np.float32] | None
    deterministic: tuple[bool, ...] = ()  # per step; empty: every step sampled
    start_step: int = 0  # index of the first step within the episode
    episode_ordinal: int = 0  # start order among the episodes of the same first version and mode

    def __len__(self) -> int:
        return len(self.rewards)

    @property
    def ends_episode(self) -> bool:
        return self.terminated or (self.truncated and not np.isnan(self.episode_return))

    @property
    def mode(self) -> str | None:
        """ "sampled" or "deterministic" when every step was acted one way, else None."""
        if not any(self.deterministic):
            return "sampled"
        return "deterministic" if all(self.deterministic) else None


#: Reasons a remote step is not trained on (``polyhead_updater_dropped_samples_total{reason}``).
DROP_REASONS = ("stale", "unknown_version", "deterministic", "non_finite", "invalid_action", "malformed")


def segment_problem(seg: SegmentData, *, discrete_n: int | None, action_size: int) -> str | None:
    """The updater's second line of defence: why a segment must not be trained on, or None.

    The server refuses such experience at the edge; this check keeps one bad message from another
    source (an older server, a bug) from turning the return statistics or the head's weights into NaN
    (``non_finite``), crashing the update on an out-of-range index (``invalid_action``), or breaking on
    shapes that do not line up (``malformed``).
    """
    T = len(seg)
    actions = np.asarray(seg.actions)
    if (
        np.asarray(seg.observations).shape[0] != T
        or np.asarray(seg.log_probs).shape != (T,)
        or len(seg.head_versions) != T
        or actions.shape[0] != T
        or (seg.deterministic and len(seg.deterministic) != T)
    ):
        return "malformed"
    floats = [seg.observations, seg.log_probs, seg.rewards]
    if seg.next_observation is not None:
        floats.append(seg.next_observation)
    if discrete_n is None:
        floats.append(actions)
    if not all(np.isfinite(np.asarray(x, np.float64)).all() for x in floats):
        return "non_finite"
    if discrete_n is not None:
        if (
            actions.dtype.kind not in "iu"
            or actions.ndim != 1
            or ((actions < 0) | (actions >= discrete_n)).any()
        ):
            return "invalid_action"
        if (np.asarray(seg.log_probs) > 1e-5).any():
            return "non_finite"  # a positive log-probability is no probability
    elif actions.reshape(T, -1).shape[1] != action_size:
        return "malformed"
    return None


@dataclass
class RemoteBatch:
    """A batch assembled from segments: the rollout (flattened, advantages filled) and its accounting.

    ``dropped`` counts steps not trained on by reason (:data:`DROP_REASONS`); ``bootstraps`` counts how
    truncated segment ends were bootstrapped: ``next_observation`` (the observation after the last step,
    exact), ``last_observation`` (none was sent: V of the last observation stands in for V(s_next), an
    approximation).
    """

    rollout: TaskRollout
    steps: int
    dropped: dict[str, int]
    bootstraps: dict[str, int] = field(default_factory=lambda: {"next_observation": 0, "last_observation": 0})


@torch.no_grad()
def rollout_from_segments(
    policy: MultiTaskPolicy,
    task_id: str,
    segments: Sequence[SegmentData],
    *,
    allowed_versions: Mapping[int, bool],
    return_rms: RunningMeanStd,
    config: PPOConfig,
) -> RemoteBatch:
    """Build a flattened :class:`TaskRollout` from segments, recomputing values with our own critic.

    A segment that fails :func:`segment_problem` is skipped whole and counted under its reason. Of the
    others, a step is trained on when it was sampled (deterministic steps are counted ``deterministic``:
    their log-prob is not the probability of how they were chosen) and its acting version is in
    ``allowed_versions`` with value True; other steps are dropped (``stale`` when the version is known but
    too old or rolled back, ``unknown_version`` otherwise). Dropped steps cut the segment into runs. Each
    run gets its own GAE: it bootstraps from the value of the observation after it (the next step's, or
    the segment's ``next_observation``) unless the episode terminated there; a segment end with no next
    observation bootstraps from its last observation (an approximation, counted in ``bootstraps``).
    Rewards are scaled by the running std of the discounted return, as in local training.
    """
    head = policy.head(task_id)
    D = policy.observation_size
    space = policy.action_spaces[task_id]
    discrete_n = space.n if isinstance(space, DiscreteSpec) else None
    parts: dict[str, list[torch.Tensor]] = {
        k: [] for k in ("obs", "actions", "logprobs", "values", "adv", "ret")
    }
    dropped = dict.fromkeys(DROP_REASONS, 0)
    bootstraps = {"next_observation": 0, "last_observation": 0}
    for seg in segments:
        problem = segment_problem(seg, discrete_n=discrete_n, action_size=action_dim(space))
        if problem is not None:
            dropped[problem] += len(seg)
            continue
        versions = np.asarray(seg.head_versions, dtype=np.int64)
        sampled = ~np.asarray(seg.deterministic, dtype=bool) if seg.deterministic else np.ones(len(seg), bool)
        keep = np.asarray([allowed_versions.get(int(v), False) for v in versions]) & sampled
        for v, k, smp in zip(versions, keep, sampled, strict=True):
            if not smp:
                dropped["deterministic"] += 1
            elif not k:
                dropped["stale" if int(v) in allowed_versions else "unknown_version"] += 1
        if not keep.any():
            continue
        obs = pad_observations(np.asarray(seg.observations, np.float32).reshape(len(seg), -1), D)
        obs_norm = policy.normalize(torch.as_tensor(obs), task_id)
        features = policy.features(obs_norm, task_id)
        values = head.value(features, obs_norm)
        # Discounted-return scaling, walking the segment in order (gymnasium NormalizeReward).
        raw_rewards = np.asarray(seg.rewards, np.float64)
        disc = 0.0
        discounted = np.zeros(len(seg))
        for t, r in enumerate(raw_rewards):
            disc = disc * config.gamma + r
            discounted[t] = disc
        scale = 1.0
        if config.norm_reward:
            return_rms.update(discounted)
            scale = return_rms.std
        rewards = torch.as_tensor(raw_rewards / scale, dtype=torch.float32)
        if seg.next_observation is not None and seg.next_observation.size:
            nxt = pad_observations(np.asarray(seg.next_observation, np.float32).reshape(1, -1), D)
            nxt_norm = policy.normalize(torch.as_tensor(nxt), task_id)
            after_last = head.value(policy.features(nxt_norm, task_id), nxt_norm)[0]
            exact = True
        else:
            after_last = values[-1]
            exact = False
        # Runs of kept steps: [start, stop).
        edges = np.flatnonzero(np.diff(np.concatenate([[0], keep.astype(np.int8), [0]])))
        for start, stop in zip(edges[::2], edges[1::2], strict=True):
            T = stop - start
            ends = torch.zeros(T, 1)
            run_rewards = rewards[start:stop].clone().reshape(T, 1)
            if stop == len(seg):
                if seg.terminated:
                    ends[-1] = 1.0
                    next_value = torch.zeros(1)
                else:
                    next_value = after_last.reshape(1)
                    bootstraps["next_observation" if exact else "last_observation"] += 1
            else:
                next_value = values[stop].reshape(1)
            advantages, returns = compute_gae(
                run_rewards,
                values[start:stop].reshape(T, 1),
                ends,
                next_value,
                gamma=config.gamma,
                gae_lambda=config.gae_lambda,
            )
            parts["obs"].append(obs_norm[start:stop])
            parts["actions"].append(torch.as_tensor(np.asarray(seg.actions)[start:stop]))
            parts["logprobs"].append(torch.as_tensor(np.asarray(seg.log_probs, np.float32)[start:stop]))
            parts["values"].append(values[start:stop])
            parts["adv"].append(advantages.reshape(-1))
            parts["ret"].append(returns.reshape(-1))
    if not parts["obs"]:
        empty = torch.zeros(0)
        rollout = TaskRollout(
            obs=torch.zeros(0, D), actions=empty, logprobs=empty, rewards=empty,
            episode_ends=empty, values=empty, next_value=empty,
        )  # fmt: skip
        return RemoteBatch(rollout, 0, dropped, bootstraps)
    actions = torch.cat(parts["actions"])
    actions = actions.long() if head.distribution == "categorical" else actions.float()
    advantages = torch.cat(parts["adv"])
    if config.norm_adv and advantages.numel() > 1:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    n = advantages.numel()
    rollout = TaskRollout(
        obs=torch.cat(parts["obs"]),
        actions=actions,
        logprobs=torch.cat(parts["logprobs"]),
        rewards=torch.zeros(n),
        episode_ends=torch.zeros(n),
        values=torch.cat(parts["values"]),
        next_value=torch.zeros(0),
        advantages=advantages,
        returns=torch.cat(parts["ret"]),
    )
    return RemoteBatch(rollout, n, dropped, bootstraps)


# ============================================================================================================
# Phases 2 and 3: advantages and the PPO update of the head alone
# ============================================================================================================
class HeadLearner:
    """Adam over one task's head (and own encoder) parameters; :meth:`update` runs PPO epochs on a rollout
    of that task."""

    def __init__(self, policy: MultiTaskPolicy, task_id: str, config: PPOConfig, *, seed: int) -> None:
        self.policy = policy
        self.task_id = task_id
        # Gradient surgery acts on shared trunk weights; with one task and a frozen trunk there are none.
        self.config = replace(config, grad_surgery="none", log_grad_cosines=False, task_weights=())
        # The head, and the task's own encoder when it has one (shared encoders are frozen).
        trainable = [
            p
            for p in (*policy.head(task_id).parameters(), *policy.encoder_of(task_id).parameters())
            if p.requires_grad
        ]
        self.optimizer = torch.optim.Adam(trainable, lr=config.learning_rate, eps=1e-5)
        self.generator = torch.Generator().manual_seed(seed)
        self.updates = 0

    def set_lr_fraction(self, frac: float) -> None:
        """Anneal: the learning rate is ``frac`` of the configured one (when ``anneal_lr``)."""
        if self.config.anneal_lr:
            self.optimizer.param_groups[0]["lr"] = max(frac, 0.0) * self.config.learning_rate

    def update(self, rollout: TaskRollout, *, advantages_ready: bool = False) -> UpdateStats:
        """GAE (unless the batch already has advantages) then ``update_epochs`` epochs of clipped PPO."""
        rollouts = {self.task_id: rollout}
        if not advantages_ready:
            compute_advantages(rollouts, self.config)
        self.policy.head(self.task_id).train()
        stats = ppo_update(
            self.policy, self.optimizer, rollouts, {self.task_id: 1.0}, self.config, generator=self.generator
        )
        self.updates += 1
        return stats
