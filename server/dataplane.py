"""The transport-independent data plane: what ``Act``, ``ActStream``, ``ListTasks`` and
``ReportExperience`` do, in domain types (numpy in, numpy out, typed errors out).

The servicers translate protobuf to these calls and back; this layer resolves the head, validates
observations against the task's space, hands them to the batcher and records experience.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from polyhead.errors import InvalidArgument, InvalidObservation
from polyhead.server.actions import Actions, Sampling
from polyhead.server.batcher import Batcher
from polyhead.server.experience import ExperienceHub, ReportOutcome, Transition
from polyhead.server.registry import HeadRegistry, TaskHeads
from polyhead.spaces import DiscreteSpec, SpaceSpec, validate_observations


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

    def __init__(self, registry: HeadRegistry, batcher: Batcher, hub: ExperienceHub, *, max_batch_size: int):
        self.registry = registry
        self.batcher = batcher
        self.hub = hub
        self.max_batch_size = max_batch_size

    async def act(
        self,
        task_id: str,
        obs: npt.NDArray[np.generic],
        *,
        deterministic: bool,
        seed: int | None = None,
        version: int = 0,
        episode_ids: Sequence[str] = (),
        want_log_prob: bool = True,
        deadline: float | None = None,
    ) -> ActOutcome:
        """Actions for one observation or a batch. Raises UnknownTask, UnknownVersion, InvalidObservation,
        BatchTooLarge, InvalidArgument, Overloaded, DeadlineExpired, ShuttingDown."""
        head = self.registry.resolve(task_id, version)
        space = head.meta.observation_space
        flat, batched = validate_observations(obs, space, max_batch=self.max_batch_size)
        rows = flat.shape[0]
        if episode_ids and len(episode_ids) != rows:
            raise InvalidArgument(
                f"{len(episode_ids)} episode_ids for {rows} observations; give one per observation"
            )
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
    ) -> StepOutcome:
        """One ActStream message: report the previous action's outcome (if given), then act on ``obs``."""
        if not episode_id:
            raise InvalidArgument("ActStream messages need an episode_id")
        head = self.registry.resolve(task_id)
        if reward is not None:
            self.hub.report(task_id, episode_id, reward=reward, terminated=terminated, truncated=truncated)
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
    ) -> ReportOutcome:
        """One ReportExperience message. Raises UnknownTask, InvalidArgument."""
        if not episode_id:
            raise InvalidArgument("experience reports need an episode_id")
        if task_id not in self.registry.tasks:
            self.registry.resolve(task_id)  # raises UnknownTask with the served tasks listed
        if transition is not None:
            space = self.registry.resolve(task_id).meta.observation_space
            flat, batched = validate_observations(transition.observation, space, max_batch=1)
            if batched:
                raise InvalidObservation("a reported transition carries one observation")
            transition = Transition(
                flat[0].reshape(_obs_shape(space)),
                transition.action,
                transition.log_prob,
                transition.head_version,
            )
        return self.hub.report(
            task_id,
            episode_id,
            reward=reward,
            terminated=terminated,
            truncated=truncated,
            transition=transition,
        )

    def tasks(self) -> list[TaskHeads]:
        return [entry for _, entry in sorted(self.registry.tasks.items())]
