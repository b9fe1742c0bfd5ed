"""Running mean and variance of a stream of numbers (Chan et al.'s parallel algorithm, float64)."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt


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
        batch_mean, batch_var, batch_count = float(x.mean()), float(x.var()), x.size
        delta = batch_mean - self.mean
        total = self.count + batch_count
        self.mean += delta * batch_count / total
        m2 = self.var * self.count + batch_var * batch_count + delta**2 * self.count * batch_count / total
        self.var = m2 / total
        self.count = total

    @property
    def std(self) -> float:
        return float(np.sqrt(self.var + 1e-8))
