"""The default run: `polyhead train --suite cartpole-family` with every default setting.

Prints each training task's deterministic eval return (10 fresh episodes of the exported checkpoint),
wall time, steps/s and parameter counts.

    .venv/bin/python benchmarks/trainer_default.py [--seed 1] [--suite cartpole-family]
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
from trainer_common import machine

from polyhead.taskspec import load_suite
from polyhead.trainer.config import PPOConfig
from polyhead.trainer.evaluate import evaluate
from polyhead.trainer.policy import load_policy
from polyhead.trainer.train import train


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suite", default="cartpole-family")
    parser.add_argument("--seed", type=int, default=PPOConfig().seed)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    suite = load_suite(args.suite)
    with tempfile.TemporaryDirectory() as tmp:
        result = train(suite, Path(tmp) / "bundle", config=PPOConfig(seed=args.seed), progress=False)
        policy = load_policy(result.bundle)
    print(f"suite {suite.name}, seed {args.seed}")
    print(f"steps {result.steps:,} (best checkpoint at {result.best_step:,})")
    print(
        f"wall {result.wall_seconds:.1f} s, {result.steps_per_second:,.0f} steps/s (end to end, incl. export)"
    )
    print(f"parameters {result.parameters:,} trained, {result.policy_parameters:,} policy (trunk + heads)")
    for task in suite.train_tasks:
        ret = result.eval_returns[task.id]
        verdict = "ok" if ret >= task.target_return else "NOT SOLVED"
        print(f"  {task.id:26s} {ret:7.1f}  target {task.target_return:g}  {verdict}")
    # Zero-shot: every trained head on every held-out task (10 deterministic episodes each).
    for heldout in suite.heldout_tasks:
        print(f"zero-shot on held-out {heldout.id} (target {heldout.target_return:g}):")
        for task in suite.train_tasks:
            as_head = replace(heldout, id=task.id)  # the held-out env, acted on by this training head
            returns = evaluate(policy, [as_head], episodes=10, seed=args.seed + 900_000)[task.id]
            print(f"  head {task.id:26s} {np.mean(returns):7.1f}")


if __name__ == "__main__":
    main()
