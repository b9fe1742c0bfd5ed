"""``polyhead demo``: the command-line face of :mod:`polyhead.trainer.demo`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from polyhead.cli import add_common_flags, emit_summary


def register_demo(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "demo",
        help="train, serve, simulate and adapt a new task online (or --scenario drift), with a report",
        description=(
            "The whole story in one command: train the default suite and export the bundle; serve it and "
            "run simulators on every task; a new task arrives and its head is adapted online from the "
            "experience simulators stream through the server, versions swapped in live; then a final "
            "table (new task's return per version, old tasks unchanged, failed requests, swaps) and a "
            "report directory with summary.md and PNG plots."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("demo-report"), help="report directory")
    parser.add_argument(
        "--suite", default="cartpole-family", help="suite to train (built-in name or TOML file)"
    )
    parser.add_argument(
        "--new-task", default="cartpole-reversed", help="the suite's held-out task that arrives online"
    )
    parser.add_argument(
        "--train-steps", type=int, default=None, help="training budget (default: the trainer's default)"
    )
    parser.add_argument(
        "--adapt-steps", type=int, default=60_000, help="new-task samples for the online updater"
    )
    parser.add_argument("--publish-every", type=int, default=3, help="publish a head version every K updates")
    parser.add_argument("--seed", type=int, default=1, help="seed for training, adaptation and simulators")
    parser.add_argument(
        "--eval-episodes", type=int, default=5, help="deterministic episodes per task in tables"
    )
    parser.add_argument(
        "--sim-envs", type=int, default=8, help="simulator environments acting on the new task"
    )
    parser.add_argument("--bundle", type=Path, default=None, help="reuse a trained bundle (skips training)")
    parser.add_argument(
        "--fast",
        action="store_true",
        help="tiny budgets: proves the whole chain in about a minute, not the learning",
    )
    parser.add_argument(
        "--scenario",
        choices=("adapt", "drift"),
        default="adapt",
        help="'adapt': a new task arrives and its head is adapted online (the default story); 'drift': "
        "partway through, one served task's actuator is reversed in its simulators; the server detects "
        "the drop and `polyhead operate` re-adapts the task through canaries while the other tasks keep "
        "acting identically (report: drift_timeline.png)",
    )
    parser.add_argument(
        "--drift-task",
        default="cartpole-long-pole",
        help="drift: the training task whose environment changes",
    )
    parser.add_argument(
        "--stationary-s",
        type=float,
        default=60.0,
        help="drift: seconds of unchanged traffic before the change",
    )
    parser.add_argument(
        "--drift-s",
        type=float,
        default=420.0,
        help="drift: the longest the changed environment runs (the run ends earlier once the task is "
        "recovered and a window of episodes has been played under the recovered head; --budget-s cuts "
        "it shorter when training took long)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=600.0,
        help="drift: the whole run's time budget; the changed environment stops early enough to keep it "
        "(the report says when the cut came before --drift-s)",
    )
    add_common_flags(parser)
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from polyhead.trainer.demo import DemoConfig, run_demo
    from polyhead.trainer.demo_report import write_report

    console = Console(stderr=True, highlight=False, soft_wrap=True)
    config = DemoConfig(
        out=args.out,
        suite=args.suite,
        new_task=args.new_task,
        train_steps=args.train_steps,
        adapt_steps=args.adapt_steps,
        publish_every=args.publish_every,
        seed=args.seed,
        eval_episodes=args.eval_episodes,
        sim_envs=args.sim_envs,
        bundle=args.bundle,
        fast=args.fast,
        scenario=args.scenario,
        drift_task=args.drift_task,
        stationary_s=args.stationary_s,
        drift_s=args.drift_s,
        budget_s=args.budget_s,
    )
    if config.bundle is not None:
        from polyhead.bundle import Bundle

        Bundle.open(config.bundle)  # a wrong --bundle fails here in one line, before anything starts
    if config.scenario == "drift":
        return _run_drift(config, args, console)
    state = run_demo(config, say=console.print)
    data = write_report(state)
    console.print(Path(config.out / "summary.md").read_text(), markup=False)
    ok = data["failed_requests"] == 0 and data["old_tasks_unchanged"] and data["server_exit_code"] == 0
    human = f"report: {config.out / 'summary.md'}" + ("" if ok else "  (some checks FAILED, see the report)")
    emit_summary(data, as_json=args.json, human=human)
    sys.stdout.flush()
    return 0 if ok else 1


def _run_drift(config: Any, args: argparse.Namespace, console: Any) -> int:
    from polyhead.trainer.demo_drift import run_drift_demo
    from polyhead.trainer.demo_report import write_drift_report

    state = run_drift_demo(config, say=console.print)
    data = write_drift_report(state)
    console.print(Path(config.out / "summary.md").read_text(), markup=False)
    ok = (
        data["failed_requests"] == 0
        and data["untouched_unchanged"]
        and data["server_exit_code"] == 0
        and data["operate_exit_code"] == 0
    )
    human = f"report: {config.out / 'summary.md'}" + ("" if ok else "  (some checks FAILED, see the report)")
    emit_summary(data, as_json=args.json, human=human)
    sys.stdout.flush()
    return 0 if ok else 1
