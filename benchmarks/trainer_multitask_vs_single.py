"""Multi-task (one shared trunk) vs independent single-task PPO at equal samples per task.

For each seed: ``train`` on the suite's training tasks with ``--total-steps`` over all tasks, and
``train_independent`` (one separate network per task, ``total-steps / n_tasks`` steps each). Both run a
fixed budget (no early stop) with the same PPO settings and report the exported best checkpoint's
deterministic return over 10 fresh episodes. Prints per-task mean ± std over seeds and parameter counts.

    .venv/bin/python benchmarks/trainer_multitask_vs_single.py [--seeds 1,2,3] [--total-steps 300000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from trainer_common import machine, mean_std

from polyhead.taskspec import load_suite
from polyhead.trainer.config import PPOConfig
from polyhead.trainer.policy import PolicyConfig
from polyhead.trainer.train import TrainResult, train, train_independent


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suite", default="cartpole-family")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--total-steps", type=int, default=300_000)
    parser.add_argument("--critic", default="separate", choices=("separate", "shared"))
    parser.add_argument("--json-out", default=None, help="also write the raw results here")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    suite = load_suite(args.suite)
    tasks = [t.id for t in suite.train_tasks]
    seeds = [int(s) for s in args.seeds.split(",")]
    base = replace(PPOConfig(), total_steps=args.total_steps, solved_evals=0)
    policy_config = PolicyConfig(critic=args.critic)
    multi: list[TrainResult] = []
    single: list[TrainResult] = []
    for seed in seeds:
        config = replace(base, seed=seed)
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            multi.append(
                train(suite, Path(tmp) / "multi", config=config, policy_config=policy_config, progress=False)
            )
            print(
                f"seed {seed} multi-task: {time.perf_counter() - started:.0f} s {multi[-1].eval_returns}",
                flush=True,
            )
            started = time.perf_counter()
            single.append(
                train_independent(
                    suite, Path(tmp) / "single", config=config, policy_config=policy_config, progress=False
                )
            )
            print(
                f"seed {seed} independent: {time.perf_counter() - started:.0f} s {single[-1].eval_returns}",
                flush=True,
            )

    per_task = args.total_steps // len(tasks)
    print(
        f"\n{suite.name}: {args.total_steps:,} steps in all, {per_task:,} per task, seeds {seeds}, "
        f"critic {args.critic}"
    )
    print(f"{'task':26s} {'multi-task':>16s} {'independent':>16s}")
    for t in tasks:
        m = [r.eval_returns[t] for r in multi]
        s = [r.eval_returns[t] for r in single]
        print(f"{t:26s} {mean_std(m):>16s} {mean_std(s):>16s}")
    print(f"{'parameters (trained)':26s} {multi[0].parameters:>16,} {single[0].parameters:>16,}")
    print(f"{'parameters (policy)':26s} {multi[0].policy_parameters:>16,} {single[0].policy_parameters:>16,}")
    walls = [mean_std([r.wall_seconds for r in runs]) for runs in (multi, single)]
    print(f"{'wall seconds':26s} {walls[0]:>16s} {walls[1]:>16s}")
    if args.json_out:
        Path(args.json_out).write_text(
            json.dumps(
                {
                    "multi": [r.summary() for r in multi],
                    "single": [r.summary() for r in single],
                    "seeds": seeds,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
