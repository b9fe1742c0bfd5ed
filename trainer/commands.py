"""The trainer's ``polyhead`` subcommands (registered through the ``polyhead.commands`` entry points)."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from polyhead.cli import add_common_flags, emit_summary
from polyhead.errors import InvalidArgument
from polyhead.taskspec import builtin_suites, load_suite

if TYPE_CHECKING:  # torch is imported lazily, so `polyhead --help` stays fast
    import torch


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
            "--run-dir and into the bundle's logs/. Runs unchanged under torchrun (one process per rank, "
            "gloo on CPU; each rank steps its share of the environments; rank 0 writes logs, checkpoints "
            "and the bundle); --nproc N launches torchrun itself."
        ),
    )
    parser.add_argument(
        "--suite",
        default="cartpole-family",
        help=f"built-in suite name ({', '.join(builtin_suites())}) or a suite TOML file "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="bundle directory to write (must be empty or absent); required unless --resume names a run",
    )
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
    scale = parser.add_argument_group("several processes (torchrun) and resuming")
    scale.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="launch torchrun with N worker processes on this machine (--standalone rendezvous) and train "
        "on all of them; for several nodes run `torchrun --nnodes ... -m polyhead train ...` instead "
        "(default: %(default)s: this process alone)",
    )
    scale.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        metavar="N",
        help="run under torchrun (also with --nproc 1) and let it restart the workers up to N times when "
        "one fails; they resume from the last checkpoint (default: %(default)s)",
    )
    scale.add_argument(
        "--resume",
        default=None,
        metavar="RUN_DIR",
        help="continue the run whose logs and checkpoint are in RUN_DIR (its suite, --out and settings "
        "come from the checkpoint; PPO and policy options given here are ignored, except --device), "
        "also on another number of ranks",
    )
    add_common_flags(parser)
    add_dataclass_options(parser.add_argument_group("PPO"), PPOConfig)
    add_dataclass_options(parser.add_argument_group("policy architecture"), PolicyConfig)
    parser.set_defaults(func=functools.partial(_train, parser=parser))


# torchrun's environment for its workers (read here, at the edge; the trainer asks torch.distributed).
_WORKER_ENV = "WORLD_SIZE"
_LOCAL_RANK_ENV = "LOCAL_RANK"
_LOCAL_WORLD_SIZE_ENV = "LOCAL_WORLD_SIZE"
_RESTART_ENV = "TORCHELASTIC_RESTART_COUNT"
_SHARED_STORE_ENV = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


def _train(args: argparse.Namespace, *, parser: argparse.ArgumentParser) -> int:
    from polyhead.trainer.distributed import backend_for, resolve_device

    if args.nproc < 1 or args.max_restarts < 0:
        raise InvalidArgument("--nproc must be at least 1 and --max-restarts at least 0")
    if args.out is None and args.resume is None:
        raise InvalidArgument("--out is required (unless --resume RUN_DIR names a run to continue)")
    worker = _WORKER_ENV in os.environ
    # The ranks on this node: the ones we would launch, or torchrun's count. A bad --device is the
    # one-line error here, before torchrun or any work starts.
    local_ranks = int(os.environ.get(_LOCAL_WORLD_SIZE_ENV, "1")) if worker else args.nproc
    device = resolve_device(args.device, local_ranks=local_ranks)
    if (args.nproc > 1 or args.max_restarts > 0) and not worker:
        return _launch_torchrun(args, parser)
    restarted = worker and int(os.environ.get(_RESTART_ENV, "0")) > 0
    if device.type == "cuda":
        import torch

        # One GPU per rank: torchrun's LOCAL_RANK (0 for a single process). The trainer resolves
        # --device again, to this current device.
        torch.cuda.set_device(int(os.environ.get(_LOCAL_RANK_ENV, "0")))
    if worker and int(os.environ[_WORKER_ENV]) > 1:
        import torch.distributed as dist

        if args.independent:
            raise InvalidArgument("--independent trains one process per task; run it without torchrun")
        # gloo on the CPU; on GPUs NCCL for the CUDA tensors and gloo for the CPU-side statistics.
        dist.init_process_group(backend=backend_for(device))
        try:
            return _train_here(args, restarted=restarted, device=device)
        finally:
            dist.destroy_process_group()
    return _train_here(args, restarted=restarted, device=device)


def _train_here(args: argparse.Namespace, *, restarted: bool, device: torch.device) -> int:
    from polyhead.trainer.checkpoint import has_checkpoint
    from polyhead.trainer.config import PPOConfig
    from polyhead.trainer.distributed import Ranks
    from polyhead.trainer.options import dataclass_from_args
    from polyhead.trainer.policy import PolicyConfig
    from polyhead.trainer.train import resume_settings, train, train_independent

    run_dir = args.resume or args.run_dir
    if args.resume is not None:
        suite, out, config, policy_config = resume_settings(args.resume)
        out = Path(args.out) if args.out is not None else out
        config = replace(config, device=args.device)  # where to run is this machine's business
    else:
        suite = load_suite(args.suite)
        out = Path(args.out)
        try:
            config = dataclass_from_args(PPOConfig, args)
            policy_config = dataclass_from_args(PolicyConfig, args)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from exc
    # A worker that torchrun restarted after a failure continues from the run's last checkpoint.
    run_path = Path(run_dir) if run_dir is not None else out.with_name(out.name + ".logs")
    resume = args.resume is not None or (restarted and has_checkpoint(run_path))
    if restarted:
        logging.getLogger("polyhead.trainer").warning(
            "torchrun restarted the workers; %s",
            "resuming from the last checkpoint" if resume else "no checkpoint yet: starting over",
        )
    common = {
        "config": config,
        "policy_config": policy_config,
        "overwrite": args.overwrite,
        "progress": args.progress,
        "exporter": args.exporter,
        "device": device,
    }
    if args.independent:
        result = train_independent(suite, out, **common)
    else:
        result = train(suite, out, run_dir=run_dir, resume=resume, **common)
    if not Ranks.current().is_main:
        return 0
    lines = [
        f"bundle {result.bundle}: {result.steps:,} steps in {result.wall_seconds:.1f} s, "
        f"{result.parameters:,} parameters"
    ]
    for task_id, value in result.eval_returns.items():
        mark = "solved" if result.solved.get(task_id) else ""
        lines.append(f"  {task_id:28s} eval return {value:8.1f} {mark}")
    emit_summary(result.summary(), as_json=args.json, human="\n".join(lines))
    return 0


def _launch_torchrun(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run ``torchrun --standalone --nproc-per-node N -m polyhead train ...`` (the same options, minus
    ``--nproc``) in this process: torchrun's agent starts, watches and restarts the workers."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    command = [
        "--standalone",
        f"--nproc-per-node={args.nproc}",
        f"--max-restarts={args.max_restarts}",
        "-m",
        "polyhead",
        "train",
        *_worker_argv(args, parser),
    ]
    # The workers get their own TCPStore instead of sharing the rendezvous one: with the shared store a
    # restarted worker can read the previous attempt's keys and connect to a dead peer's port
    # (pytorch/pytorch#135712; seen here as "Gloo connectFullMesh failed ... Connection refused").
    os.environ.setdefault(_SHARED_STORE_ENV, "1")
    print(f"launching: torchrun {' '.join(command)}", file=sys.stderr)
    try:
        torchrun(command)
    except ChildFailedError as exc:
        # torchrun has printed the failed workers' tracebacks; their exit decides ours.
        rank, failure = exc.get_first_failure()
        logging.getLogger("polyhead.trainer").error(
            "training failed: worker rank %d exited with code %s", rank, failure.exitcode
        )
        return 1
    return 0


def _worker_argv(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    """The command line that reproduces ``args`` for the workers (every option, spelled out), minus
    ``--nproc`` and ``--max-restarts`` (torchrun's business)."""
    out: list[str] = []
    for action in parser._actions:  # argparse has no public iterator over a parser's options
        if not action.option_strings or action.dest in ("help", "nproc", "max_restarts", "func"):
            continue
        value = getattr(args, action.dest, None)
        flag = next((o for o in action.option_strings if o.startswith("--")), action.option_strings[0])
        if isinstance(action, argparse.BooleanOptionalAction):
            out.append(flag if value else flag.replace("--", "--no-", 1))
        elif action.nargs == 0:  # store_true
            if value:
                out.append(flag)
        elif value is not None:
            out += [flag, _option_text(value)]
    return out


def _option_text(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(f"{v[0]}={v[1]}" if isinstance(v, tuple) else str(v) for v in value)
    return str(value)
