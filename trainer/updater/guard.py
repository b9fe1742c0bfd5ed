"""The guarded rollout: a new head version must hold up on live episodes, or it is rolled back.

After a version is published, the returns of episodes that were played *entirely* by it (every step of
the segment that ends the episode names that version) are compared with those of the version it replaced.
Once ``min_episodes`` of the new version have finished, the verdict is:

* ``regressed`` when ``mean(new) < mean(previous) - margin * max(|mean(previous)|, 1)`` (``margin`` is a
  fraction of the previous mean, so one setting fits tasks with returns near 1 and near 500);
* ``held`` otherwise.

Episodes that straddle the swap (mixed versions) count for neither. The previous version's returns are
its most recent ``min_episodes`` (or more) fully-played episodes. If the previous version has no live
episodes yet (the very first version, or a version whose episodes were all mixed), the new version is
judged against its own evaluation return recorded at publication.
"""

from __future__ import annotations

import collections
import logging
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from polyhead.trainer.updater.head_ppo import SegmentData
from polyhead.trainer.updater.metrics import UpdaterMetrics
from polyhead.trainer.updater.publisher import HeadPublisher

log = logging.getLogger("polyhead.trainer.adapt")

Verdict = Literal["pending", "held", "regressed"]


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    new_version: int
    previous_version: int
    new_mean: float
    previous_mean: float
    episodes: int

    def describe(self) -> str:
        return (
            f"version {self.new_version}: live mean return {self.new_mean:.1f} over {self.episodes} episodes "
            f"vs {self.previous_mean:.1f} for version {self.previous_version}"
        )


class LiveReturns:
    """Episode returns per head version, from segments that end an episode played by one version."""

    def __init__(self, keep: int = 200) -> None:
        self._returns: dict[int, collections.deque[float]] = {}
        self._keep = keep

    def observe(self, segment: SegmentData) -> None:
        if math.isnan(segment.episode_return) or not segment.head_versions:
            return
        versions = set(segment.head_versions)
        # A long episode arrives in several segments; only its last is checked (start_step > 0 then).
        if len(versions) == 1:
            (version,) = versions
            self._returns.setdefault(version, collections.deque(maxlen=self._keep)).append(
                float(segment.episode_return)
            )

    def returns(self, version: int) -> list[float]:
        return list(self._returns.get(version, ()))

    def mean(self, version: int, *, last: int | None = None) -> float:
        values = self.returns(version)
        if last is not None:
            values = values[-last:]
        return float(np.mean(values)) if values else math.nan


@dataclass
class GuardedRollout:
    """Watches one version against the one it replaced; see the module docstring for the rule."""

    live: LiveReturns
    new_version: int
    previous_version: int
    previous_reference: float  # the previous version's live mean when it has one, else its eval return
    margin: float
    min_episodes: int

    def decide(self) -> Decision:
        new = self.live.returns(self.new_version)
        previous_mean = self.live.mean(self.previous_version, last=max(self.min_episodes, 20))
        if math.isnan(previous_mean):
            previous_mean = self.previous_reference
        if len(new) < self.min_episodes:
            return Decision(
                "pending", self.new_version, self.previous_version, self.live.mean(self.new_version),
                previous_mean, len(new),
            )  # fmt: skip
        new_mean = float(np.mean(new[: self.min_episodes * 2]))
        bar = previous_mean - self.margin * max(abs(previous_mean), 1.0)
        verdict: Verdict = "regressed" if new_mean < bar else "held"
        return Decision(verdict, self.new_version, self.previous_version, new_mean, previous_mean, len(new))


class RolloutGuard:
    """Judges each newly published version on live returns and rolls a regression back.

    ``watch(new, previous)`` after publishing ``new``; feed every experience segment to ``observe``; call
    ``check()`` as often as convenient. A ``regressed`` verdict re-activates ``previous`` on the server and in
    the bundle's active pointer, rewinds the torch head to ``previous``'s parameters, counts
    ``polyhead_updater_rollbacks_total{task}`` and logs the numbers.
    """

    def __init__(
        self, publisher: HeadPublisher, metrics: UpdaterMetrics, *, margin: float, min_episodes: int
    ) -> None:
        self.publisher = publisher
        self.metrics = metrics
        self.margin = margin
        self.min_episodes = min_episodes
        self.live = LiveReturns()
        self.current: GuardedRollout | None = None
        self.decisions: list[Decision] = []
        self.rolled_back: list[int] = []

    @property
    def pending(self) -> bool:
        return self.current is not None

    def watch(self, new_version: int, previous_version: int) -> None:
        reference = self.live.mean(previous_version, last=max(self.min_episodes, 20))
        if math.isnan(reference):
            reference = self.publisher.published[previous_version].eval_return
        self.current = GuardedRollout(
            self.live, new_version, previous_version, reference, self.margin, self.min_episodes
        )

    def observe(self, segments: list[SegmentData]) -> None:
        for segment in segments:
            self.live.observe(segment)

    def check(self) -> Decision | None:
        """The verdict on the watched version once there is one (None while pending or idle)."""
        if self.current is None:
            return None
        decision = self.current.decide()
        if decision.verdict == "pending":
            return None
        task_id = self.publisher.task.id
        if decision.verdict == "regressed":
            log.warning(
                "rollback of %s to version %d: %s", task_id, decision.previous_version, decision.describe()
            )
            self.publisher.activate(decision.previous_version)
            self.publisher.restore(decision.previous_version)
            self.metrics.rollbacks.labels(task=task_id).inc()
            self.rolled_back.append(decision.new_version)
        else:
            log.info("%s %s: kept", task_id, decision.describe())
        self.decisions.append(decision)
        self.current = None
        return decision
