"""The guarded rollout: a new head version must hold up on live episodes, or it is rolled back.

**Which episodes.** A version is judged only on episodes that *started and ended* under it: every step of
every segment of the episode names that version and was acted in one mode (sampled, or deterministic),
and the episode's first segment (step 0) was seen. Sampled and deterministic episodes are never mixed:
each (version, mode) pair is its own sample, and versions are compared within one mode.

**Like with like.** Short episodes finish first, so "the first N episodes to *finish* under a new
version" is biased short (and for CartPole, low); so is "the previous version's last N", since its long
episodes straddle the swap and are left out. The server numbers episodes in the order they *start* under
a version (``EpisodeSegment.episode_ordinal``), and each version is sampled by its **cohort**: the first
``min_episodes`` ordinals, judged only once every one of them has finished (whatever its length). The new
version's cohort is compared with the previous version's cohort (its first ``2 x min_episodes`` when all
of those finished under it, else its first ``min_episodes``): both samples are fixed before anyone knows
how long their episodes will be.

**The test.** :func:`polyhead.trainer.updater.stats.worse_than`: a one-sided Mann-Whitney U test of
"new + margin is not worse than previous" at level ``alpha``, where ``margin`` is ``rollback_margin`` of
the previous mean's magnitude. So a version as good as its predecessor is rolled back with probability
at most ``alpha`` (default 0.05; less with a positive margin). The verdict is:

* ``regressed``: worse than the previous version (rolled back to it);
* ``below_floor``: worse than the best old head's returns on the task (``floor``, measured the same way,
  sampled, by the updater) while no better than the previous version; the caller serves that head
  instead;
* ``held`` otherwise.

A version whose cohort does not complete within ``guard_timeout_s`` stays live with a warning (the caller
decides); episodes that never end (a client gone) are what delays a cohort.
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
from polyhead.trainer.updater.stats import ShiftTest, relative_margin, worse_than

log = logging.getLogger("polyhead.trainer.adapt")

Verdict = Literal["pending", "held", "regressed", "below_floor"]
Mode = Literal["sampled", "deterministic"]
MODES: tuple[Mode, ...] = ("sampled", "deterministic")
_MIXED = math.nan  # an ordinal whose episode did not run entirely under one version and mode


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    new_version: int
    previous_version: int
    new_mean: float
    previous_mean: float
    episodes: int
    mode: str = "sampled"
    test: ShiftTest | None = None
    floor_test: ShiftTest | None = None

    def describe(self) -> str:
        text = (
            f"version {self.new_version}: live mean return {self.new_mean:.1f} over the first "
            f"{self.episodes} {self.mode} episodes to start under it vs {self.previous_mean:.1f} for version "
            f"{self.previous_version}"
        )
        if self.test is not None:
            t = self.test
            text += f" (Mann-Whitney p={t.p_value:.3g}, alpha {t.alpha}, margin {t.margin:.1f})"
        if self.floor_test is not None:
            text += f"; best old head {self.floor_test.reference_mean:.1f} (p={self.floor_test.p_value:.3g})"
        return text


class LiveReturns:
    """Returns of whole episodes per (version, mode), indexed by the order in which they started.

    ``observe`` every segment of the feed. Memory is bounded: the returns of the ``keep_versions`` most
    recent versions, and at most ``max_open`` episodes followed across segments.
    """

    def __init__(self, *, keep_versions: int = 4, max_open: int = 10_000) -> None:
        # (version, mode) -> ordinal -> return (NaN: the episode mixed versions or modes)
        self._returns: dict[tuple[int, str], dict[int, float]] = {}
        self._open: collections.OrderedDict[str, tuple[int, str | None, int, bool]] = (
            collections.OrderedDict()
        )
        self._keep_versions = keep_versions
        self._max_open = max_open
        self._seen_order: collections.OrderedDict[int, None] = collections.OrderedDict()

    def observe(self, segment: SegmentData) -> None:
        if not segment.head_versions:
            return
        versions = set(segment.head_versions)
        mode = segment.mode
        first_mode: str | None
        if segment.start_step == 0:
            first, ordinal = segment.head_versions[0], segment.episode_ordinal
            first_mode = "deterministic" if segment.deterministic and segment.deterministic[0] else "sampled"
            pure = len(versions) == 1 and mode is not None
        elif segment.episode_id in self._open:
            first, first_mode, ordinal, pure = self._open.pop(segment.episode_id)
            pure = pure and versions == {first} and mode == first_mode
        else:
            return  # its start was never seen: no ordinal to file it under
        if not segment.ends_episode:
            self._open[segment.episode_id] = (first, first_mode, ordinal, pure)
            while len(self._open) > self._max_open:
                self._open.popitem(last=False)
            return
        if first_mode is None:
            return
        value = float(segment.episode_return) if pure and not math.isnan(segment.episode_return) else _MIXED
        self._returns.setdefault((first, first_mode), {})[ordinal] = value
        self._seen_order[first] = None
        self._seen_order.move_to_end(first)
        self._forget_old()

    def _forget_old(self) -> None:
        """Keep the versions observed most recently (a version rolled back to is observed again)."""
        while len(self._seen_order) > self._keep_versions:
            old, _ = self._seen_order.popitem(last=False)
            for mode in MODES:
                self._returns.pop((old, mode), None)

    def cohort(self, version: int, mode: str, n: int) -> list[float] | None:
        """Returns of the first ``n`` episodes to start under ``version`` (mixed ones left out), or None
        while any of them is still running."""
        seen = self._returns.get((version, mode), {})
        if any(i not in seen for i in range(n)):
            return None
        return [seen[i] for i in range(n) if not math.isnan(seen[i])]

    def recent(self, version: int, mode: str, n: int) -> list[float]:
        """For progress output, not for verdicts: returns of the latest ``n`` episodes of the consecutive
        run of ordinals from 0 that all finished under ``version`` (it stops at the first episode still
        running or mixed)."""
        seen = self._returns.get((version, mode), {})
        end = 0
        while end in seen and not math.isnan(seen[end]):
            end += 1
        return [seen[i] for i in range(max(0, end - n), end)]

    def finished(self, version: int, mode: str = "sampled") -> list[float]:
        """Every recorded return of ``version`` (any order; for progress output)."""
        return [v for v in self._returns.get((version, mode), {}).values() if not math.isnan(v)]

    def mean(self, version: int, *, last: int | None = None, mode: str = "sampled") -> float:
        values = self.recent(version, mode, last) if last is not None else self.finished(version, mode)
        return float(np.mean(values)) if values else math.nan


@dataclass
class GuardedRollout:
    """Watches one version against the one it replaced (and the floor); see the module docstring."""

    live: LiveReturns
    new_version: int
    previous_version: int  # 0: none (the first version)
    margin: float
    min_episodes: int
    alpha: float
    floor: tuple[float, ...] = ()  # the best old head's sampled returns on the task; empty: no floor

    def reference(self, mode: str) -> list[float]:
        """The previous version's cohort: its first ``2 x min_episodes`` episodes when all of them finished
        under it, else its first ``min_episodes`` (mixed ones left out); empty when it has none."""
        if not self.previous_version:
            return []
        for n in (2 * self.min_episodes, self.min_episodes):
            values = self.live.cohort(self.previous_version, mode, n)
            if values is not None and (len(values) == n or n == self.min_episodes):
                return values
        return []

    def decide(self) -> Decision:
        for mode in MODES:
            new = self.live.cohort(self.new_version, mode, self.min_episodes)
            if new is None or len(new) < max(2, self.min_episodes // 2):
                continue  # not complete yet (or mostly mixed episodes)
            previous = self.reference(mode)
            test = None
            if len(previous) >= max(2, self.min_episodes // 2):
                test = worse_than(
                    new, previous, margin=relative_margin(previous, self.margin), alpha=self.alpha
                )
            floor_test = None
            if self.floor and mode == "sampled":
                floor_test = worse_than(
                    new, self.floor, margin=relative_margin(self.floor, self.margin), alpha=self.alpha
                )
            verdict: Verdict = "held"
            if test is not None and test.worse:
                verdict = "regressed"
            elif floor_test is not None and floor_test.worse:
                verdict = "below_floor"
            return Decision(
                verdict,
                self.new_version,
                self.previous_version,
                float(np.mean(new)),
                float(np.mean(previous)) if previous else math.nan,
                len(new),
                mode,
                test,
                floor_test,
            )
        running = max(len(self.live.finished(self.new_version, m)) for m in MODES)
        return Decision(
            "pending",
            self.new_version,
            self.previous_version,
            self.live.mean(self.new_version),
            self.live.mean(self.previous_version, last=2 * self.min_episodes),
            running,
        )


class RolloutGuard:
    """Judges each newly published version on live returns and rolls a regression back.

    ``watch(new, previous)`` after publishing ``new`` (``previous`` 0 for the first version); feed every
    experience segment to ``observe``; call ``check()`` as often as convenient. A ``regressed`` verdict
    re-activates ``previous`` on the server and in the bundle's active pointer, rewinds the torch head to
    ``previous``'s parameters, counts ``polyhead_updater_rollbacks_total{task}`` and logs the numbers. A
    ``below_floor`` verdict is returned for the caller to act on (it owns the old heads).
    """

    def __init__(
        self,
        publisher: HeadPublisher,
        metrics: UpdaterMetrics,
        *,
        margin: float,
        min_episodes: int,
        alpha: float = 0.05,
        floor: tuple[float, ...] = (),
    ) -> None:
        self.publisher = publisher
        self.metrics = metrics
        self.margin = margin
        self.min_episodes = min_episodes
        self.alpha = alpha
        self.floor = floor
        self.live = LiveReturns()
        self.current: GuardedRollout | None = None
        self.decisions: list[Decision] = []
        self.rolled_back: list[int] = []

    @property
    def pending(self) -> bool:
        return self.current is not None

    def watch(self, new_version: int, previous_version: int) -> None:
        self.current = GuardedRollout(
            self.live,
            new_version,
            previous_version,
            self.margin,
            self.min_episodes,
            self.alpha,
            self.floor,
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
        elif decision.verdict == "below_floor":
            log.warning("%s %s: below the best old head", task_id, decision.describe())
        else:
            log.info("%s %s: kept", task_id, decision.describe())
        self.decisions.append(decision)
        self.current = None
        return decision
