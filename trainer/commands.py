"""The trainer's ``polyhead`` subcommands (registered through the ``polyhead.commands`` entry points)."""

from __future__ import annotations

import argparse
from typing import Any

from polyhead.cli import add_common_flags, emit_summary
from polyhead.errors import InvalidArgument
from polyhead.taskspec import builtin_suites, load_suite


def register_train(subparsers: Any) -> None:
    """``polyhead train --suite NAME_OR_FILE --out DIR [--total-steps N] [--seed S] [...]``."""
    from polyhead.trainer.config import PPOConfig
    from polyhead.trainer.options import add_dataclass_options
    from polyhead.trainer.policy import PolicyConfig

    parser: argparse.ArgumentParser = subparsers.add_parser(
        "train",
        help="train a shared-trunk multi-head policy on a task suite with multi-task PPO; export a bundle",
        description=(
            "Train one policy (a shared trunk plus a head per task) on every 'train' task of a suite with "
            "multi-task PPO, evaluate it deterministically as it trains, and export the best checkpoint as a "
            "bundle (trunk.onnx, one head.onnx per task, trunk.pt, manifest). Logs (CSV, TensorBoard) go to "
            "--run-dir and into the bundle's logs/."
        ),
    )
    parser.add_argument(
        "--suite",
        default="cartpole-family",
        help=f"built-in suite name ({', '.join(builtin_suites())}) or a suite TOML file "
        "(default: %(default)s)",
    )
    parser.add_argument("--out", required=True, help="bundle directory to write (must be empty or absent)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")
    parser.add_argument(
        "--run-dir", default=None, help="directory for CSV and TensorBoard logs (default: OUT.logs)"
    )
    parser.add_argument(
        "--independent",
        action="store_true",
        help="baseline: train one separate network per task on total-steps / n_tasks steps each, "
        "exported as OUT/<task>/ bundles",
    )
    parser.add_argument(
        "--exporter",
        default="dynamo",
        choices=("dynamo", "torchscript"),
        help="ONNX exporter: torch.export + onnxscript ('dynamo'), or the legacy TorchScript tracer "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="show a progress bar with per-task returns on stderr when it is a terminal (default: on)",
    )
    add_common_flags(parser)
    add_dataclass_options(parser.add_argument_group("PPO"), PPOConfig)
    add_dataclass_options(parser.add_argument_group("policy architecture"), PolicyConfig)
    parser.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from polyhead.trainer.config import PPOConfig
    from polyhead.trainer.options import dataclass_from_args
    from polyhead.trainer.policy import PolicyConfig
    from polyhead.trainer.train import train, train_independent

    suite = load_suite(args.suite)
    try:
        config = dataclass_from_args(PPOConfig, args)
        policy_config = dataclass_from_args(PolicyConfig, args)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from exc
    common = {
        "config": config,
        "policy_config": policy_config,
        "overwrite": args.overwrite,
        "progress": args.progress,
        "exporter": args.exporter,
    }
    if args.independent:
        result = train_independent(suite, args.out, **common)
    else:
        result = train(suite, args.out, run_dir=args.run_dir, **common)
    lines = [
        f"bundle {result.bundle}: {result.steps:,} steps in {result.wall_seconds:.1f} s, "
        f"{result.parameters:,} parameters"
    ]
    for task_id, value in result.eval_returns.items():
        mark = "solved" if result.solved.get(task_id) else ""
        lines.append(f"  {task_id:28s} eval return {value:8.1f} {mark}")
    emit_summary(result.summary(), as_json=args.json, human="\n".join(lines))
    return 0
