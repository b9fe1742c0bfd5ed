"""classic-mixed (CartPole, Acrobot, continuous-force CartPole through one trunk) with and without PCGrad.

Both runs compute the trunk's task-gradient cosine matrix (without PCGrad via --log-grad-cosines, which
does not change the update); both run a fixed budget (no early stop). Prints per-task deterministic
returns of the exported checkpoint and the cosine matrix averaged over the run's logged updates.

    .venv/bin/python benchmarks/trainer_pcgrad.py [--seeds 1] [--total-steps 300000]
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
from trainer_common import machine, mean_std

from polyhead.taskspec import load_suite
from polyhead.trainer.config import PPOConfig
from polyhead.trainer.train import train


def _mean_cosines(path: Path, tasks: list[str]) -> np.ndarray:
    sums: dict[tuple[str, str], list[float]] = defaultdict(list)
    with path.open() as fh:
        for row in csv.DictReader(fh):
            sums[(row["task_a"], row["task_b"])].append(float(row["cosine"]))
    return np.array([[np.mean(sums[(a, b)]) for b in tasks] for a in tasks])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suite", default="classic-mixed")
    parser.add_argument("--seeds", default="1")
    parser.add_argument("--total-steps", type=int, default=300_000)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    suite = load_suite(args.suite)
    tasks = [t.id for t in suite.train_tasks]
    seeds = [int(s) for s in args.seeds.split(",")]
    returns: dict[str, dict[str, list[float]]] = {"none": defaultdict(list), "pcgrad": defaultdict(list)}
    walls: dict[str, list[float]] = {"none": [], "pcgrad": []}
    cosines: dict[str, list[np.ndarray]] = {"none": [], "pcgrad": []}
    for seed in seeds:
        for surgery in ("none", "pcgrad"):
            config = replace(
                PPOConfig(),
                total_steps=args.total_steps,
                seed=seed,
                solved_evals=0,
                grad_surgery=surgery,
                log_grad_cosines=True,
            )
            with tempfile.TemporaryDirectory() as tmp:
                result = train(suite, Path(tmp) / "b", config=config, progress=False)
                cosines[surgery].append(_mean_cosines(result.bundle / "logs" / "grad_cosines.csv", tasks))
            for t in tasks:
                returns[surgery][t].append(result.eval_returns[t])
            walls[surgery].append(result.wall_seconds)
            print(f"seed {seed} {surgery}: {result.wall_seconds:.0f} s {result.eval_returns}", flush=True)

    print(f"\n{suite.name}: {args.total_steps:,} steps in all, seeds {seeds}")
    print(f"{'task':22s} {'target':>8s} {'no surgery':>16s} {'PCGrad':>16s}")
    for task in suite.train_tasks:
        print(
            f"{task.id:22s} {task.target_return:8g} {mean_std(returns['none'][task.id]):>16s} "
            f"{mean_std(returns['pcgrad'][task.id]):>16s}"
        )
    print(f"{'wall seconds':22s} {'':8s} {mean_std(walls['none']):>16s} {mean_std(walls['pcgrad']):>16s}")
    for surgery in ("none", "pcgrad"):
        matrix = np.mean(cosines[surgery], axis=0)
        label = "PCGrad" if surgery == "pcgrad" else "no surgery"
        print(f"\ntrunk task-gradient cosines, mean over updates ({label}):")
        print(" " * 22 + "".join(f"{t[:12]:>14s}" for t in tasks))
        for i, t in enumerate(tasks):
            print(f"{t:22s}" + "".join(f"{matrix[i, j]:14.3f}" for j in range(len(tasks))))


if __name__ == "__main__":
    main()
