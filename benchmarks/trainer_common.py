"""Helpers shared by the trainer benchmarks: machine description, mean ± std formatting, running a
`polyhead ... --json` command, reading a run's steps/s, writing a report."""

from __future__ import annotations

import csv
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


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


def run_polyhead(
    command: Sequence[str], *, cwd: Path = ROOT, env: Mapping[str, str] | None = None
) -> tuple[dict[str, Any], float, float]:
    """Run a ``polyhead ... --json`` command: (its JSON summary, wall seconds, 1-minute load average at the
    start). A failed command ends the benchmark, naming the command and the tail of its stderr."""
    load = os.getloadavg()[0]
    started = time.perf_counter()
    proc = subprocess.run(list(command), capture_output=True, text=True, cwd=cwd, env=env, check=False)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    summary: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return summary, wall, load


def train_steps_per_second(run_dir: Path) -> float:
    """Training steps per second of a `polyhead train` run, from the first to the last row of its
    logs/metrics.csv (start-up and the final evaluation excluded)."""
    with (run_dir / "logs" / "metrics.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    first, last = rows[0], rows[-1]
    span = float(last["wall_seconds"]) - float(first["wall_seconds"])
    return round((int(last["step"]) - int(first["step"])) / span, 1)


def write_report(report: Mapping[str, Any], out: Path | None) -> None:
    """The report as indented JSON at ``out`` (nothing when None)."""
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
