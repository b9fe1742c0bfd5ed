"""The updater's parts one at a time: rollout collection, ``rollout_from_segments`` (version runs, stale
and deterministic steps, poisoned segments, truncation bootstrap), one PPO update with a known direction,
the statistics and the guard on synthetic episodes (A/A and a real regression)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from updater_helpers import OLD_TASKS

from polyhead.taskspec import load_task_spec
from polyhead.trainer.adapt import ADAPT_PPO
from polyhead.trainer.envs import TaskEnvs
from polyhead.trainer.policy import MultiTaskPolicy, load_policy
from polyhead.trainer.ppo import TaskState
from polyhead.trainer.running_stats import RunningMeanStd
from polyhead.trainer.updater.frozen import freeze_trunk
from polyhead.trainer.updater.guard import GuardedRollout, LiveReturns
from polyhead.trainer.updater.head_ppo import (
    HeadLearner,
    SegmentData,
    collect_head_rollout,
    rollout_from_segments,
)
from polyhead.trainer.updater.stats import mann_whitney_less, rankdata, worse_than

TASK = load_task_spec("cartpole-family:cartpole-reversed")
PPO = replace(ADAPT_PPO, norm_reward=False, norm_adv=False, gamma=0.9, gae_lambda=1.0)


@pytest.fixture
def policy(random_bundle: Path) -> MultiTaskPolicy:
    policy = load_policy(random_bundle)
    freeze_trunk(policy)
    policy.add_head(TASK.id, policy.action_spaces[OLD_TASKS[0]])
    return policy


def _segment(
    T: int,
    *,
    versions: tuple[int, ...] | None = None,
    terminated: bool = True,
    truncated: bool = False,
    rewards: np.ndarray | None = None,
    next_observation: np.ndarray | None = None,
    deterministic: tuple[bool, ...] = (),
    seed: int = 0,
    **fields: Any,
) -> SegmentData:
    rng = np.random.default_rng(seed)
    return SegmentData(
        episode_id=fields.pop("episode_id", f"e{seed}"),
        observations=(rng.standard_normal((T, 4)) * 0.1).astype(np.float32),
        actions=rng.integers(0, 2, T).astype(np.int64),
        log_probs=np.full(T, math.log(0.5), np.float32),
        rewards=np.ones(T, np.float32) if rewards is None else rewards.astype(np.float32),
        head_versions=versions or (1,) * T,
        terminated=terminated,
        truncated=truncated,
        episode_return=float(T) if (terminated or truncated) else math.nan,
        next_observation=next_observation,
        deterministic=deterministic,
        **fields,
    )


# --- collection ----------------------------------------------------------------------------------------
def test_collect_head_rollout_records_what_the_head_did(policy: MultiTaskPolicy) -> None:
    config = replace(PPO, envs_per_task=2, num_steps=64)
    envs = TaskEnvs(TASK, 2, policy.observation_size, seed=3)
    state = TaskState(task=TASK, envs=envs, weight=1.0)
    count_before = policy.encoder_of(TASK.id).normalizer.count.item()
    try:
        rollout = collect_head_rollout(policy, state, config)
    finally:
        envs.close()
    assert rollout.obs.shape == (64, 2, policy.observation_size)
    assert rollout.actions.shape == (64, 2) and set(rollout.actions.unique().tolist()) <= {0, 1}
    head = policy.head(TASK.id)
    with torch.no_grad():
        features = policy.features(rollout.obs.reshape(-1, policy.observation_size), TASK.id)
        logp = head.log_prob(head.dist(features), rollout.actions.reshape(-1))
    # The recorded log-probs are the head's log-probs of the recorded actions on the recorded states.
    torch.testing.assert_close(logp, rollout.logprobs.reshape(-1), atol=1e-5, rtol=1e-5)
    assert (rollout.logprobs <= 0).all()
    # CartPole pays 1 per step (norm_reward off); a random head ends episodes well within 64 steps.
    assert rollout.episode_ends.sum() >= 1
    assert torch.all(rollout.rewards == 1.0)
    assert policy.encoder_of(TASK.id).normalizer.count.item() == count_before  # only read


# --- rollout_from_segments -------------------------------------------------------------------------------
def test_runs_are_split_by_version_and_stale_and_deterministic_steps_dropped(policy: MultiTaskPolicy) -> None:
    versions = (1, 1, 2, 2, 2, 3, 3, 1, 1, 1)
    det = (False,) * 8 + (True, False)
    seg = _segment(10, versions=versions, deterministic=det, seed=1)
    batch = rollout_from_segments(
        policy,
        TASK.id,
        [seg],
        allowed_versions={1: True, 2: False},  # 2 is stale (rolled back); 3 was never ours
        return_rms=RunningMeanStd(),
        config=PPO,
    )
    # Kept: steps 0-1 (v1), 7 (v1, sampled), 9 (v1, sampled); step 8 is deterministic.
    assert batch.steps == 4
    assert batch.dropped["stale"] == 3
    assert batch.dropped["unknown_version"] == 2
    assert batch.dropped["deterministic"] == 1
    kept = [0, 1, 7, 9]
    np.testing.assert_array_equal(batch.rollout.actions.numpy(), seg.actions[kept])
    # Each run bootstraps from the step after it: run [0, 2) from V(obs[2]), so its return at step 1 is
    # r + γ V(obs[2]); the last run (step 9) ends in termination: its return is r alone.
    head = policy.head(TASK.id)
    with torch.no_grad():
        from polyhead.spaces import pad_observations

        obs = policy.normalize(
            torch.as_tensor(pad_observations(seg.observations, policy.observation_size)), TASK.id
        )
        values = head.value(policy.features(obs, TASK.id), obs)
    returns = batch.rollout.returns.numpy()
    assert returns[1] == pytest.approx(1.0 + PPO.gamma * float(values[2]), abs=1e-5)
    assert returns[3] == pytest.approx(1.0, abs=1e-6)


def test_truncation_bootstraps_from_the_final_observation_or_says_it_approximated(
    policy: MultiTaskPolicy,
) -> None:
    final = np.full(4, 0.05, np.float32)
    cut = _segment(3, terminated=False, truncated=True, next_observation=final, seed=2)
    bare = replace(cut, next_observation=None)
    head = policy.head(TASK.id)
    from polyhead.spaces import pad_observations

    def value_of(obs: np.ndarray) -> float:
        with torch.no_grad():
            x = policy.normalize(
                torch.as_tensor(pad_observations(obs.reshape(1, -1), policy.observation_size)), TASK.id
            )
            return float(head.value(policy.features(x, TASK.id), x)[0])

    exact = rollout_from_segments(
        policy, TASK.id, [cut], allowed_versions={1: True}, return_rms=RunningMeanStd(), config=PPO
    )
    approx = rollout_from_segments(
        policy, TASK.id, [bare], allowed_versions={1: True}, return_rms=RunningMeanStd(), config=PPO
    )
    assert exact.bootstraps == {"next_observation": 1, "last_observation": 0}
    assert approx.bootstraps == {"next_observation": 0, "last_observation": 1}
    assert float(exact.rollout.returns[-1]) == pytest.approx(1.0 + PPO.gamma * value_of(final), abs=1e-5)
    assert float(approx.rollout.returns[-1]) == pytest.approx(
        1.0 + PPO.gamma * value_of(cut.observations[-1]), abs=1e-5
    )


def test_poisoned_segments_are_skipped_and_counted_never_a_crash(policy: MultiTaskPolicy) -> None:
    good = _segment(5, seed=3)
    nan_reward = replace(_segment(4, seed=4), rewards=np.array([1, np.nan, 1, 1], np.float32))
    inf_obs = _segment(3, seed=5)
    inf_obs.observations[1, 2] = np.inf
    bad_action = replace(_segment(3, seed=6), actions=np.array([0, 7, 1], np.int64))
    positive_logp = replace(_segment(2, seed=7), log_probs=np.array([-0.1, 0.4], np.float32))
    short = replace(_segment(3, seed=8), log_probs=np.zeros(2, np.float32))
    rms = RunningMeanStd()
    batch = rollout_from_segments(
        policy,
        TASK.id,
        [nan_reward, inf_obs, bad_action, positive_logp, short, good],
        allowed_versions={1: True},
        return_rms=rms,
        config=replace(PPO, norm_reward=True),
    )
    assert batch.steps == 5
    assert batch.dropped["non_finite"] == 4 + 3 + 2
    assert batch.dropped["invalid_action"] == 3
    assert batch.dropped["malformed"] == 3
    assert np.isfinite(rms.std) and torch.isfinite(batch.rollout.returns).all()
    HeadLearner(policy, TASK.id, PPO, seed=0).update(batch.rollout, advantages_ready=True)
    assert all(torch.isfinite(p).all() for p in policy.head(TASK.id).parameters())


# --- one PPO update with a known direction -------------------------------------------------------------
def test_one_ppo_update_moves_probability_towards_the_rewarded_action(policy: MultiTaskPolicy) -> None:
    """On one state, action 1 earned +1 and action 0 earned -1 (one-step episodes): the update must raise
    pi(1 | s) and lower pi(0 | s), and touch nothing but the head."""
    obs = np.tile(np.asarray([[0.02, -0.01, 0.03, 0.01]], np.float32), (64, 1))
    actions = np.tile(np.asarray([0, 1], np.int64), 32)
    head = policy.head(TASK.id)
    with torch.no_grad():
        from polyhead.spaces import pad_observations

        x = policy.normalize(torch.as_tensor(pad_observations(obs[:1], policy.observation_size)), TASK.id)
        logits = head.actor_params(policy.features(x, TASK.id))[0]
        logp_before = torch.log_softmax(logits, -1)[0]
    segments = [
        SegmentData(
            episode_id=f"s{i}",
            observations=obs[i : i + 1],
            actions=actions[i : i + 1],
            log_probs=np.asarray([float(logp_before[actions[i]])], np.float32),
            rewards=np.asarray([1.0 if actions[i] == 1 else -1.0], np.float32),
            head_versions=(1,),
            terminated=True,
            truncated=False,
            episode_return=0.0,
            next_observation=None,
        )
        for i in range(64)
    ]
    batch = rollout_from_segments(
        policy, TASK.id, segments, allowed_versions={1: True}, return_rms=RunningMeanStd(), config=PPO
    )
    trunk_before = {k: v.clone() for k, v in policy.trunk.state_dict().items()}
    HeadLearner(policy, TASK.id, replace(PPO, update_epochs=1), seed=0).update(
        batch.rollout, advantages_ready=True
    )
    with torch.no_grad():
        logp_after = torch.log_softmax(head.actor_params(policy.features(x, TASK.id))[0], -1)[0]
    assert logp_after[1] > logp_before[1] + 1e-4
    assert logp_after[0] < logp_before[0] - 1e-4
    assert all(torch.equal(v, trunk_before[k]) for k, v in policy.trunk.state_dict().items())


# --- statistics ----------------------------------------------------------------------------------------
def test_rank_test_false_alarm_rate_is_at_most_alpha_and_it_sees_real_differences() -> None:
    rng = np.random.default_rng(0)
    assert rankdata([3.0, 1.0, 3.0, 2.0]).tolist() == [3.5, 1.0, 3.5, 2.0]
    trials, alpha = 2000, 0.05

    # A/A on skewed, heavily tied returns (CartPole-like: a third of the episodes hit the 500 cap).
    def returns(n: int, scale: float = 1.0) -> np.ndarray:
        return np.minimum(rng.exponential(300 * scale, n).round(), 500)

    false_alarms = sum(
        worse_than(returns(8), returns(16), margin=0.0, alpha=alpha).worse for _ in range(trials)
    )
    assert false_alarms / trials <= alpha + 0.015, false_alarms / trials
    # A real regression (episodes a tenth as long) is seen nearly always with 8 vs 16 episodes; a milder
    # one (a fifth as long) most of the time: the price of a stated 5 % false-alarm rate at n = 8.
    hits = sum(worse_than(returns(8, 0.1), returns(16), margin=0.0, alpha=alpha).worse for _ in range(200))
    assert hits / 200 >= 0.95
    hits = sum(worse_than(returns(8, 0.2), returns(16), margin=0.0, alpha=alpha).worse for _ in range(200))
    assert hits / 200 >= 0.8
    # All ties (every episode solved on both sides): no evidence, never a rollback.
    assert mann_whitney_less([500.0] * 8, [500.0] * 16) == 1.0
    # The margin tolerates a small, real drop.
    assert not worse_than([450.0] * 8, [500.0] * 16, margin=100.0, alpha=alpha).worse


# --- the guard on synthetic episodes -------------------------------------------------------------------
def _episodes(
    live: LiveReturns, version: int, returns: np.ndarray, *, start_ordinal: int = 0, mode_det: bool = False
) -> None:
    """Feed whole one-segment episodes, in the order they would *finish* (shortest first)."""
    order = np.argsort(returns, kind="stable")  # CartPole: a longer episode has the larger return
    for i in order:
        T = 3
        live.observe(
            SegmentData(
                episode_id=f"v{version}-{start_ordinal + i}",
                observations=np.zeros((T, 4), np.float32),
                actions=np.zeros(T, np.int64),
                log_probs=np.zeros(T, np.float32),
                rewards=np.zeros(T, np.float32),
                head_versions=(version,) * T,
                terminated=True,
                truncated=False,
                episode_return=float(returns[i]),
                next_observation=None,
                deterministic=(True,) * T if mode_det else (),
                start_step=0,
                episode_ordinal=start_ordinal + int(i),
            )
        )


def test_guard_waits_for_the_first_episodes_to_start_not_the_first_to_finish() -> None:
    live = LiveReturns()
    rng = np.random.default_rng(1)
    _episodes(live, 1, np.minimum(rng.exponential(300, 40).round() + 10, 500))
    guard = GuardedRollout(live, new_version=2, previous_version=1, margin=0.2, min_episodes=8, alpha=0.05)
    new = np.minimum(rng.exponential(300, 8).round() + 10, 500)
    # The 6 shortest of the cohort have finished; the 2 longest are still running: no verdict yet (the
    # old guard judged these short ones and called the version a regression).
    order = np.argsort(new)
    for i in order[:6]:
        _episodes(live, 2, np.asarray([new[i]]), start_ordinal=int(i))
    assert guard.decide().verdict == "pending"
    for i in order[6:]:
        _episodes(live, 2, np.asarray([new[i]]), start_ordinal=int(i))
    decision = guard.decide()
    assert decision.verdict != "pending" and decision.episodes == 8
    assert decision.new_mean == pytest.approx(float(new.mean()))


def test_guard_a_a_false_rollbacks_and_regression_detection_on_synthetic_episodes() -> None:
    rng = np.random.default_rng(2)

    def draw(n: int) -> np.ndarray:
        # A partly trained CartPole head, sampled: half the episodes reach the 500 cap, the rest anywhere.
        return np.where(rng.random(n) < 0.5, 500.0, rng.uniform(30, 500, n).round())

    trials = 400
    false_rollbacks = detected = 0
    for _ in range(trials):
        live = LiveReturns()
        _episodes(live, 1, draw(32))
        _episodes(live, 2, draw(8))  # the same head republished
        aa = GuardedRollout(live, 2, 1, margin=0.2, min_episodes=8, alpha=0.05).decide()
        false_rollbacks += aa.verdict == "regressed"
        # Negated logits: the pole falls within 8-12 steps.
        _episodes(live, 3, rng.integers(8, 13, 8).astype(float))
        bad = GuardedRollout(live, 3, 1, margin=0.2, min_episodes=8, alpha=0.05).decide()
        detected += bad.verdict == "regressed"
    assert false_rollbacks / trials <= 0.05, false_rollbacks / trials
    assert detected / trials >= 0.95, detected / trials


def test_guard_compares_like_with_like_modes_and_checks_the_floor() -> None:
    live = LiveReturns()
    _episodes(live, 1, np.full(16, 500.0), mode_det=True)  # deterministic evaluation episodes of v1
    _episodes(live, 2, np.full(8, 20.0))  # sampled episodes of v2: no sampled reference for v1
    # v2 has no comparable v1 episodes (different mode): held against v1, but below the sampled floor.
    decision = GuardedRollout(
        live, 2, 1, margin=0.2, min_episodes=8, alpha=0.05, floor=tuple([200.0] * 16)
    ).decide()
    assert decision.test is None
    assert decision.verdict == "below_floor"
    # A mixed episode (started under v1, ended under v2) counts for neither version.
    mixed = LiveReturns()
    mixed.observe(
        SegmentData(
            episode_id="m",
            observations=np.zeros((2, 4), np.float32),
            actions=np.zeros(2, np.int64),
            log_probs=np.zeros(2, np.float32),
            rewards=np.zeros(2, np.float32),
            head_versions=(1, 2),
            terminated=True,
            truncated=False,
            episode_return=2.0,
            next_observation=None,
        )
    )
    assert mixed.finished(1) == [] and mixed.finished(2) == []


def test_the_version_rolled_back_to_keeps_its_reference_after_newer_versions_came_and_went() -> None:
    """Found with live clients: after several rolled-back versions, the version serving again must still
    have its cohort as the reference (versions are forgotten least recently observed first, not by number)."""
    live = LiveReturns(keep_versions=4)
    _episodes(live, 1, np.full(16, 470.0))
    for bad in range(2, 7):
        _episodes(live, bad, np.full(8, 9.0))  # each one judged and rolled back to version 1
        _episodes(live, 1, np.full(2, 470.0), start_ordinal=16 + 2 * bad)  # version 1 serves again
    decision = GuardedRollout(live, 6, 1, margin=0.2, min_episodes=8, alpha=0.05).decide()
    assert decision.test is not None and decision.test.n_reference == 16
    assert decision.verdict == "regressed"


def test_operate_counts_a_verdict_by_the_effective_size_of_both_samples() -> None:
    from polyhead.stats import mann_whitney_less
    from polyhead.trainer.operate import effective_episodes

    assert effective_episodes(20, 20) == 20.0
    assert effective_episodes(14, 42) == 21.0  # a 25 % canary: 14 of its episodes judge like 21 of each
    assert effective_episodes(0, 500) == 0.0 and effective_episodes(5, 0) == 0.0
    assert effective_episodes(10, 10_000) < 20.0  # the smaller side still bounds it: never below n/2 each
    # Why it is the right count: the same shift gives the rank test about the same p-value at 14/42 as at
    # 21/21 (its standard error depends on n1 n2 / (n1 + n2)), and a clearly worse one at 14/14.
    rng = np.random.default_rng(0)

    def mean_p(n1: int, n2: int) -> float:
        return float(np.mean([
            mann_whitney_less(rng.normal(0.0, 1.0, n2), rng.normal(0.8, 1.0, n1)) for _ in range(400)
        ]))  # fmt: skip

    equal, split, fewer = mean_p(21, 21), mean_p(14, 42), mean_p(14, 14)
    assert abs(split - equal) < 0.5 * (fewer - equal)
