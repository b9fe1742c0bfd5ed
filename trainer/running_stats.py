"""Running mean and variance of a stream of numbers (Chan et al.'s parallel algorithm, float64)."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt


def combine_moments(
    mean: Any, var: Any, count: Any, *, batch_mean: Any, batch_var: Any, batch_count: Any
) -> tuple[Any, Any, Any]:
    """Merge a batch's (mean, population variance, count) into running ones (Chan et al. 1979).

    Plain arithmetic, so it serves floats, numpy arrays and torch tensors alike (the observation
    normaliser keeps its statistics as float64 torch buffers).
    """
    delta = batch_mean - mean
    total = count + batch_count
    new_mean = mean + delta * batch_count / total
    m2 = var * count + batch_var * batch_count + delta**2 * count * batch_count / total
    return new_mean, m2 / total, total


class RunningMeanStd:
    """Mean and variance of every value passed to :meth:`update` (the scalar case of gymnasium's)."""

    def __init__(self, epsilon: float = 1e-4) -> None:
        self.mean = 0.0
        self.var = 1.0
        self.count = epsilon

    def update(self, values: npt.NDArray[Any]) -> None:
        x = np.asarray(values, dtype=np.float64).ravel()
        if x.size == 0:
            return
        self.mean, self.var, self.count = combine_moments(
            self.mean,
            self.var,
            self.count,
            batch_mean=float(x.mean()),
            batch_var=float(x.var()),
            batch_count=x.size,
        )

    @property
    def std(self) -> float:
        return float(np.sqrt(self.var + 1e-8))
