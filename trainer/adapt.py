"""The online updater: a new task gets its own head on the frozen trunk, and nothing else changes.

``adapt(AdaptConfig) -> AdaptResult`` is what ``polyhead adapt`` runs (and what ``polyhead demo`` can call
in-process). One run, in order:

1. **Load and freeze.** Open the bundle (trunk sha256 verified), rebuild the torch policy from the trunk
   checkpoint, freeze the trunk (no gradient, normaliser only read) and fingerprint it: the sha256 of
   ``trunk.onnx``, a hash of every trunk tensor (parameters and normaliser statistics), the other heads'
   tensors and every bundle file of the trunk and of other tasks (:mod:`polyhead.trainer.updater.frozen`).
2. **Floor.** Evaluate every old head zero-shot on the new task (:mod:`polyhead.trainer.updater.floor`); the
best
   one is both the "nearest" starting point and the bar a new head must beat.
3. **Train the head.**

   * ``local``: gymnasium envs built from the task spec. ``--init both`` trains a fresh head and one
     started from the nearest old head side by side, each on half the budget; the better is kept.
   * ``remote``: the head is registered with the running server (version 1), clients act on it with
     sampled actions, and the updater learns from ``HeadAdmin.StreamExperience``: values recomputed with
     its own critic, PPO on the log-probs recorded from the acting version, steps from versions older
     than ``max_version_lag`` (or rolled back) dropped. A new version is published every
     ``publish_every`` updates and judged on live returns by the guarded rollout
     (:mod:`polyhead.trainer.updater.guard`); a regression rolls it back (server and bundle pointer) and
     rewinds
     the learner.

4. **Publish only what beats the floor.** Every version is exported, parity-checked, written atomically
   and loaded into the server (:mod:`polyhead.trainer.updater.publisher`). When no trained head beats the
   best old
   head on the same evaluation episodes, the task is served by a copy of that old head, and the result
   says so.
5. **Prove nothing else moved.** The fingerprint is taken again and must be identical (else
   :class:`~polyhead.trainer.updater.frozen.TrunkChanged`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from polyhead.bundle import Bundle
from polyhead.envs import validate_task
from polyhead.errors import InvalidTaskSpec
from polyhead.spaces import SpaceSpec, observation_size
from polyhead.taskspec import TaskSpec
from polyhead.trainer.config import PPOConfig
from polyhead.trainer.envs import TaskEnvs
from polyhead.trainer.evaluate import evaluate
from polyhead.trainer.export import sample_observations, sample_task_observations
from polyhead.trainer.policy import (
    EncoderArch,
    MultiTaskPolicy,
    TaskAdapter,
    TaskHead,
    TaskSlot,
    load_policy,
)
from polyhead.trainer.ppo import TaskState
from polyhead.trainer.running_stats import RunningMeanStd
from polyhead.trainer.updater.config import ADAPT_PPO, AdaptConfig, Init, Source
from polyhead.trainer.updater.control import NoExperience, ServerControl
from polyhead.trainer.updater.floor import Floor, zero_shot_floor
from polyhead.trainer.updater.frozen import Fingerprint, freeze_trunk
from polyhead.trainer.updater.guard import RolloutGuard
from polyhead.trainer.updater.head_ppo import (
    DROP_REASONS,
    HeadLearner,
    SegmentData,
    collect_head_rollout,
    rollout_from_segments,
)
from polyhead.trainer.updater.metrics import UpdaterMetrics
from polyhead.trainer.updater.publisher import HeadPublisher, Published

log = logging.getLogger("polyhead.trainer.adapt")

FLOOR_SEED_OFFSET = 700_000  # the floor and every compared head: identical initial states
CURVE_SEED_OFFSET = 800_000  # periodic evaluations along a learning curve
ENV_SEED_OFFSET = 900_000

__all__ = [
    "ADAPT_PPO",
    "AdaptConfig",
    "AdaptResult",
    "CandidateResult",
    "Init",
    "Source",
    "adapt",
    "default_config",
]


@dataclass
class CandidateResult:
    """One head trained locally from one starting point."""

    name: str  # "scratch" or "nearest:<old task>"
    steps: int
    final_return: float  # on the floor's episodes
    start_return: float  # the starting head, 0 samples, on the same episodes as final_return
    curve: list[tuple[int, float]]  # (new-task samples, deterministic eval return)
    state: dict[str, torch.Tensor] = field(repr=False)


@dataclass
class AdaptResult:
    """What an adaptation run did; :meth:`summary` is the ``--json`` line."""

    task: str
    source: Source
    steps: int
    wall_seconds: float
    versions_published: int
    final_eval_return: float
    zero_shot: Floor
    rolled_back: bool
    rollbacks: int
    trunk_sha256_before: str
    trunk_sha256_after: str
    trunk_state_sha256_before: str
    trunk_state_sha256_after: str
    active_version: int
    served_by: str  # "trained:<start>" or "copy:<old task>"
    candidates: list[CandidateResult] = field(default_factory=list)
    versions: list[dict[str, Any]] = field(default_factory=list)
    dropped_steps: dict[str, int] = field(default_factory=dict)
    bootstraps: dict[str, int] = field(default_factory=dict)
    updates: int = 0
    metrics_port: int | None = None
    served_version: int | None = None  # the task's active version on --server's data plane at the end
    # The head training started from, at 0 samples, on the same evaluation episodes as final_eval_return:
    # a head counts as trained only when the final return beats it.
    start_eval_return: float = math.nan

    @property
    def beat_floor(self) -> bool:
        return self.served_by.startswith("trained")

    @property
    def beat_start(self) -> bool:
        return self.final_eval_return > self.start_eval_return

    def summary(self) -> dict[str, Any]:
        best = self.zero_shot.best_head
        return {
            "task": self.task,
            "source": self.source,
            "steps": self.steps,
            "wall_seconds": round(self.wall_seconds, 2),
            "versions_published": self.versions_published,
            "final_eval_return": self.final_eval_return,
            "zero_shot_best": {"head": best, "return": self.zero_shot.best_return if best else None},
            "rolled_back": self.rolled_back,
            "trunk_sha256_before": self.trunk_sha256_before,
            "trunk_sha256_after": self.trunk_sha256_after,
            # Beyond the fixed keys above: the 0-sample start beside the final return.
            "start_eval_return": self.start_eval_return,
            "beat_start": self.beat_start,
            "trunk_state_sha256_before": self.trunk_state_sha256_before,
            "trunk_state_sha256_after": self.trunk_state_sha256_after,
            "rollbacks": self.rollbacks,
            "active_version": self.active_version,
            "served_by": self.served_by,
            "beat_zero_shot": self.beat_floor,
            "zero_shot": self.zero_shot.returns,
            "candidates": {
                c.name: {"start_return": c.start_return, "final_return": c.final_return, "steps": c.steps}
                for c in self.candidates
            },
            "versions": self.versions,
            "updates": self.updates,
            "dropped_steps": self.dropped_steps,
            "truncation_bootstraps": self.bootstraps,
            "served_version": self.served_version,
        }


# ============================================================================================================
# Shared pieces
# ============================================================================================================
@dataclass
class _Run:
    """The state every phase of one run reads."""

    config: AdaptConfig
    bundle: Bundle
    policy: MultiTaskPolicy
    task: TaskSpec
    observation_space: SpaceSpec
    action_space: SpaceSpec
    old_tasks: list[str]
    metrics: UpdaterMetrics
    progress: Callable[[int, str], None]
    #: The starting state of the task's own encoder (None: it shares an old group's, frozen).
    encoder_start: dict[str, torch.Tensor] | None = None
    #: The shared group's encoder.onnx bytes, published unchanged with every version (None: own encoder).
    shared_encoder: bytes | None = None

    @property
    def ppo(self) -> PPOConfig:
        return self.config.ppo

    def head(self) -> TaskAdapter:
        """What this run trains and publishes: the head, and the task's own encoder if it has one."""
        return self.policy.adapter(self.task.id)

    def _with_encoder(self, head_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        state = {f"head.{k}": v for k, v in head_state.items()}
        if self.encoder_start is not None:
            state.update({f"encoder.{k}": v.clone() for k, v in self.encoder_start.items()})
        return state

    def evaluate_head(self) -> float:
        """The new task's head on the floor's episodes (same seeds as every old head's zero-shot)."""
        returns = evaluate(
            self.policy,
            [self.task],
            episodes=self.config.zero_shot_episodes,
            seed=self.ppo.seed + FLOOR_SEED_OFFSET,
        )
        return float(np.mean(returns[self.task.id]))

    def fresh_state(self, seed: int) -> dict[str, torch.Tensor]:
        """A freshly initialised head's parameters (seeded, without touching the global RNG)."""
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            critic_input = self.policy.encoder_of(self.task.id).input_size
            fresh = TaskHead(self.action_space, critic_input, self.policy.config)
        return self._with_encoder(fresh.state_dict())

    def old_state(self, old_task: str) -> dict[str, torch.Tensor]:
        return self._with_encoder({k: v.clone() for k, v in self.policy.head(old_task).state_dict().items()})


def _prepare(config: AdaptConfig, metrics: UpdaterMetrics, progress: Callable[[int, str], None]) -> _Run:
    bundle = Bundle.open(config.bundle)
    task = config.task
    obs_space, act_space = validate_task(task)
    policy = load_policy(bundle)
    old_tasks = list(policy.task_ids)
    if task.id in old_tasks:
        raise InvalidTaskSpec(
            f"task {task.id!r} is one of the tasks the trunk was trained with ({', '.join(old_tasks)}); "
            "adapt adds a new task: give its spec another id"
        )
    freeze_trunk(policy)
    width = observation_size(obs_space)
    found = _group_reading(bundle, policy, obs_space)
    group = found[0] if found is not None else None
    run = _Run(config, bundle, policy, task, obs_space, act_space, old_tasks, metrics, progress)
    if found is not None and config.encoder == "share":
        group, member = found
        policy.add_head(task.id, act_space, TaskSlot(encoder=group, observation_size=width))
        run.shared_encoder = _group_encoder_bytes(bundle, member)
        log.info("%s shares encoder %r (frozen): its observation space is the group's", task.id, group)
    else:
        if group is not None:
            encoder = policy.add_encoder(replace(policy.encoder(group).arch, name=task.id))
            encoder.load_state_dict(policy.encoder(group).state_dict())
            log.info("%s: own encoder, a copy of group %r, trained with the head", task.id, group)
        else:
            with torch.random.fork_rng():
                torch.manual_seed(config.ppo.seed)
                encoder = policy.add_encoder(_fresh_arch(config, task.id, width))
            # The new normaliser's statistics come once from random-action observations and then stay
            # fixed: every published version and the server's experience then share one input scale.
            sample = sample_task_observations([task], steps_per_task=512, seed=config.ppo.seed)
            encoder.normalizer.update(sample[task.id])
            log.info(
                "%s: unseen observation space (%d values): a fresh %s encoder, trained with the head",
                task.id,
                width,
                encoder.arch.kind,
            )
        encoder.eval()
        policy.add_head(task.id, act_space, TaskSlot(encoder=task.id, observation_size=width))
        run.encoder_start = {k: v.clone() for k, v in encoder.state_dict().items()}
    metrics.init_task(task.id)
    return run


def _group_reading(bundle: Bundle, policy: MultiTaskPolicy, obs_space: SpaceSpec) -> tuple[str, str] | None:
    """(encoder group, member task) of an old task whose observation space is ``obs_space`` (None:
    an unseen space)."""
    served = set(bundle.task_ids())
    for task_id, slot in policy.slots.items():
        if (
            task_id in served
            and bundle.head(task_id).meta.observation_space == obs_space
            and slot.observation_size == policy.encoder(slot.encoder).input_size
        ):
            return slot.encoder, task_id
    return None


def _group_encoder_bytes(bundle: Bundle, member: str) -> bytes:
    """The group's encoder.onnx as training exported it (the member task's first version)."""
    data = bundle.head(member, bundle.versions(member)[0]).read_encoder()
    if data is None:
        raise InvalidTaskSpec(f"bundle {bundle.root}: task {member!r} has no encoder.onnx")
    return data


def _fresh_arch(config: AdaptConfig, name: str, width: int) -> EncoderArch:
    if config.encoder_kind == "mlp":
        return EncoderArch(name=name, input_size=width)
    try:
        shape = tuple(int(v) for v in config.encoder_kind.removeprefix("cnn:").split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or math.prod(shape) > width:
        raise InvalidTaskSpec(
            f"--encoder-kind {config.encoder_kind!r}: expected cnn:H,W,C with H*W*C at most the task's "
            f"{width} observation values"
        )
    return EncoderArch(name=name, input_size=width, kind="cnn", image_shape=shape)


def _training_summary(
    run: _Run, *, start: str, steps: int, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "algorithm": "head-only PPO on a frozen trunk (polyhead adapt)",
        "source": run.config.source,
        "start": start,
        "steps": steps,
        "seed": run.ppo.seed,
        **(extra or {}),
    }


# ============================================================================================================
# Local: train candidates on envs built from the task spec
# ============================================================================================================
def train_candidate(
    run: _Run, name: str, init_state: dict[str, torch.Tensor], budget: int, *, seed: int
) -> CandidateResult:
    """Head-only PPO from ``init_state`` for ``budget`` new-task samples; keeps the best evaluated state.

    Evaluates every ``eval_interval`` samples (deterministic, ``eval_episodes``) for the learning curve;
    stops early after ``solved_evals`` evaluations in a row at the task's target return. The kept state is
    then scored on the floor's episodes.
    """
    ppo = run.ppo
    policy, task = run.policy, run.task
    head = run.head()
    head.load_state_dict(init_state)
    start_return = run.evaluate_head()
    learner = HeadLearner(policy, task.id, ppo, seed=seed)
    envs = TaskEnvs(task, ppo.envs_per_task, policy.observation_size, seed=seed * 10_000 + ENV_SEED_OFFSET)
    state = TaskState(task=task, envs=envs, weight=1.0, return_rms=RunningMeanStd())
    per_iteration = ppo.envs_per_task * ppo.num_steps
    iterations = max(1, math.ceil(budget / per_iteration))

    def curve_eval() -> float:
        returns = evaluate(policy, [task], episodes=ppo.eval_episodes, seed=ppo.seed + CURVE_SEED_OFFSET)
        return float(np.mean(returns[task.id]))

    steps = 0
    first = curve_eval()
    curve = [(0, first)]
    best = (first, {k: v.clone() for k, v in head.state_dict().items()})
    next_eval, streak = ppo.eval_interval, 0
    try:
        for iteration in range(iterations):
            learner.set_lr_fraction(1.0 - iteration / iterations)
            rollout = collect_head_rollout(policy, state, ppo)
            steps += per_iteration
            learner.update(rollout)
            run.metrics.samples.labels(task=task.id).inc(per_iteration)
            run.metrics.updates.labels(task=task.id).inc()
            run.progress(per_iteration, f"{name}: return {state.recent_return:.1f}")
            if steps >= next_eval or iteration == iterations - 1:
                next_eval = (steps // ppo.eval_interval + 1) * ppo.eval_interval
                value = curve_eval()
                curve.append((steps, value))
                log.info("%s %s @ %s samples: eval return %.1f", task.id, name, f"{steps:,}", value)
                if value > best[0]:
                    best = (value, {k: v.clone() for k, v in head.state_dict().items()})
                solved = not math.isnan(task.target_return) and value >= task.target_return
                streak = streak + 1 if solved else 0
                if ppo.solved_evals and streak >= ppo.solved_evals:
                    log.info("%s %s reached the target in %d evaluations in a row", task.id, name, streak)
                    break
    finally:
        envs.close()
    head.load_state_dict(best[1])
    final = run.evaluate_head()
    return CandidateResult(
        name=name, steps=steps, final_return=final, start_return=start_return, curve=curve, state=best[1]
    )


def _adapt_local(
    run: _Run, floor: Floor, publisher: HeadPublisher
) -> tuple[int, list[CandidateResult], str, float]:
    config, ppo = run.config, run.ppo
    starts: list[tuple[str, dict[str, torch.Tensor]]] = []
    nearest = floor.best_head
    if config.init in ("scratch", "both") or nearest is None:
        starts.append(("scratch", run.fresh_state(ppo.seed)))
    if config.init in ("nearest", "both") and nearest is not None:
        starts.append((f"nearest:{nearest}", run.old_state(nearest)))
    budget = max(1, ppo.total_steps // len(starts))
    candidates = [
        train_candidate(run, name, state, budget, seed=ppo.seed + 17 * i)
        for i, (name, state) in enumerate(starts)
    ]
    steps = sum(c.steps for c in candidates)
    best = max(candidates, key=lambda c: c.final_return)
    for c in candidates:
        log.info(
            "candidate %s: %s samples, return %.1f on the floor's episodes",
            c.name,
            f"{c.steps:,}",
            c.final_return,
        )
    if nearest is None or best.final_return > floor.best_return:
        run.head().load_state_dict(best.state)
        served_by = f"trained:{best.name}"
        publisher.publish(
            eval_return=best.final_return,
            training=_training_summary(
                run,
                start=best.name,
                steps=best.steps,
                extra={"start_eval_return": best.start_return, "curve": best.curve},
            ),
            parent=nearest if best.name.startswith("nearest") else None,
            note=f"trained from {best.name}",
        )
    else:
        log.warning(
            "no trained head beat the best old head %s (%.1f vs %.1f): serving %s a copy of it",
            nearest,
            best.final_return,
            floor.best_return,
            run.task.id,
        )
        run.head().load_state_dict(run.old_state(nearest))
        served_by = f"copy:{nearest}"
        publisher.publish(
            eval_return=floor.best_return,
            training=_training_summary(run, start=served_by, steps=0),
            parent=nearest,
            note=f"copy of {nearest}: no trained head beat it",
        )
    return steps, candidates, served_by, best.start_return


# ============================================================================================================
# Remote: learn from the server's experience feed, publish versions, guard them
# ============================================================================================================
@dataclass
class _RemoteState:
    lineage: list[int] = field(default_factory=list)  # published versions that were not rolled back
    rolled_back: set[int] = field(default_factory=set)
    active: int = 0
    rollbacks: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    bootstraps: dict[str, int] = field(default_factory=lambda: {"next_observation": 0, "last_observation": 0})
    copy_version: int | None = None  # the published copy of the best old head, once one was needed

    def allowed(self, lag: int) -> dict[int, bool]:
        recent = set(self.lineage[-(lag + 1) :])
        return {v: v in recent for v in (*self.lineage, *self.rolled_back)}


def _remote_start(run: _Run, floor: Floor) -> tuple[str, dict[str, torch.Tensor]]:
    """The starting head of a remote run: only one head can act, so ``both`` picks by zero-shot return.

    ``both`` starts from the nearest old head when it beats a fresh head on the floor's episodes (in-family
    tasks), else from scratch (a head copied from an old one can be worse than random: a reversed actuator).
    """
    nearest = floor.best_head
    fresh = run.fresh_state(run.ppo.seed)
    if nearest is None or run.config.init == "scratch":
        return "scratch", fresh
    if run.config.init == "nearest":
        return f"nearest:{nearest}", run.old_state(nearest)
    run.head().load_state_dict(fresh)
    fresh_return = run.evaluate_head()
    log.info(
        "init both: fresh head %.1f vs nearest old head %s %.1f", fresh_return, nearest, floor.best_return
    )
    if floor.best_return > fresh_return:
        return f"nearest:{nearest}", run.old_state(nearest)
    return "scratch", fresh


def _adapt_remote(
    run: _Run, floor: Floor, publisher: HeadPublisher, control: ServerControl
) -> tuple[int, int, _RemoteState, str]:
    config, ppo, task = run.config, run.ppo, run.task
    start, state = _remote_start(run, floor)
    run.head().load_state_dict(state)
    learner = HeadLearner(run.policy, task.id, ppo, seed=ppo.seed)
    nearest = floor.best_head
    floor_live: tuple[float, ...] = ()
    if nearest is not None:
        # The bar a live version must clear, measured like live traffic: the best old head, sampled.
        probe = replace(task, id=nearest)
        floor_live = tuple(
            evaluate(
                run.policy,
                [probe],
                episodes=max(config.zero_shot_episodes, 2 * config.guard_episodes),
                seed=ppo.seed + FLOOR_SEED_OFFSET,
                deterministic=False,
            )[nearest]
        )
        log.info("floor for the guard: %s sampled, mean return %.1f", nearest, float(np.mean(floor_live)))
    guard = RolloutGuard(
        publisher,
        run.metrics,
        margin=config.rollback_margin,
        min_episodes=config.guard_episodes,
        alpha=config.guard_alpha,
        floor=floor_live,
    )
    rs = _RemoteState()
    return_rms = RunningMeanStd()
    feed = control.experience(task.id)
    batch_steps = ppo.envs_per_task * ppo.num_steps
    steps = 0
    updates_since_publish = 0

    def publish(note: str) -> Published:
        value = run.evaluate_head()
        published = publisher.publish(
            eval_return=value,
            training=_training_summary(run, start=start, steps=steps, extra={"updates": learner.updates}),
            parent=start.partition(":")[2] or None,
            note=note,
        )
        rs.lineage.append(published.version)
        rs.active = published.version
        return published

    def judge() -> None:
        decision = guard.check()
        if decision is None or decision.verdict in ("held", "pending"):
            return
        rs.lineage.remove(decision.new_version)
        rs.rolled_back.add(decision.new_version)
        rs.rollbacks += 1
        learner.optimizer.state.clear()  # Adam's moments belong to the discarded parameters
        if decision.verdict == "regressed":
            rs.active = decision.previous_version
            return
        # below_floor: serve the best old head instead (a copy under this task) and learn on from it.
        assert nearest is not None
        run.metrics.rollbacks.labels(task=task.id).inc()
        if rs.copy_version is None:
            run.head().load_state_dict(run.old_state(nearest))
            rs.copy_version = publish(
                f"copy of {nearest}: version {decision.new_version} was below it on live episodes"
            ).version
        else:
            publisher.activate(rs.copy_version)
            publisher.restore(rs.copy_version)
            rs.lineage.append(rs.copy_version)
            rs.active = rs.copy_version

    try:
        first = publish(f"initial head ({start})")
        guard.watch(first.version, 0)
        last_data = time.monotonic()
        pending: list[SegmentData] = []
        while steps < ppo.total_steps:
            segments = feed.drain(timeout_s=1.0)
            if segments:
                last_data = time.monotonic()
            elif time.monotonic() - last_data > config.idle_timeout_s:
                raise NoExperience(
                    f"no experience for task {task.id!r} in {config.idle_timeout_s:.0f} s: are clients "
                    f"acting on it with sampled actions and reporting rewards (polyhead simulate --task "
                    f"{task.id})?"
                )
            guard.observe(segments)
            pending.extend(segments)
            judge()
            if sum(len(s) for s in pending) < batch_steps:
                continue
            batch = rollout_from_segments(
                run.policy,
                task.id,
                pending,
                allowed_versions=rs.allowed(config.max_version_lag),
                return_rms=return_rms,
                config=ppo,
            )
            pending = []
            for reason, n in batch.dropped.items():
                rs.dropped[reason] += n
                if n:
                    run.metrics.dropped.labels(task=task.id, reason=reason).inc(n)
            if batch.bootstraps["last_observation"] and not rs.bootstraps["last_observation"]:
                log.warning(
                    "%s: truncated episodes arrive without their final observation; bootstrapping from "
                    "V(last observation) instead of V(final observation) (an approximation; clients "
                    "should send Feedback.final_observation)",
                    task.id,
                )
            for how, n in batch.bootstraps.items():
                rs.bootstraps[how] += n
            if batch.steps < 2:
                continue
            learner.set_lr_fraction(1.0 - steps / ppo.total_steps)
            learner.update(batch.rollout, advantages_ready=True)
            steps += batch.steps
            updates_since_publish += 1
            run.metrics.samples.labels(task=task.id).inc(batch.steps)
            run.metrics.updates.labels(task=task.id).inc()
            recent = guard.live.mean(rs.active, last=20)
            run.progress(batch.steps, f"v{rs.active} live return {recent:.1f}")
            if updates_since_publish >= config.publish_every and not guard.pending:
                previous = rs.active
                published = publish(f"after {learner.updates} updates")
                guard.watch(published.version, previous)
                updates_since_publish = 0
        # The last version still gets its verdict (clients keep acting; we only watch).
        deadline = time.monotonic() + config.guard_timeout_s
        while guard.pending and time.monotonic() < deadline:
            guard.observe(feed.drain(timeout_s=1.0))
            judge()
        if guard.current is not None:
            log.warning(
                "no verdict for %s version %d within %.0f s: it stays active",
                task.id,
                guard.current.new_version,
                config.guard_timeout_s,
            )
    finally:
        feed.close()
        rs.dropped["lost_in_feed"] = feed.lost
        rs.dropped["malformed"] += feed.malformed

    active = publisher.published[rs.active]
    served_by = f"trained:{start}"
    nearest = floor.best_head
    if nearest is not None and rs.active != rs.copy_version and active.eval_return <= floor.best_return:
        log.warning(
            "the served version %d (%.1f) does not beat the best old head %s (%.1f): serving a copy of it",
            rs.active,
            active.eval_return,
            nearest,
            floor.best_return,
        )
        run.head().load_state_dict(run.old_state(nearest))
        published = publisher.publish(
            eval_return=floor.best_return,
            training=_training_summary(run, start=f"copy:{nearest}", steps=0),
            parent=nearest,
            note=f"copy of {nearest}: no trained version beat it",
        )
        rs.active = published.version
        served_by = f"copy:{nearest}"
    return steps, learner.updates, rs, served_by


# ============================================================================================================
# The entry point
# ============================================================================================================
def adapt(
    config: AdaptConfig,
    *,
    metrics: UpdaterMetrics | None = None,
    progress: Callable[[int, str], None] | None = None,
) -> AdaptResult:
    """Adapt ``config.task`` on ``config.bundle``'s frozen trunk; see the module docstring.

    ``metrics`` (default: a fresh registry) receives the updater metrics; ``progress(samples, text)`` is
    called after every update. Raises InvalidTaskSpec, BundleError, IncompatibleHead, ServerUnreachable /
    Unauthenticated (remote), ExportParityError, and TrunkChanged if anything but the new head changed.
    """
    started = time.perf_counter()
    metrics = metrics or UpdaterMetrics()
    metrics_port = metrics.serve(config.metrics_port) if config.metrics_port is not None else None
    threads = torch.get_num_threads()
    torch.set_num_threads(config.ppo.torch_threads)
    torch.manual_seed(config.ppo.seed)
    np.random.seed(config.ppo.seed)
    control: ServerControl | None = None
    try:
        run = _prepare(config, metrics, progress or _no_progress)
        task = run.task
        control_target = config.resolved_admin_target
        if control_target is not None:
            control = ServerControl(control_target, token=config.admin_token)
            control.check()
        before = Fingerprint.take(run.bundle, run.policy, task.id)
        floor = zero_shot_floor(
            run.policy,
            task,
            run.action_space,
            old_tasks=run.old_tasks,
            episodes=config.zero_shot_episodes,
            seed=config.ppo.seed + FLOOR_SEED_OFFSET,
        )
        for head, value in floor.ranking():
            log.info("zero-shot on %s: %-28s %8.1f", task.id, head, value)
        if floor.incompatible:
            log.info(
                "old heads with another action space (not applicable): %s", ", ".join(floor.incompatible)
            )
        publisher = HeadPublisher(
            bundle=run.bundle,
            policy=run.policy,
            task=task,
            observation_space=run.observation_space,
            shared_encoder=run.shared_encoder,
            parity_observations=sample_observations(
                [task], run.policy.observation_size, steps_per_task=64, seed=config.ppo.seed
            ),
            metrics=metrics,
            control=control,
            exporter=config.exporter,
        )
        candidates: list[CandidateResult] = []
        rs = _RemoteState()
        updates = 0
        if config.source == "local":
            steps, candidates, served_by, start_eval_return = _adapt_local(run, floor, publisher)
            updates = sum(
                math.ceil(c.steps / (config.ppo.envs_per_task * config.ppo.num_steps)) for c in candidates
            )
            rs.active = max(publisher.published)
        else:
            assert control is not None
            steps, updates, rs, served_by = _adapt_remote(run, floor, publisher, control)
            # Version 1 is the starting head, published untrained and evaluated on the floor's episodes.
            start_eval_return = publisher.published[min(publisher.published)].eval_return
        after = Fingerprint.take(run.bundle, run.policy, task.id)
        before.assert_same(after)
        active = publisher.published[rs.active]
        served_version = _served_version(config.server, task.id) if config.server else None
        if served_version is not None and served_version != rs.active:
            log.warning(
                "the server at %s serves %s version %d, not %d",
                config.server,
                task.id,
                served_version,
                rs.active,
            )
        return AdaptResult(
            task=task.id,
            source=config.source,
            steps=steps,
            wall_seconds=time.perf_counter() - started,
            versions_published=len(publisher.published),
            final_eval_return=active.eval_return,
            zero_shot=floor,
            rolled_back=rs.rollbacks > 0,
            rollbacks=rs.rollbacks,
            trunk_sha256_before=before.trunk_onnx_sha256,
            trunk_sha256_after=after.trunk_onnx_sha256,
            trunk_state_sha256_before=before.trunk_state_sha256,
            trunk_state_sha256_after=after.trunk_state_sha256,
            active_version=rs.active,
            served_by=served_by,
            candidates=candidates,
            versions=[
                {
                    "version": p.version,
                    "eval_return": p.eval_return,
                    "samples": p.record.meta.training.get("steps"),
                    "note": p.note,
                    "rolled_back": p.version in rs.rolled_back,
                }
                for p in publisher.published.values()
            ],
            dropped_steps=rs.dropped,
            bootstraps=rs.bootstraps,
            updates=updates,
            metrics_port=metrics_port,
            served_version=served_version,
            start_eval_return=start_eval_return,
        )
    finally:
        if control is not None:
            control.close()
        torch.set_num_threads(threads)
        if config.metrics_port is not None:
            metrics.close()


def _served_version(target: str, task_id: str) -> int | None:
    """The task's active version as the data plane reports it (ListTasks), or None when not served."""
    from polyhead.clients.errors import PolicyClientError
    from polyhead.clients.policy_client import PolicyClient

    try:
        with PolicyClient(target, timeout=10.0) as client:
            catalog = client.list_tasks(refresh=True)
            return int(catalog[task_id].active_version) if task_id in catalog else None
    except PolicyClientError as exc:
        log.warning("could not ask the data plane at %s which version it serves: %s", target, exc)
        return None


def _no_progress(samples: int, text: str) -> None:
    del samples, text


def default_config(**changes: Any) -> AdaptConfig:
    """An AdaptConfig from keyword arguments, with ``ppo`` given as a dict of PPOConfig changes."""
    ppo_changes = changes.pop("ppo", {})
    return AdaptConfig(ppo=replace(ADAPT_PPO, **ppo_changes), **changes)
