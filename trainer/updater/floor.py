"""The floor: every existing head evaluated zero-shot on the new task, and what "nearest" means.

"Nearest" is measured by *behaviour*, not by parameters: the old head with the best deterministic return
on the new task's own environment. Parameter-space distances between heads say little here: every head
reads the same trunk features, so two heads with close weights can still push the cart in opposite
directions (a reversed actuator flips the sign of what matters), while two heads far apart in weight
space may act identically on the states the new task visits. The zero-shot return is also exactly the
quantity a new head must beat to be worth publishing, so the same number ranks the starting points and
sets the bar.

Only heads whose action space equals the new task's can act on it (a head emitting 3 logits cannot drive
a 2-action task); the others are listed as incompatible. The old heads are those of the bundle's trunk
checkpoint (the tasks the trunk was trained with).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from polyhead.spaces import SpaceSpec
from polyhead.taskspec import TaskSpec
from polyhead.trainer.evaluate import evaluate
from polyhead.trainer.policy import MultiTaskPolicy


@dataclass(frozen=True)
class Floor:
    """Zero-shot returns of old heads on the new task, best first."""

    returns: dict[str, float]  # compatible old head -> mean deterministic return
    episodes: dict[str, list[float]]
    incompatible: list[str] = field(default_factory=list)

    @property
    def best_head(self) -> str | None:
        return max(self.returns, key=lambda t: self.returns[t]) if self.returns else None

    @property
    def best_return(self) -> float:
        best = self.best_head
        return self.returns[best] if best is not None else -math.inf

    def ranking(self) -> list[tuple[str, float]]:
        return sorted(self.returns.items(), key=lambda item: -item[1])


def zero_shot_floor(
    policy: MultiTaskPolicy,
    task: TaskSpec,
    action_space: SpaceSpec,
    *,
    old_tasks: list[str],
    episodes: int,
    seed: int,
) -> Floor:
    """Run every compatible old head for ``episodes`` deterministic episodes of ``task``'s environment.

    The heads act in lockstep (one trunk pass per step over every head's episodes); the same seeds are
    used for every head, so their returns are comparable.
    """
    # An old head acts through its own task's encoder here, which must read this task's observations.
    width = policy.slots[task.id].observation_size if task.id in policy.slots else -1
    compatible = [
        t
        for t in old_tasks
        if policy.action_spaces[t] == action_space and policy.slots[t].observation_size == width
    ]
    incompatible = [t for t in old_tasks if t not in compatible]
    if not compatible:
        return Floor(returns={}, episodes={}, incompatible=incompatible)
    # The new task's environment recipe under each old head's id: evaluate() picks the head by task id.
    probes = [replace(task, id=t) for t in compatible]
    results: dict[str, list[float]] = {}
    for probe in probes:
        # One call per head with the same seed: identical initial states for every head.
        results.update(evaluate(policy, [probe], episodes=episodes, seed=seed))
    return Floor(
        returns={t: float(np.mean(v)) for t, v in results.items()},
        episodes=results,
        incompatible=incompatible,
    )
