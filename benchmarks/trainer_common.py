"""Helpers shared by the trainer benchmarks: machine description and mean ± std formatting."""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Sequence


def machine() -> str:
    load = os.getloadavg()
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} at start "
        "(machine shared with other engineers)"
    )


def mean_std(values: Sequence[float], digits: int = 1) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"
