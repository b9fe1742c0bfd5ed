"""Cheap measurements for choosing held-out tasks (issue 12): how many samples a from-scratch network
needs to reach 0.9 on the normalised scale, and (with ``--bundle``) what the bundle's old heads score
zero-shot and what fresh heads on its frozen trunk score at 0 samples.

    .venv/bin/python benchmarks/heldout_probe.py --suite /tmp/probe.toml --tasks lavagap-6 \
        --samples 60000 --eval-every 4096 --ent-coef 0.01 --out /tmp/probe-lavagap-6.json

The bar for a held-out task: best old head zero-shot and fresh heads (mean of 3 seeds) at most 0.3, and
from scratch needs at least 30k samples to reach 0.9. ``--tasks`` may name tasks of any role; the
from-scratch network is the suite's encoder kind for the task (its ``[[encoder]]`` group, alone) with the
trainer's PPO defaults and the overrides given here, the same recipe as ``polyhead train --independent``.
Evaluations are deterministic, on fixed episode seeds, like ``adapt_heldout.py``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from adapt_heldout import EVAL_SEED, eval_return, train_curve
from trainer_common import machine

from polyhead.envs import task_spaces
from polyhead.scores import normalise, random_return
from polyhead.taskspec import Suite, TaskSpec, load_suite
from polyhead.trainer.config import PPOConfig
from polyhead.trainer.policy import PolicyConfig, build_policy, load_policy
from polyhead.trainer.updater.floor import zero_shot_floor

BAR = 0.9


def from_scratch(suite: Suite, task: TaskSpec, ppo: PPOConfig, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(ppo.seed)
    np.random.seed(ppo.seed)
    own = replace(suite.encoder_for(task.id), tasks=(task.id,))
    policy = build_policy(PolicyConfig(), [task], {task.id: task_spaces(task)}, (own,))
    optimizer = torch.optim.Adam(policy.parameters(), lr=ppo.learning_rate, eps=1e-5)
    started = time.perf_counter()
    curve = train_curve(
        policy, task, optimizer, ppo, args.samples, learner=None, seed=ppo.seed,
        eval_every=args.eval_every, episodes=args.episodes, label="from scratch",
    )  # fmt: skip
    return {"seed": ppo.seed, "curve": curve, "seconds": time.perf_counter() - started}


def first_at(curve: list[tuple[int, float]], random: float, target: float) -> int | None:
    """Samples at the first evaluation at or above 0.9 on the normalised scale (None: never)."""
    for samples, value in curve:
        if normalise(value, random, target) >= BAR:
            return samples
    return None


def bundle_probe(bundle: Path, suite: Suite, task: TaskSpec, args: argparse.Namespace) -> dict[str, Any]:
    """Old heads zero-shot (best by return) and fresh heads of seeds 1-3 at 0 samples on the trunk."""
    fresh = []
    best: dict[str, Any] = {}
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        policy = load_policy(bundle)
        policy.add_head(task.id, task_spaces(task)[1])
        fresh.append(eval_return(policy, task, args.episodes))
        if not best:
            floor = zero_shot_floor(
                policy,
                task,
                task_spaces(task)[1],
                old_tasks=[t.id for t in suite.train_tasks],
                episodes=args.episodes,
                seed=EVAL_SEED,
            )
            best = {"head": floor.best_head, "return": floor.best_return, "returns": floor.returns}
    return {"fresh": fresh, "zero_shot": best}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suite", required=True, help="suite name or TOML file holding the candidates")
    parser.add_argument("--tasks", nargs="+", required=True, help="candidate task ids (any role)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1])
    parser.add_argument("--samples", type=int, default=60_000)
    parser.add_argument("--eval-every", type=int, default=4_096)
    parser.add_argument("--episodes", type=int, default=5, help="deterministic episodes per evaluation")
    parser.add_argument("--ent-coef", type=float, default=None, help="entropy bonus (default: trainer's)")
    parser.add_argument("--random-episodes", type=int, default=20)
    parser.add_argument("--bundle", type=Path, default=None, help="also probe zero-shot and fresh heads")
    parser.add_argument("--no-scratch", action="store_true", help="only the bundle probe")
    parser.add_argument("--out", type=Path, required=True, help="JSON results")
    args = parser.parse_args()
    print(f"machine: {machine()}", flush=True)
    suite = load_suite(args.suite)
    by_id = {t.id: t for t in suite.tasks}
    ppo = PPOConfig()
    if args.ent_coef is not None:
        ppo = replace(ppo, ent_coef=args.ent_coef)
    results: dict[str, Any] = {"machine": machine(), "ppo": {"ent_coef": ppo.ent_coef}, "tasks": {}}
    for task_id in args.tasks:
        task = by_id[task_id]
        random = random_return(task, args.random_episodes)
        row: dict[str, Any] = {"random": random, "target": task.target_return, "scratch": []}
        if args.bundle is not None:
            row["bundle"] = bundle_probe(args.bundle, suite, task, args)
            norm = [round(normalise(v, random, task.target_return), 2) for v in row["bundle"]["fresh"]]
            zs = row["bundle"]["zero_shot"]
            print(
                f"{task_id}: fresh heads {norm} (normalised); best old head {zs['head']} "
                f"{normalise(zs['return'], random, task.target_return):.2f}",
                flush=True,
            )
        if not args.no_scratch:
            for seed in args.seeds:
                run = from_scratch(suite, task, replace(ppo, seed=seed), args)
                run["samples_to_0.9"] = first_at(run["curve"], random, task.target_return)
                row["scratch"].append(run)
                print(
                    f"{task_id} seed {seed}: random {random:.3f}, samples to 0.9: {run['samples_to_0.9']}, "
                    f"{run['seconds']:.0f} s",
                    flush=True,
                )
        results["tasks"][task_id] = row
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
