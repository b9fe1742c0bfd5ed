"""``polyhead operate``: the controller that re-adapts tasks that regress under live traffic (registered
through the ``polyhead.commands`` entry point ``operate = polyhead.trainer.operate_commands:register``)."""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path
from typing import Any

from polyhead.cli import add_common_flags, emit_summary
from polyhead.errors import InvalidArgument

_SKIPPED_PPO = ("task_weights", "task_sampling", "grad_surgery", "log_grad_cosines", "final_eval_episodes")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def register(subparsers: Any) -> None:
    """``polyhead operate --server HOST:PORT --bundle DIR [...]``."""
    from polyhead.trainer.config import PPOConfig
    from polyhead.trainer.options import add_dataclass_options
    from polyhead.trainer.updater.config import ADAPT_PPO

    parser: argparse.ArgumentParser = subparsers.add_parser(
        "operate",
        help="watch live tasks; re-adapt a task that regresses, through canaries (long-running)",
        description=(
            "The long-running controller. It watches every task of one or more replicas; when a server's "
            "live-return monitor marks a task's stable version regressed (the environment changed under "
            "it), it trains that task's head from live experience on the frozen trunk (from the current "
            "head or a fresh one, whichever plays better live), publishes candidates as a canary at a "
            "small share, widens the share while the canary is significantly better than stable, promotes "
            "it, rolls back a canary that is worse, and gives up after a budget (metric "
            "polyhead_operate_gave_up, alert PolyheadOperateGaveUp). Every decision is logged with its "
            "numbers. Killed and started again it resumes from its state directory. `polyhead adapt` "
            "stays the one-shot tool for new tasks."
        ),
    )
    parser.add_argument(
        "--server",
        required=True,
        action="append",
        help="data-plane HOST:PORT of a replica; repeat (or comma-separate) for several replicas",
    )
    parser.add_argument("--bundle", required=True, type=Path, help="the bundle the servers serve (shared)")
    parser.add_argument(
        "--admin-target",
        action="append",
        default=None,
        help="HeadAdmin HOST:PORT, one per --server in the same order (default: each server's host, port "
        "50052)",
    )
    parser.add_argument("--admin-token", default=None, help="bearer token of the servers' admin service")
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="the controller's state and decisions.jsonl (default: <bundle>.operate beside the bundle)",
    )
    parser.add_argument("--task", action="append", default=None, help="watch only this task (repeatable)")
    parser.add_argument(
        "--poll", type=float, default=2.0, metavar="S", help="seconds between polls (default: 2)"
    )
    parser.add_argument(
        "--shares",
        type=_floats,
        default=(10.0, 25.0, 50.0),
        help="canary shares in percent, comma-separated: start at the first, widen through the rest while "
        "significantly better, then promote (default: 10,25,50)",
    )
    parser.add_argument(
        "--judge-episodes",
        type=int,
        default=20,
        metavar="N",
        help="episodes before each verdict, counted as 2 n_canary n_stable / (n_canary + n_stable), the "
        "equal-split size of the same test power (default: %(default)s)",
    )
    parser.add_argument(
        "--alpha", type=float, default=0.01, help="level of each canary test (default: %(default)s)"
    )
    parser.add_argument(
        "--worse-margin",
        type=float,
        default=0.1,
        help="roll back a canary worse than stable by more than this fraction of stable's mean "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--publish-every", type=int, default=4, metavar="K", help="PPO updates per candidate (default: 4)"
    )
    parser.add_argument(
        "--budget-steps",
        type=int,
        default=200_000,
        metavar="N",
        help="live samples one recovery may train on before it gives up (default: %(default)s)",
    )
    parser.add_argument(
        "--max-candidates",
        type=int,
        default=24,
        metavar="N",
        help="candidates one recovery may publish before it gives up (default: %(default)s)",
    )
    parser.add_argument(
        "--supersede",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="replace a first-share canary that had its episodes without a verdict by the newer candidate "
        "trained meanwhile, instead of waiting 3x as long for an inconclusive verdict (default: on)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="P",
        help="serve the controller's Prometheus metrics on port P (0: any free port)",
    )
    parser.add_argument(
        "--max-runtime",
        type=float,
        default=None,
        metavar="S",
        help="stop after S seconds (default: until SIGINT/SIGTERM)",
    )
    parser.add_argument(
        "--exporter",
        default="dynamo",
        choices=("dynamo", "torchscript"),
        help="ONNX exporter for published heads (default: %(default)s)",
    )
    add_common_flags(parser)
    group = parser.add_argument_group("PPO (one head on the frozen trunk)")
    add_dataclass_options(group, PPOConfig, skip=_SKIPPED_PPO)
    for action in group._group_actions:
        default = getattr(ADAPT_PPO, action.dest)
        if default != action.default and action.help is not None:
            action.help = action.help.replace(f"(default: {action.default})", f"(default: {default})")
        action.default = default
    parser.set_defaults(func=_operate)


def _operate(args: argparse.Namespace) -> int:
    from polyhead.trainer.config import PPOConfig
    from polyhead.trainer.operate import OperateConfig, Operator
    from polyhead.trainer.options import dataclass_from_args

    servers = tuple(s.strip() for arg in args.server for s in arg.split(",") if s.strip())
    admins = tuple(s.strip() for arg in (args.admin_target or ()) for s in arg.split(",") if s.strip())
    try:
        config = OperateConfig(
            bundle=args.bundle,
            servers=servers,
            admin_targets=admins,
            admin_token=args.admin_token,
            state_dir=args.state_dir,
            tasks=tuple(args.task or ()),
            poll_s=args.poll,
            shares=args.shares,
            judge_episodes=args.judge_episodes,
            alpha=args.alpha,
            worse_margin=args.worse_margin,
            publish_every=args.publish_every,
            budget_steps=args.budget_steps,
            max_candidates=args.max_candidates,
            supersede=args.supersede,
            ppo=dataclass_from_args(PPOConfig, args),
            exporter=args.exporter,
            metrics_port=args.metrics_port,
            max_runtime_s=args.max_runtime,
        )
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from exc
    operator = Operator(config)
    if config.metrics_port is not None:
        operator.metrics.serve(config.metrics_port)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    summary = operator.run(stop)
    human = (
        f"operate: {sum(summary['decisions'].values())} decisions {summary['decisions']}; recovered "
        f"{summary['recovered'] or 'none'}; gave up on {summary['gave_up'] or 'none'}; state in "
        f"{summary['state_dir']}"
    )
    emit_summary(summary, as_json=args.json, human=human)
    return 0
