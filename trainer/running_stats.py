"""Running mean and variance of a stream of numbers (Chan et al.'s parallel algorithm, float64)."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import torch


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


def fold_moments(
    means: torch.Tensor, variances: torch.Tensor, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Combine P parts' statistics ``[P, S]`` (mean, population variance, count per statistic) into the
    union's ``[S]``, with :func:`combine_moments` applied part after part (so in a fixed order).

    Parts with count 0 leave a statistic unchanged; a statistic no part has seen comes out as (0, 0, 0).
    """
    mean, var, count = means[0], variances[0], counts[0]
    for p in range(1, means.shape[0]):
        new_mean, new_var, total = combine_moments(
            mean, var, count, batch_mean=means[p], batch_var=variances[p], batch_count=counts[p]
        )
        seen = total > 0  # 0/0 where neither side has seen anything yet
        mean = torch.where(seen, new_mean, mean)
        var = torch.where(seen, new_var, var)
        count = total
    return mean, var, count


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
        self.update_moments(float(x.mean()), float(x.var()), x.size)

    def update_moments(self, batch_mean: float, batch_var: float, batch_count: float) -> None:
        """Merge a batch known only by its moments (e.g. every rank's batch, combined); count 0 is a no-op."""
        if batch_count <= 0:
            return
        self.mean, self.var, self.count = combine_moments(
            self.mean,
            self.var,
            self.count,
            batch_mean=float(batch_mean),
            batch_var=float(batch_var),
            batch_count=float(batch_count),
        )

    def state(self) -> tuple[float, float, float]:
        return float(self.mean), float(self.var), float(self.count)

    def load_state(self, state: tuple[float, float, float]) -> None:
        self.mean, self.var, self.count = (float(v) for v in state)

    @property
    def std(self) -> float:
        return float(np.sqrt(self.var + 1e-8))
