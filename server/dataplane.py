"""The transport-independent data plane: what ``Act``, ``ActStream``, ``ListTasks`` and
``ReportExperience`` do, in domain types (numpy in, numpy out, typed errors out).

The servicers translate protobuf to these calls and back; this layer resolves the head, validates
observations against the task's space, hands them to the batcher and records experience.

Canary routing: a request that names no version is served by the task's stable version or its canary
(:meth:`polyhead.server.registry.TaskHeads.route`). An episode that is already open keeps the version of
its first action while that version is still the task's stable or canary version (so widening, promoting or
changing the share never moves a running episode, and a cleared canary's episodes move to stable); an
``Act`` batch whose episodes route to both versions is served as two groups, each row naming its version.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from polyhead.errors import InvalidArgument, InvalidExperience, InvalidObservation
from polyhead.server import experience_checks as checks
from polyhead.server.actions import Actions, Sampling
from polyhead.server.batcher import Batcher
from polyhead.server.experience import ExperienceHub, ReportOutcome, Transition
from polyhead.server.metrics import ServerMetrics
from polyhead.server.registry import HeadRegistry, LoadedHead, TaskHeads
from polyhead.spaces import DiscreteSpec, SpaceSpec, validate_observations

T = TypeVar("T")


@dataclass(frozen=True)
class ActOutcome:
    """Actions for one request; ``batched`` False means the caller sent one observation."""

    task_id: str
    version: int  # the version that produced every action; 0 when the rows were split (see ``row_versions``)
    actions: Actions
    batched: bool
    row_versions: tuple[int, ...] = ()  # per row, when the request carried episode ids


@dataclass(frozen=True)
class StepOutcome:
    version: int
    actions: Actions | None  # None when the step carried only feedback
    step: int


def _obs_shape(space: SpaceSpec) -> tuple[int, ...]:
    return () if isinstance(space, DiscreteSpec) else space.shape


class DataPlane:
    """Serves actions and takes experience. Use from the event loop."""

    def __init__(
        self,
        registry: HeadRegistry,
        batcher: Batcher,
        hub: ExperienceHub,
        *,
        max_batch_size: int,
        max_abs_reward: float = 1e6,
        metrics: ServerMetrics | None = None,
    ):
        self.registry = registry
        self.batcher = batcher
        self.hub = hub
        self.max_batch_size = max_batch_size
        self.max_abs_reward = max_abs_reward
        self._metrics = metrics
        self._latency: dict[tuple[str, int], Any] = {}  # (task, version) -> histogram child
        self._draw = random.Random().random  # per-request canary draws (no episode id)

    # --- routing ---------------------------------------------------------------------------------------
    def _route(self, entry: TaskHeads, episode_id: str) -> LoadedHead:
        """Stable or canary for one episode (or one request when ``episode_id`` is empty)."""
        if not entry.canary:
            return entry.active_head
        if episode_id:
            first = self.hub.episode_version(entry.task_id, episode_id)
            if first and first in (entry.active, entry.canary):
                return entry.versions[first]
        return entry.route(episode_id, self._draw)

    async def _infer(
        self,
        head: LoadedHead,
        flat: npt.NDArray[np.float32],
        sampling: Sampling,
        deadline: float | None,
        *,
        stream: bool = False,
    ) -> Actions:
        """The batcher's actions, timed per (task, version) when metrics are on."""
        if self._metrics is None:
            return await self.batcher.act(head, flat, sampling, deadline=deadline, stream=stream)
        t0 = time.perf_counter()
        actions = await self.batcher.act(head, flat, sampling, deadline=deadline, stream=stream)
        key = (head.task_id, head.version)
        child = self._latency.get(key)
        if child is None:
            child = self._latency[key] = self._metrics.version_act_seconds.labels(
                task=head.task_id, version=str(head.version)
            )
        child.observe(time.perf_counter() - t0)
        return actions

    async def act(
        self,
        task_id: str,
        obs: npt.NDArray[np.generic],
        *,
        deterministic: bool,
        seed: int | None = None,
        version: int = 0,
        episode_ids: Sequence[str] = (),
        steps: Sequence[int] = (),
        want_log_prob: bool = True,
        want_value: bool = True,
        deadline: float | None = None,
    ) -> ActOutcome:
        """Actions for one observation or a batch. Raises UnknownTask, UnknownVersion, InvalidObservation,
        BatchTooLarge, InvalidArgument, Overloaded, DeadlineExpired, ShuttingDown.

        With ``episode_ids`` each action is recorded for the experience feed (``steps``: the client's step
        index of each, so a retried call records nothing twice); deterministic actions are marked so.
        ``want_value`` False: the values are not needed (stacked heads skip the value MLP; NaN)."""
        head = self.registry.resolve(task_id, version)
        space = head.meta.observation_space
        flat, batched = validate_observations(obs, space, max_batch=self.max_batch_size)
        rows = flat.shape[0]
        if episode_ids and len(episode_ids) != rows:
            raise InvalidArgument(
                f"{len(episode_ids)} episode_ids for {rows} observations; give one per observation"
            )
        if steps:
            if len(steps) != len(episode_ids):
                raise InvalidArgument(
                    f"{len(steps)} steps for {len(episode_ids)} episode_ids; give one step index per "
                    "episode id (or none)"
                )
            for i, s in enumerate(steps):
                self._checked(task_id, checks.check_step, s, field=f"steps[{i}]")
        want = want_log_prob or bool(episode_ids)
        entry = self.registry.tasks.get(task_id)
        heads = [head] * rows
        if not version and entry is not None and entry.canary:
            if episode_ids:
                heads = [self._route(entry, episode_id) for episode_id in episode_ids]
            else:
                heads = [self._route(entry, "")] * rows
        if all(h is heads[0] for h in heads):
            head = heads[0]
            actions = await self._infer(
                head, flat, Sampling(rows, deterministic, seed, log_prob=want, value=want_value), deadline
            )
        else:
            actions = await self._split(
                heads,
                flat,
                deterministic=deterministic,
                seed=seed,
                want_log_prob=want,
                want_value=want_value,
                deadline=deadline,
            )
        if episode_ids:
            shape = _obs_shape(space)
            for i, episode_id in enumerate(episode_ids):
                if episode_id:
                    self.hub.record_action(
                        task_id,
                        episode_id,
                        obs=flat[i].reshape(shape),
                        action=actions.raw[i],
                        log_prob=float(actions.log_prob[i]),
                        version=heads[i].version,
                        deterministic=deterministic,
                        step=int(steps[i]) if steps else None,
                    )
        row_versions = tuple(h.version for h in heads) if episode_ids else ()
        uniform = all(h is heads[0] for h in heads)
        return ActOutcome(task_id, heads[0].version if uniform else 0, actions, batched, row_versions)

    async def _split(
        self,
        heads: list[LoadedHead],
        flat: npt.NDArray[np.float32],
        *,
        deterministic: bool,
        seed: int | None,
        want_log_prob: bool,
        want_value: bool,
        deadline: float | None,
    ) -> Actions:
        """Serve rows routed to different versions as one group per version, then restore row order."""
        groups: dict[int, list[int]] = {}
        for i, h in enumerate(heads):
            groups.setdefault(h.version, []).append(i)
        by_version = {h.version: h for h in heads}
        parts = await asyncio.gather(
            *(
                self._infer(
                    by_version[v],
                    flat[rows],
                    Sampling(
                        len(rows),
                        deterministic,
                        None if seed is None else seed + k,
                        log_prob=want_log_prob,
                        value=want_value,
                    ),
                    deadline,
                )
                for k, (v, rows) in enumerate(groups.items())
            )
        )
        order = np.concatenate([np.asarray(rows) for rows in groups.values()])
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))

        def merged(field: str) -> Any:
            return np.concatenate([getattr(p, field) for p in parts])[inverse]

        return Actions(
            raw=merged("raw"), env=merged("env"), log_prob=merged("log_prob"), value=merged("value")
        )

    async def step(
        self,
        task_id: str,
        episode_id: str,
        obs: npt.NDArray[np.generic] | None,
        *,
        reward: float | None,
        terminated: bool,
        truncated: bool,
        deterministic: bool,
        seed: int | None = None,
        deadline: float | None = None,
        feedback_step: int | None = None,
        final_observation: npt.NDArray[np.generic] | None = None,
        want_value: bool = True,
    ) -> StepOutcome:
        """One ActStream message: report the previous action's outcome (if given), then act on ``obs``.

        The feedback is validated like a ``ReportExperience`` message (InvalidExperience) before it joins
        anything; ``feedback_step`` names the action it answers (None: the oldest awaiting a reward)."""
        if not episode_id:
            raise InvalidArgument("ActStream messages need an episode_id")
        head = self.registry.resolve(task_id)
        if reward is not None:
            self.report(
                task_id,
                episode_id,
                reward=reward,
                terminated=terminated,
                truncated=truncated,
                step=feedback_step,
                final_observation=final_observation,
                prefix="feedback.",
            )
        entry = self.registry.tasks.get(task_id)
        if entry is not None and entry.canary:
            head = self._route(entry, episode_id)
        if obs is None:
            if reward is None:
                raise InvalidArgument("an ActStream message needs an observation, feedback, or both")
            return StepOutcome(head.version, None, -1)
        flat, batched = validate_observations(obs, head.meta.observation_space, max_batch=1)
        if batched:
            raise InvalidObservation(
                f"ActStream takes one observation per message of shape "
                f"{list(_obs_shape(head.meta.observation_space))}; use Act for batches"
            )
        actions = await self._infer(
            head, flat, Sampling(1, deterministic, seed, value=want_value), deadline, stream=True
        )
        step = self.hub.record_action(
            task_id,
            episode_id,
            obs=flat[0].reshape(_obs_shape(head.meta.observation_space)),
            action=actions.raw[0],
            log_prob=float(actions.log_prob[0]),
            version=head.version,
            deterministic=deterministic,
        )
        return StepOutcome(head.version, actions, step)

    def report(
        self,
        task_id: str,
        episode_id: str,
        *,
        reward: float,
        terminated: bool,
        truncated: bool,
        transition: Transition | None = None,
        step: int | None = None,
        final_observation: npt.NDArray[np.generic] | None = None,
        prefix: str = "",
    ) -> ReportOutcome:
        """One ReportExperience message (or ActStream feedback). Raises UnknownTask, InvalidArgument, and
        InvalidExperience (counted under its reason) before anything of the report joins an episode."""
        if not episode_id:
            raise InvalidArgument("experience reports need an episode_id")
        head = self.registry.resolve(task_id)  # raises UnknownTask with the served tasks listed
        meta = head.meta
        reward = self._checked(
            task_id, checks.check_reward, reward, max_abs_reward=self.max_abs_reward, field=f"{prefix}reward"
        )
        if step is not None:
            step = self._checked(task_id, checks.check_step, step, field=f"{prefix}step")
        final = None
        if final_observation is not None:
            final = self._checked(
                task_id,
                checks.check_observation,
                final_observation,
                meta.observation_space,
                field=f"{prefix}final_observation",
            )
        if transition is not None:
            transition = Transition(
                observation=self._checked(
                    task_id, checks.check_observation, transition.observation, meta.observation_space
                ),
                action=self._checked(task_id, checks.check_action, transition.action, meta.action_space),
                log_prob=self._checked(
                    task_id, checks.check_log_prob, transition.log_prob, meta.action_space
                ),
                head_version=self._checked(
                    task_id,
                    checks.check_version,
                    transition.head_version,
                    self.registry.served_versions(task_id),
                    task_id,
                ),
                deterministic=transition.deterministic,
            )
        return self.hub.report(
            task_id,
            episode_id,
            reward=reward,
            terminated=terminated,
            truncated=truncated,
            transition=transition,
            step=step,
            final_observation=final,
        )

    def _checked(self, task_id: str, check: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one experience check; a refusal is counted under its reason, then raised."""
        try:
            return check(*args, **kwargs)
        except InvalidExperience as exc:
            self.hub.refuse(task_id, exc.reason)
            raise

    def tasks(self) -> list[TaskHeads]:
        return [entry for _, entry in sorted(self.registry.tasks.items())]
