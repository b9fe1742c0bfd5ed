"""Training logs: CSV files and TensorBoard events in a run directory, and a progress display on stderr.

Files written to the run directory (also copied into the bundle's ``logs/`` at export):

* ``metrics.csv``: one row per PPO iteration (step, wall and CPU time, steps/s, learning rate, per-task
  ``TASK/episode_return``, losses, entropy, approximate KL, clip fraction, envs stepped);
* ``eval.csv``: one row per task per deterministic evaluation;
* ``grad_cosines.csv``: the trunk task-gradient cosine matrix (long format) when computed;
* ``events.out.tfevents.*``: the same scalars for TensorBoard (``tensorboard --logdir RUN_DIR``).
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

import numpy as np
import numpy.typing as npt

log = logging.getLogger("polyhead.trainer")


def _truncate_after(path: Path, step: int) -> None:
    """Keep a CSV log's header and its rows up to ``step`` (the first column)."""
    if not path.is_file():
        return
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    # A row cut short by a killed process has no valid step and goes too.
    kept = rows[:1] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= step]
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows(kept)


class RunLogger:
    """Writes the run directory's logs and drives the progress bar (rich, on stderr when it is a TTY;
    otherwise one log line per evaluation)."""

    def __init__(
        self,
        run_dir: Path,
        task_ids: Sequence[str],
        total_steps: int,
        *,
        progress: bool = True,
        resume_step: int | None = None,
    ) -> None:
        """``resume_step``: continue the logs of a run resumed from its checkpoint at that step (rows
        logged after it, by the attempt that did not reach the next checkpoint, are dropped)."""
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.task_ids = list(task_ids)
        self.total_steps = total_steps
        self._metrics_file: TextIO | None = None
        self._metrics: csv.DictWriter[str] | None = None
        self._cos_file: TextIO | None = None
        eval_path = run_dir / "eval.csv"
        if resume_step is not None and eval_path.is_file():
            for name in ("metrics.csv", "eval.csv", "grad_cosines.csv"):
                _truncate_after(run_dir / name, resume_step)
            self._eval_file = eval_path.open("a", newline="")
            self._eval = csv.writer(self._eval_file)
            metrics_path = run_dir / "metrics.csv"
            with contextlib.suppress(FileNotFoundError), metrics_path.open(newline="") as fh:
                fieldnames = next(csv.reader(fh), None)
                if fieldnames:  # else: empty (never flushed); iteration() starts it afresh
                    self._metrics_file = metrics_path.open("a", newline="")
                    self._metrics = csv.DictWriter(self._metrics_file, fieldnames=fieldnames)
            if (run_dir / "grad_cosines.csv").is_file():
                self._cos_file = (run_dir / "grad_cosines.csv").open("a", newline="")
        else:
            self._eval_file = eval_path.open("w", newline="")
            self._eval = csv.writer(self._eval_file)
            self._eval.writerow(
                ["step", "wall_seconds", "task", "eval_return_mean", "eval_return_std", "episodes"]
            )
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard hides the resumed-over events after the checkpoint's step.
        self.tb = SummaryWriter(
            log_dir=str(run_dir), purge_step=None if resume_step is None else resume_step + 1
        )
        self._progress: Any = None
        self._bar: Any = None
        if progress and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                TextColumn("{task.completed:,}/{task.total:,} steps"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[returns]}"),
                console=Console(stderr=True),
                transient=False,
            )
            self._bar = self._progress.add_task("train", total=total_steps, returns="")
            self._progress.start()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def iteration(self, step: int, scalars: Mapping[str, Any], returns: Mapping[str, float]) -> None:
        """One PPO iteration's scalars; ``returns`` are the recent training episode returns per task."""
        row = {"step": step, **scalars}
        if self._metrics is None:
            self._metrics_file = (self.run_dir / "metrics.csv").open("w", newline="")
            self._metrics = csv.DictWriter(self._metrics_file, fieldnames=list(row))
            self._metrics.writeheader()
        self._metrics.writerow({k: row.get(k) for k in self._metrics.fieldnames})
        for key, value in scalars.items():
            if isinstance(value, int | float) and math.isfinite(value):
                self.tb.add_scalar(key if "/" in key else f"charts/{key}", value, step)
        if self._progress is not None:
            text = "  ".join(f"{t[:14]} {r:6.1f}" for t, r in returns.items() if math.isfinite(r))
            self._progress.update(self._bar, completed=min(step, self.total_steps), returns=text)

    def evaluation(self, step: int, wall: float, results: Mapping[str, list[float]]) -> None:
        for task_id, values in results.items():
            mean = float(np.mean(values)) if values else float("nan")
            std = float(np.std(values)) if values else float("nan")
            self._eval.writerow([step, f"{wall:.2f}", task_id, f"{mean:.3f}", f"{std:.3f}", len(values)])
            self.tb.add_scalar(f"{task_id}/eval_return", mean, step)
        self._eval_file.flush()
        text = ", ".join(f"{t} {np.mean(v):.1f}" for t, v in results.items())
        if self._progress is not None:
            self._progress.console.print(f"eval @ {step:,} steps ({wall:.0f} s): {text}")
        else:
            log.info("eval @ %s steps (%.0f s): %s", f"{step:,}", wall, text)

    def grad_cosines(self, step: int, matrix: npt.NDArray[np.float64]) -> None:
        if self._cos_file is None:
            self._cos_file = (self.run_dir / "grad_cosines.csv").open("w", newline="")
            csv.writer(self._cos_file).writerow(["step", "task_a", "task_b", "cosine"])
        writer = csv.writer(self._cos_file)
        for i, a in enumerate(self.task_ids):
            for j, b in enumerate(self.task_ids):
                writer.writerow([step, a, b, f"{matrix[i, j]:.4f}"])
                if i < j:
                    self.tb.add_scalar(f"grad_cosine/{a}|{b}", float(matrix[i, j]), step)

    def files(self) -> dict[str, bytes]:
        """The run directory's files (flushed), relative path -> bytes, for the bundle's ``logs/``."""
        self.flush()
        return {p.name: p.read_bytes() for p in sorted(self.run_dir.iterdir()) if p.is_file()}

    def flush(self) -> None:
        for fh in (self._metrics_file, self._eval_file, self._cos_file):
            if fh is not None:
                fh.flush()
        self.tb.flush()

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        self.flush()
        self.tb.close()
        for fh in (self._metrics_file, self._eval_file, self._cos_file):
            if fh is not None and not fh.closed:
                fh.close()
