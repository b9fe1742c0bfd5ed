"""Small, dependency-free statistics for judging head versions on live episode returns.

Shared by everything that asks "are these returns worse (or better) than those, by more than a tolerated
margin?" with a false-alarm rate that is stated, not hoped for: the server's live-regression monitor
(:mod:`polyhead.livewatch`), the ``polyhead operate`` controller's canary verdicts and the updater's
rollout guard. It lives in the contract layer (numpy only) because the server, which has no torch, uses it
too.

The two-sample test is the one-sided **Mann-Whitney U** (Wilcoxon rank-sum) test with the normal
approximation, a tie correction and a continuity correction (Mann & Whitney 1947; Lehmann,
*Nonparametrics*, ch. 1). Rank tests fit episode returns: they are bounded, skewed and heavily tied (a
solved CartPole episode is exactly 500), which breaks a t-test's normality, and the rank test's
false-alarm rate under "no difference" does not depend on the returns' distribution. The margin is applied
as a shift: H0 is "``new + margin`` is not stochastically smaller than ``reference``", so at most ``alpha``
of verdicts on a version that is as good as its reference are false alarms (fewer when ``margin > 0``).

The one-sample test (a version judged against one recorded number, its evaluation return, before it has
live reference episodes) is the **sign test**: H0 "the median return is at least ``level``"; the p-value is
the exact binomial tail of the count of returns below ``level`` (ties count as not below), so its
false-alarm rate is at most ``alpha`` for any return distribution whose median is at least ``level``.

The Mann-Whitney part is the rollout guard's statistics (written by the issue-12 helper for
``trainer/updater/stats.py``); it is here once so that the server and the trainer share it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class ShiftTest:
    """The outcome of :func:`worse_than`, :func:`better_than` or :func:`below_level`."""

    p_value: float  # P(statistic at least this extreme | H0)
    alpha: float
    new_mean: float
    reference_mean: float
    margin: float
    n_new: int
    n_reference: int  # 0 for the one-sample test against a level

    @property
    def rejected(self) -> bool:
        """True when H0 is rejected at ``alpha``."""
        return self.p_value < self.alpha

    @property
    def worse(self) -> bool:
        """For :func:`worse_than` / :func:`below_level`: the new returns are worse by more than the margin."""
        return self.rejected

    def describe(self) -> str:
        ref = (
            f"{self.reference_mean:.1f} ({self.n_reference} episodes)"
            if self.n_reference
            else (f"level {self.reference_mean:.1f}")
        )
        return (
            f"mean {self.new_mean:.1f} over {self.n_new} episodes vs {ref}, margin {self.margin:.1f}, "
            f"p={self.p_value:.2g} (alpha {self.alpha:g})"
        )


def rankdata(values: Sequence[float] | npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
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


def mann_whitney_less(
    x: Sequence[float] | npt.NDArray[np.float64], y: Sequence[float] | npt.NDArray[np.float64]
) -> float:
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


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def worse_than(new: Sequence[float], reference: Sequence[float], *, margin: float, alpha: float) -> ShiftTest:
    """Test whether ``new`` returns are worse than ``reference`` by more than ``margin`` (absolute).

    Rejects H0 ("``new + margin`` is not stochastically smaller than ``reference``") at level ``alpha``.
    """
    _check_alpha(alpha)
    shifted = np.asarray(new, np.float64) + margin
    p = mann_whitney_less(shifted, reference)
    return ShiftTest(
        p, alpha, float(np.mean(new)), float(np.mean(reference)), margin, len(new), len(reference)
    )


def better_than(
    new: Sequence[float] | npt.NDArray[np.float64],
    reference: Sequence[float] | npt.NDArray[np.float64],
    *,
    margin: float,
    alpha: float,
) -> ShiftTest:
    """Test whether ``new`` returns are better than ``reference`` by more than ``margin`` (absolute).

    Rejects H0 ("``new - margin`` is not stochastically larger than ``reference``") at level ``alpha``:
    the mirror of :func:`worse_than` (the canary widening rule).
    """
    _check_alpha(alpha)
    shifted = np.asarray(new, np.float64) - margin
    p = mann_whitney_less(reference, shifted)
    return ShiftTest(
        p, alpha, float(np.mean(new)), float(np.mean(reference)), margin, len(new), len(reference)
    )


def binomial_tail(k: int, n: int, p: float = 0.5) -> float:
    """P(X >= k) for X ~ Binomial(n, p), exact."""
    if k <= 0:
        return 1.0
    return float(sum(math.comb(n, i) * p**i * (1.0 - p) ** (n - i) for i in range(k, n + 1)))


def below_level(new: Sequence[float], level: float, *, margin: float, alpha: float) -> ShiftTest:
    """Sign test: are ``new`` returns below ``level - margin`` more often than half the time?

    H0: the median of ``new`` is at least ``level - margin``; rejected at ``alpha`` (exact binomial tail).
    """
    _check_alpha(alpha)
    if not new:
        raise ValueError("below_level needs a non-empty sample")
    values = np.asarray(new, np.float64)
    below = int((values < level - margin).sum())
    p = binomial_tail(below, len(values))
    return ShiftTest(p, alpha, float(values.mean()), float(level), margin, len(values), 0)


def relative_margin(reference: Sequence[float] | npt.NDArray[np.float64] | float, fraction: float) -> float:
    """``fraction`` of the reference's mean magnitude (at least ``fraction`` x 1), so one setting fits
    tasks whose returns are near 1 and near 500."""
    mean = float(np.mean(reference)) if not isinstance(reference, float | int) else float(reference)
    return fraction * max(abs(mean), 1.0)
