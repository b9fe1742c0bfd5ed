"""Multi-task (one shared trunk) vs independent single-task PPO at equal samples per task.

For each seed: ``train`` on the suite's training tasks with ``--total-steps`` over all tasks, and
``train_independent`` (one separate network per task, ``total-steps / n_tasks`` steps each). Both run a
fixed budget (no early stop) with the same PPO settings and report the exported best checkpoint's
deterministic return over 10 fresh episodes. Prints per-task mean ± std over seeds and parameter counts,
and the same on the normalised scale (0 = a random policy, 1 = the task's target return; see
polyhead/scores.py) with the issue-12 target: multi-task at least matches independent on 3 of 4 tasks
(here: on at least 3/4 of the tasks), "matches" meaning a seed-mean normalised score no more than
``--match-tolerance`` below independent's, on a task where at least one arm reached 0.3 (where neither learned
there is no verdict and the task does not count as matched).

    .venv/bin/python benchmarks/trainer_multitask_vs_single.py [--seeds 1,2,3] [--total-steps 300000] \
        [--suite minigrid-keys --json-out docs/x.json --plot docs/x.png]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from trainer_common import machine, mean_std

from polyhead.scores import normalise, random_return
from polyhead.taskspec import load_suite
from polyhead.trainer.config import PPOConfig
from polyhead.trainer.policy import PolicyConfig
from polyhead.trainer.train import TrainResult, train, train_independent

if TYPE_CHECKING:
    from polyhead.taskspec import Suite


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suite", default="cartpole-family")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--total-steps", type=int, default=300_000)
    parser.add_argument("--critic", default="separate", choices=("separate", "shared"))
    parser.add_argument("--json-out", default=None, help="also write the raw results here")
    parser.add_argument("--plot", default=None, help="PNG: normalised score per task, both arms")
    parser.add_argument(
        "--match-tolerance",
        type=float,
        default=0.05,
        help="multi-task 'matches' independent when its mean normalised score is at most this much lower",
    )
    parser.add_argument("--random-episodes", type=int, default=20, help="episodes for the random baseline")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="processes: >1 runs the multi-task run and each independent task's run of a seed side by side "
        "(same runs and results as sequential; the independent arm's wall time is then the sum of its runs)",
    )
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
        if args.jobs > 1:
            m, s = _side_by_side(suite, config, policy_config, args.jobs)
            multi.append(m)
            single.append(s)
            print(f"seed {seed} multi-task: {m.wall_seconds:.0f} s {m.eval_returns}", flush=True)
            print(f"seed {seed} independent: {s.wall_seconds:.0f} s {s.eval_returns}", flush=True)
            continue
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

    randoms = {t.id: random_return(t, args.random_episodes) for t in suite.train_tasks}
    targets = {t.id: t.target_return for t in suite.train_tasks}
    scores: dict[str, dict[str, list[float]]] = {}
    print(f"\nnormalised (0 random, 1 target), match tolerance {args.match_tolerance}")
    matched = 0
    for t in tasks:
        m = [normalise(r.eval_returns[t], randoms[t], targets[t]) for r in multi]
        s = [normalise(r.eval_returns[t], randoms[t], targets[t]) for r in single]
        scores[t] = {"multi": m, "independent": s}
        # Where neither arm learned (both below 0.3), "matches" would be hollow: it does not count.
        learned = max(float(np.mean(m)), float(np.mean(s))) >= 0.3
        ok = learned and float(np.mean(m)) >= float(np.mean(s)) - args.match_tolerance
        matched += ok
        verdict = "matches" if ok else ("behind" if learned else "neither learned (no verdict)")
        print(f"{t:26s} {_ms(m):>16s} {_ms(s):>16s} {verdict}")
    fewer = multi[0].policy_parameters < single[0].policy_parameters
    met = 4 * matched >= 3 * len(tasks) and fewer
    print(
        f"multi-task matches independent on {matched} of {len(tasks)} tasks with "
        f"{'fewer' if fewer else 'NOT fewer'} policy parameters: target {'met' if met else 'missed'}"
    )
    if args.plot:
        plot(scores, Path(args.plot), title=f"{suite.name}: {per_task:,} samples per task, seeds {seeds}")
    if args.json_out:
        Path(args.json_out).write_text(
            json.dumps(
                {
                    "machine": machine(),
                    "suite": suite.name,
                    "total_steps": args.total_steps,
                    "multi": [r.summary() for r in multi],
                    "single": [r.summary() for r in single],
                    "seeds": seeds,
                    "random_returns": randoms,
                    "target_returns": targets,
                    "normalised": scores,
                    "matched": matched,
                    "target_met": met,
                },
                indent=2,
            )
        )


def _train(suite: Suite, config: PPOConfig, policy_config: PolicyConfig) -> TrainResult:
    with tempfile.TemporaryDirectory() as tmp:
        # torchscript: faster than dynamo here, and the returns do not depend on it (parity-checked).
        return train(
            suite,
            Path(tmp) / "bundle",
            config=config,
            policy_config=policy_config,
            progress=False,
            exporter="torchscript",
        )


def _side_by_side(
    suite: Suite, config: PPOConfig, policy_config: PolicyConfig, jobs: int
) -> tuple[TrainResult, TrainResult]:
    """One seed's multi-task run and the independent runs (train_independent's, one per task) in parallel."""
    from polyhead.taskspec import Suite

    tasks = suite.train_tasks
    per_task = replace(config, total_steps=max(1, config.total_steps // len(tasks)), task_weights=())
    singles = [
        Suite(
            name=f"{suite.name}/{t.id}",
            tasks=(t,),
            source=suite.source,
            encoders=(replace(suite.encoder_for(t.id), tasks=(t.id,)),),  # its group's kind, alone
        )
        for t in tasks
    ]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        multi = pool.submit(_train, suite, config, policy_config)
        runs = [pool.submit(_train, one, per_task, policy_config) for one in singles]
        results = {t.id: r.result() for t, r in zip(tasks, runs, strict=True)}
        multi_result = multi.result()
    independent = TrainResult(
        bundle=Path("-"),
        suite=suite.name,
        steps=sum(r.steps for r in results.values()),
        wall_seconds=sum(r.wall_seconds for r in results.values()),
        parameters=sum(r.parameters for r in results.values()),
        policy_parameters=sum(r.policy_parameters for r in results.values()),
        eval_returns={t: r.eval_returns[t] for t, r in results.items()},
        eval_episodes={t: r.eval_episodes[t] for t, r in results.items()},
        best_step=0,
        solved={t: r.solved.get(t, False) for t, r in results.items()},
        runs=results,
    )
    return multi_result, independent


def _ms(values: list[float]) -> str:
    return f"{np.mean(values):.2f} ± {np.std(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def plot(scores: dict[str, dict[str, list[float]]], path: Path, *, title: str) -> None:
    """Grouped bars: seed-mean normalised score per task for both arms, every seed as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.8 * len(scores) + 2, 4))
    for offset, arm, color in ((-0.2, "multi", "tab:blue"), (0.2, "independent", "tab:green")):
        for i, values in enumerate(v[arm] for v in scores.values()):
            label = arm if i == 0 else None
            ax.bar(i + offset, float(np.mean(values)), width=0.4, color=color, alpha=0.7, label=label)
            ax.scatter([i + offset] * len(values), values, color="k", s=10, zorder=3)
    ax.axhline(1.0, color="grey", ls=":", lw=1)
    ax.set_xticks(range(len(scores)), list(scores), rotation=15, fontsize=8)
    ax.set_ylabel("normalised return (0 random, 1 target)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
