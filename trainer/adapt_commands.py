"""``polyhead adapt``: the online updater's subcommand (registered through the ``polyhead.commands``
entry point ``adapt = polyhead.trainer.adapt_commands:register_adapt``)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from polyhead.cli import add_common_flags, emit_summary
from polyhead.errors import InvalidArgument

#: PPO fields that mean nothing for one head on a frozen trunk (multi-task weighting and surgery) or that
#: adapt replaces (the final evaluation uses --zero-shot-episodes, the floor's episodes).
_SKIPPED_PPO = ("task_weights", "task_sampling", "grad_surgery", "log_grad_cosines", "final_eval_episodes")


_ADAPT_HELP = {
    "total_steps": "new-task samples (environment steps) to train on; local --init both gives each head half",
    "envs_per_task": "local: parallel environments; remote: envs x --num-steps is the batch of one update",
    "num_steps": "local: steps per environment per rollout; remote: see --envs-per-task",
    "num_minibatches": "minibatches per epoch",
    "eval_interval": "local: deterministic evaluation every this many samples (the learning curve)",
    "solved_evals": "local: stop a head early after this many evaluations in a row at the task's target "
    "return (0: always use the whole budget)",
}


def register_adapt(subparsers: Any) -> None:
    """``polyhead adapt --bundle DIR --task-spec FILE [--server HOST:PORT] [--source local|remote] ...``."""
    from polyhead.trainer.config import PPOConfig
    from polyhead.trainer.options import add_dataclass_options
    from polyhead.trainer.updater.config import ADAPT_PPO

    parser: argparse.ArgumentParser = subparsers.add_parser(
        "adapt",
        help="train only a new task's head on a bundle's frozen trunk and publish it (online updater)",
        description=(
            "Add a task to a bundle without touching anything else: the trunk (and its observation "
            "normaliser) is frozen and only the new task's head (policy and value function) trains. Every "
            "old head is first evaluated zero-shot on the new task; a trained head is published only when "
            "it beats the best of them, otherwise the task is served by a copy of that old head. With "
            "--source remote the updater learns from a running server's experience feed while clients act, "
            "publishes a version every --publish-every updates and rolls back a version whose live returns "
            "regress. The trunk's sha256 before and after is reported (and must match)."
        ),
    )
    parser.add_argument(
        "--bundle", required=True, help="bundle directory (its trunk.pt is loaded and frozen)"
    )
    parser.add_argument(
        "--task-spec",
        required=True,
        help="the new task: a TOML file with exactly one [[task]] table, or SUITE:TASK "
        "(e.g. cartpole-family:cartpole-reversed)",
    )
    parser.add_argument(
        "--source",
        default="local",
        choices=("local", "remote"),
        help="'local': step envs built from the task spec; 'remote': learn from the server's experience "
        "feed while simulator clients act on the served head (default: %(default)s)",
    )
    parser.add_argument(
        "--init",
        default="both",
        choices=("scratch", "nearest", "both"),
        help="start from a fresh head, from the nearest old head (best zero-shot return on the new task), "
        "or 'both': local trains both side by side on half the budget each, remote starts from the nearest "
        "old head when it beats a fresh head zero-shot (default: %(default)s)",
    )
    parser.add_argument(
        "--encoder",
        default="share",
        choices=("share", "copy"),
        help="a task whose observation space an old encoder group reads: 'share' that group's encoder "
        "frozen (its encoder.onnx bytes reused), or 'copy' it and train the copy with the head; a task with "
        "an unseen observation space always trains a fresh encoder of its own (default: %(default)s)",
    )
    parser.add_argument(
        "--encoder-kind",
        default="mlp",
        help="the fresh encoder of an unseen observation space: 'mlp', or 'cnn:H,W,C' when the flattened "
        "observation starts with an HxWxC image (default: %(default)s)",
    )
    parser.add_argument(
        "--server",
        default=None,
        help="data-plane HOST:PORT of a running server; published versions are loaded into it "
        "(admin calls go to --admin-target)",
    )
    parser.add_argument(
        "--admin-target",
        default=None,
        help="HeadAdmin HOST:PORT (default: the --server host on port 50052, polyhead serve's default)",
    )
    parser.add_argument(
        "--admin-token", default=None, help="bearer token of the server's admin service, when it has one"
    )
    parser.add_argument(
        "--publish-every",
        type=int,
        default=4,
        metavar="K",
        help="remote: publish a new version every K PPO updates (default: %(default)s)",
    )
    parser.add_argument(
        "--rollback-margin",
        type=float,
        default=0.2,
        metavar="M",
        help="roll a new version back when its live returns are significantly below the previous "
        "version's minus M x |previous mean| (default: %(default)s)",
    )
    parser.add_argument(
        "--guard-episodes",
        type=int,
        default=8,
        metavar="N",
        help="a new version is judged on the first N live episodes to start under it, once all have "
        "finished (default: %(default)s)",
    )
    parser.add_argument(
        "--guard-alpha",
        type=float,
        default=0.05,
        metavar="A",
        help="false-alarm rate of the guard's one-sided Mann-Whitney test: a version as good as the one it "
        "replaced is rolled back with probability at most A (default: %(default)s)",
    )
    parser.add_argument(
        "--max-version-lag",
        type=int,
        default=2,
        metavar="N",
        help="remote: train on steps of the newest version and N before it; older ones are dropped "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--zero-shot-episodes",
        type=int,
        default=10,
        metavar="N",
        help="deterministic episodes to score old heads and every published head, same seeds for all "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="remote: fail when no experience arrives for S seconds (default: %(default)s)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="P",
        help="serve the updater's Prometheus metrics on port P (0: any free port)",
    )
    parser.add_argument(
        "--exporter",
        default="dynamo",
        choices=("dynamo", "torchscript"),
        help="ONNX exporter for published heads (default: %(default)s)",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="show a progress bar on stderr when it is a terminal (default: on)",
    )
    add_common_flags(parser)
    group = parser.add_argument_group("PPO (one head on the frozen trunk)")
    add_dataclass_options(group, PPOConfig, skip=_SKIPPED_PPO)
    # The updater's budget and evaluation defaults differ from polyhead train's, and a few settings mean
    # something slightly different for one head: show the real defaults and meanings.
    for action in group._group_actions:
        default = getattr(ADAPT_PPO, action.dest)
        if action.dest in _ADAPT_HELP:
            action.help = f"{_ADAPT_HELP[action.dest]} (default: {default})"
        elif default != action.default and action.help is not None:
            action.help = action.help.replace(f"(default: {action.default})", f"(default: {default})")
        action.default = default
    parser.set_defaults(func=_adapt)


def _adapt(args: argparse.Namespace) -> int:
    from polyhead.taskspec import load_task_spec
    from polyhead.trainer.adapt import adapt
    from polyhead.trainer.config import PPOConfig
    from polyhead.trainer.options import dataclass_from_args
    from polyhead.trainer.updater.config import AdaptConfig
    from polyhead.trainer.updater.progress import ProgressDisplay

    task = load_task_spec(args.task_spec)
    try:
        ppo = dataclass_from_args(PPOConfig, args)
        config = AdaptConfig(
            bundle=args.bundle,
            task=task,
            source=args.source,
            init=args.init,
            encoder=args.encoder,
            encoder_kind=args.encoder_kind,
            ppo=ppo,
            server=args.server,
            admin_target=args.admin_target,
            admin_token=args.admin_token,
            publish_every=args.publish_every,
            rollback_margin=args.rollback_margin,
            guard_episodes=args.guard_episodes,
            guard_alpha=args.guard_alpha,
            max_version_lag=args.max_version_lag,
            zero_shot_episodes=args.zero_shot_episodes,
            idle_timeout_s=args.idle_timeout,
            metrics_port=args.metrics_port,
            exporter=args.exporter,
        )
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from exc
    with ProgressDisplay(ppo.total_steps, enabled=args.progress and sys.stderr.isatty()) as display:
        result = adapt(config, progress=display.advance)
    best = result.zero_shot.best_head
    lines = [
        f"{result.task}: {result.steps:,} samples ({result.source}) in {result.wall_seconds:.1f} s; "
        f"{result.versions_published} version(s) published, serving version {result.active_version} "
        f"({result.served_by}), eval return {result.start_eval_return:.1f} at 0 samples -> "
        f"{result.final_eval_return:.1f}{'' if result.beat_start else ' (did not beat its start)'}",
        f"  best old head zero-shot: {best} {result.zero_shot.best_return:.1f}"
        if best
        else "  no old head fits the task's action space",
        f"  rollbacks: {result.rollbacks}; trunk sha256 {result.trunk_sha256_before[:16]}… before, "
        f"{result.trunk_sha256_after[:16]}… after (unchanged)",
    ]
    emit_summary(result.summary(), as_json=args.json, human="\n".join(lines))
    return 0
