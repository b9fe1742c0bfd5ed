"""Small, dependency-free statistics for judging head versions on live episode returns.

Shared by the rollout guard (:mod:`polyhead.trainer.updater.guard`) and meant for a live-regression
detector: both ask "are these returns worse than those, by more than a tolerated margin?" with a false-alarm
rate that is stated, not hoped for.

The test is the one-sided **Mann-Whitney U** (Wilcoxon rank-sum) test with the normal approximation,
a tie correction and a continuity correction (Mann & Whitney 1947; Lehmann, *Nonparametrics*, ch. 1).
Rank tests fit episode returns: they are bounded, skewed and heavily tied (a solved CartPole episode is
exactly 500), which breaks a t-test's normality, and the rank test's false-alarm rate under "no
difference" does not depend on the returns' distribution. The margin is applied as a shift: H0 is
"``new + margin`` is not stochastically smaller than ``reference``", so at most ``alpha`` of verdicts on a
version that is as good as its reference are false alarms (fewer when ``margin > 0``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ShiftTest:
    """The outcome of :func:`worse_than`."""

    p_value: float  # P(U <= observed | H0: new + margin is not smaller than reference)
    alpha: float
    new_mean: float
    reference_mean: float
    margin: float
    n_new: int
    n_reference: int

    @property
    def worse(self) -> bool:
        """True when H0 is rejected: the new returns are worse than the reference by more than the margin."""
        return self.p_value < self.alpha


def rankdata(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their average rank (scipy.stats.rankdata's 'average')."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return ranks


def mann_whitney_less(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """One-sided p-value of the Mann-Whitney U test for H1: ``x`` is stochastically smaller than ``y``.

    Normal approximation with tie and continuity corrections; 1.0 when every value is tied (no evidence).
    Raises ValueError on an empty sample.
    """
    n1, n2 = len(x), len(y)
    if n1 == 0 or n2 == 0:
        raise ValueError("mann_whitney_less needs two non-empty samples")
    ranks = rankdata(np.concatenate([np.asarray(x, np.float64), np.asarray(y, np.float64)]))
    u1 = float(ranks[:n1].sum()) - n1 * (n1 + 1) / 2.0
    mean_u = n1 * n2 / 2.0
    n = n1 + n2
    _, counts = np.unique(ranks, return_counts=True)
    tie_term = float((counts**3 - counts).sum()) / (n * (n - 1)) if n > 1 else 0.0
    var_u = n1 * n2 / 12.0 * ((n + 1) - tie_term)
    if var_u <= 0.0:
        return 1.0
    z = (u1 - mean_u + 0.5) / math.sqrt(var_u)  # +0.5: continuity correction towards H0
    return 0.5 * math.erfc(-z / math.sqrt(2.0))  # Phi(z)


def worse_than(new: Sequence[float], reference: Sequence[float], *, margin: float, alpha: float) -> ShiftTest:
    """Test whether ``new`` returns are worse than ``reference`` by more than ``margin`` (absolute).

    Rejects H0 ("``new + margin`` is not stochastically smaller than ``reference``") at level ``alpha``.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    shifted = np.asarray(new, np.float64) + margin
    p = mann_whitney_less(shifted, reference)
    return ShiftTest(
        p_value=p,
        alpha=alpha,
        new_mean=float(np.mean(new)),
        reference_mean=float(np.mean(reference)),
        margin=margin,
        n_new=len(new),
        n_reference=len(reference),
    )


def relative_margin(reference: Sequence[float], fraction: float) -> float:
    """``fraction`` of the reference's mean magnitude (at least ``fraction`` x 1), so one setting fits
    tasks whose returns are near 1 and near 500."""
    return fraction * max(abs(float(np.mean(reference))), 1.0)
