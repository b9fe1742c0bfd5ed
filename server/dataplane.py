"""The transport-independent data plane: what ``Act``, ``ActStream``, ``ListTasks`` and
``ReportExperience`` do, in domain types (numpy in, numpy out, typed errors out).

The servicers translate protobuf to these calls and back; this layer resolves the head, validates
observations against the task's space, hands them to the batcher and records experience.
"""

from __future__ import annotations

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
from polyhead.server.registry import HeadRegistry, TaskHeads
from polyhead.spaces import DiscreteSpec, SpaceSpec, validate_observations

T = TypeVar("T")


@dataclass(frozen=True)
class ActOutcome:
    """Actions for one request; ``batched`` False means the caller sent one observation."""

    task_id: str
    version: int
    actions: Actions
    batched: bool


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
    ):
        self.registry = registry
        self.batcher = batcher
        self.hub = hub
        self.max_batch_size = max_batch_size
        self.max_abs_reward = max_abs_reward

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
        deadline: float | None = None,
    ) -> ActOutcome:
        """Actions for one observation or a batch. Raises UnknownTask, UnknownVersion, InvalidObservation,
        BatchTooLarge, InvalidArgument, Overloaded, DeadlineExpired, ShuttingDown.

        With ``episode_ids`` each action is recorded for the experience feed (``steps``: the client's step
        index of each, so a retried call records nothing twice); deterministic actions are marked so."""
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
        sampling = Sampling(rows, deterministic, seed, log_prob=want_log_prob or bool(episode_ids))
        actions = await self.batcher.act(head, flat, sampling, deadline=deadline)
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
                        version=head.version,
                        deterministic=deterministic,
                        step=int(steps[i]) if steps else None,
                    )
        return ActOutcome(task_id, head.version, actions, batched)

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
        actions = await self.batcher.act(head, flat, Sampling(1, deterministic, seed), deadline=deadline)
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
