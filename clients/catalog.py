"""The served tasks as the client sees them: read once from ``ListTasks``, then used to decode actions.

:class:`TaskCatalog` is plain data (no channel): the task specs, observation and action spaces, active and
loaded head versions, and the server's limits. Refresh it by calling ``list_tasks(refresh=True)`` on a
client, e.g. after a head was loaded for a new task.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from polyhead.clients.errors import TaskNotFound
from polyhead.errors import PolyheadError
from polyhead.spaces import DiscreteSpec, SpaceSpec, space_from_proto, space_to_gymnasium
from polyhead.taskspec import TaskSpec
from polyhead.v1 import policy_pb2

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RemoteTask:
    """One served task. ``spec`` is None when the server's spec does not parse on this client (an env
    from a package this client lacks still acts fine: only ``simulate`` needs to build the env)."""

    task_id: str
    spec: TaskSpec | None
    observation_space: SpaceSpec
    action_space: SpaceSpec
    active_version: int
    loaded_versions: tuple[int, ...]
    canary_version: int = 0  # 0: no canary
    canary_percent: float = 0.0
    regressed: bool = False  # the server's live-return monitor finds the stable version worse
    regression_detail: str = ""
    reference_return: float = float("nan")  # the stable version's live reference mean (NaN: none yet)

    @property
    def observation_shape(self) -> tuple[int, ...]:
        space = self.observation_space
        return () if isinstance(space, DiscreteSpec) else space.shape

    @property
    def discrete(self) -> bool:
        return isinstance(self.action_space, DiscreteSpec)

    def gymnasium_action_space(self) -> Any:
        """The gymnasium space actions are decoded into (imports gymnasium)."""
        return space_to_gymnasium(self.action_space)

    def gymnasium_observation_space(self) -> Any:
        return space_to_gymnasium(self.observation_space)

    @classmethod
    def from_proto(cls, msg: policy_pb2.TaskInfo) -> RemoteTask:
        spec: TaskSpec | None
        try:
            spec = TaskSpec.from_proto(msg.spec) if msg.spec.env else None
        except PolyheadError as exc:
            log.warning("task %s: the server's task spec does not parse here (%s)", msg.task_id, exc)
            spec = None
        return cls(
            task_id=msg.task_id,
            spec=spec,
            observation_space=space_from_proto(msg.observation_space),
            action_space=space_from_proto(msg.action_space),
            active_version=msg.active_version,
            loaded_versions=tuple(msg.loaded_versions),
            canary_version=msg.canary_version,
            canary_percent=msg.canary_percent,
            regressed=msg.regressed,
            regression_detail=msg.regression_detail,
            reference_return=msg.reference_return,
        )


@dataclass(frozen=True)
class TaskCatalog:
    """Every served task, plus the server's trunk hash, trunk input size and max batch size."""

    tasks: dict[str, RemoteTask]
    trunk_sha256: str
    observation_size: int
    max_batch_size: int

    def __getitem__(self, task_id: str) -> RemoteTask:
        try:
            return self.tasks[task_id]
        except KeyError:
            served = ", ".join(sorted(self.tasks)) or "none"
            raise TaskNotFound(f"task {task_id!r} is not served; served tasks: {served}") from None

    def __contains__(self, task_id: object) -> bool:
        return task_id in self.tasks

    def __iter__(self) -> Any:
        return iter(self.tasks.values())

    def __len__(self) -> int:
        return len(self.tasks)

    @classmethod
    def from_proto(cls, msg: policy_pb2.ListTasksResponse) -> TaskCatalog:
        return cls(
            tasks={t.task_id: RemoteTask.from_proto(t) for t in msg.tasks},
            trunk_sha256=msg.trunk_sha256,
            observation_size=msg.observation_size,
            max_batch_size=msg.max_batch_size,
        )
