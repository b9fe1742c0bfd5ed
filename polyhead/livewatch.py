"""The live-return monitor: has a task's stable version got worse under live traffic?

Environments change under a deployed policy (a worn actuator, a heavier payload); the head did not move,
so nothing was published and no rollout guard looks. This monitor watches, per task, the returns of
completed episodes played entirely by the task's *stable* version and compares them with that version's
own reference:

* the reference is the version's first ``reference_episodes`` live returns after it became stable (blocks
  that passed the check below); until there are that many, its recorded evaluation return, with the much
  wider ``eval_margin_fraction``: the evaluation return is *deterministic* play, live traffic usually
  samples, and a trained CartPole head measured here scores 449 deterministic but about 250 sampled (a
  margin of 20 % raised a false alarm on a healthy head); the wide margin still catches a collapse (a
  reversed actuator: about 9);
* returns are tested in consecutive, non-overlapping blocks of ``window`` episodes. A block is compared
  with the reference by the one-sided Mann-Whitney test (:func:`polyhead.stats.worse_than`), or, while the
  reference is still the evaluation return, by the sign test (:func:`polyhead.stats.below_level`), with a
  margin of ``margin_fraction`` of the reference's mean; while the reference is forming (at least one
  block, fewer than ``reference_episodes``), a block is also tested against the part formed, each test at
  ``alpha / 2``, so that a change during the formation is caught; a block whose p-value against the part
  formed is below ``admit_p`` (suspicious, not significant) is left out of the reference;
* **false-alarm rate**: each block test rejects at level ``alpha`` at most, whatever the return
  distribution, when the version is as good as its reference (both tests are distribution-free; the
  margin makes them more conservative). Over a stationary run of ``B`` blocks the expected number of false
  alarms is at most ``B * alpha``: with the defaults (``window`` 20, ``alpha`` 1e-3), at most one false
  alarm per 20,000 stationary episodes;
* a rejected block marks the task *regressed*; it stays regressed until ``recover_blocks`` consecutive
  blocks are not worse, or the stable version changes (a new reference starts).

Pure numpy (no torch, no grpc): the server runs one per task (``polyhead_task_regressed{task}``) and the
``polyhead operate`` controller reads its state.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from polyhead.stats import ShiftTest, below_level, relative_margin, worse_than

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MonitorConfig:
    """How a task's live returns are judged (see the module docstring)."""

    window: int = 20
    """episodes per test block"""
    reference_episodes: int = 40
    """live episodes of a stable version that make its reference"""
    alpha: float = 1e-3
    """false-alarm rate of one block test"""
    margin_fraction: float = 0.2
    """a drop smaller than this fraction of the reference mean is tolerated"""
    eval_margin_fraction: float = 0.8
    """the same against the evaluation return, before there is a live reference (see the module doc)"""
    recover_blocks: int = 2
    """consecutive blocks not worse that clear a regression"""
    admit_p: float = 0.05
    """a block joins a forming reference only when its test against the part formed has at least this
    p-value (a suspicious block is neither an alarm nor reference: the false-alarm rate is unchanged)"""

    def __post_init__(self) -> None:
        if self.window < 2 or self.reference_episodes < self.window:
            raise ValueError(
                f"window must be >= 2 and reference_episodes >= window; got window {self.window}, "
                f"reference_episodes {self.reference_episodes}"
            )
        if (
            not 0.0 < self.alpha < 1.0
            or self.margin_fraction < 0.0
            or self.eval_margin_fraction < 0.0
            or self.recover_blocks < 1
            or not 0.0 <= self.admit_p <= 1.0
        ):
            raise ValueError(
                "alpha must be in (0, 1), the margins >= 0, recover_blocks >= 1 and admit_p in [0, 1]"
            )


@dataclass(frozen=True)
class MonitorEvent:
    """A change of a task's state, with the numbers that caused it (for the log and the controller)."""

    task_id: str
    version: int
    regressed: bool
    test: ShiftTest

    def describe(self) -> str:
        what = "regressed" if self.regressed else "recovered"
        return f"task {self.task_id} version {self.version} {what}: {self.test.describe()}"


@dataclass
class TaskMonitor:
    """The monitor of one task. Feed it completed single-version episodes with :meth:`observe`."""

    task_id: str
    config: MonitorConfig
    version: int = 0
    eval_return: float = math.nan
    reference: list[float] = field(default_factory=list)
    block: list[float] = field(default_factory=list)
    regressed: bool = False
    episodes: int = 0
    blocks: int = 0
    last_test: ShiftTest | None = None
    _clean_blocks: int = 0

    @property
    def reference_mean(self) -> float:
        """The mean of the live reference (NaN while it is empty)."""
        return float(sum(self.reference) / len(self.reference)) if self.reference else math.nan

    def set_stable(self, version: int, eval_return: float) -> None:
        """The task's stable version is ``version`` now; a change starts a new reference and clears the
        regression (the new version has not been judged)."""
        if version == self.version:
            return
        self.version = version
        self.eval_return = eval_return
        self.reference = []
        self.block = []
        self.regressed = False
        self._clean_blocks = 0
        self.last_test = None

    def observe(self, version: int, episode_return: float) -> MonitorEvent | None:
        """One completed episode played entirely by ``version``; episodes of other versions (a canary, a
        version asked for explicitly) are ignored. Returns an event when the state changes."""
        if version != self.version or not math.isfinite(episode_return):
            return None
        self.episodes += 1
        self.block.append(float(episode_return))
        if len(self.block) < self.config.window:
            return None
        block, self.block = self.block, []
        return self._judge(block)

    def _eval_test(self, block: list[float], alpha: float) -> ShiftTest:
        return below_level(
            block,
            self.eval_return,
            margin=relative_margin(self.eval_return, self.config.eval_margin_fraction),
            alpha=alpha,
        )

    def _judge(self, block: list[float]) -> MonitorEvent | None:
        cfg = self.config
        admit = True  # whether a block that is not worse may join a forming reference
        if len(self.reference) >= cfg.reference_episodes:
            test = worse_than(
                block,
                self.reference,
                margin=relative_margin(self.reference, cfg.margin_fraction),
                alpha=cfg.alpha,
            )
        elif self.reference:
            # A reference still forming is tested against too: an environment that changes while it forms
            # must not be let into it (a half-changed block that passed the wide eval test made the
            # reference bimodal, and no later block could ever be significantly below it). Both tests at
            # alpha/2 (Bonferroni): the block's false-alarm rate stays at most alpha.
            partial = worse_than(
                block,
                self.reference,
                margin=relative_margin(self.reference, cfg.margin_fraction),
                alpha=cfg.alpha / 2 if math.isfinite(self.eval_return) else cfg.alpha,
            )
            admit = partial.p_value >= cfg.admit_p
            tests = [partial]
            if math.isfinite(self.eval_return):
                tests.append(self._eval_test(block, cfg.alpha / 2))
            test = min(tests, key=lambda t: t.p_value / t.alpha)
        elif math.isfinite(self.eval_return):
            test = self._eval_test(block, cfg.alpha)
        else:  # no reference at all yet: this block starts it
            self.reference.extend(block)
            return None
        self.blocks += 1
        self.last_test = test
        if test.worse:
            self._clean_blocks = 0
            if not self.regressed:
                self.regressed = True
                return MonitorEvent(self.task_id, self.version, True, test)
            return None
        if len(self.reference) < cfg.reference_episodes and not self.regressed and admit:
            self.reference.extend(block[: cfg.reference_episodes - len(self.reference)])
        if self.regressed:
            self._clean_blocks += 1
            if self._clean_blocks >= cfg.recover_blocks:
                self.regressed = False
                self._clean_blocks = 0
                return MonitorEvent(self.task_id, self.version, False, test)
        return None


class LiveMonitor:
    """One :class:`TaskMonitor` per task; not thread-safe (the server calls it from its event loop)."""

    def __init__(self, config: MonitorConfig | None = None) -> None:
        self.config = config or MonitorConfig()
        self.tasks: dict[str, TaskMonitor] = {}

    def task(self, task_id: str) -> TaskMonitor:
        found = self.tasks.get(task_id)
        if found is None:
            found = self.tasks[task_id] = TaskMonitor(task_id, self.config)
        return found

    def regressed(self, task_id: str) -> bool:
        found = self.tasks.get(task_id)
        return found is not None and found.regressed
