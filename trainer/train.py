"""The multi-task PPO training loop: validate the suite, train, evaluate, keep the best, export a bundle.

``train`` is what ``polyhead train`` runs; ``train_independent`` is the baseline (one separate network
per task on the same per-task budget).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from polyhead.envs import validate_task
from polyhead.errors import BundleError, InvalidArgument, InvalidTaskSpec
from polyhead.spaces import SpaceSpec
from polyhead.taskspec import EncoderSpec, Suite, TaskSpec
from polyhead.trainer.checkpoint import load_checkpoint, restore_rng, rng_state, save_checkpoint
from polyhead.trainer.config import PPOConfig
from polyhead.trainer.distributed import Ranks, resolve_device
from polyhead.trainer.envs import TaskEnvs
from polyhead.trainer.evaluate import evaluate
from polyhead.trainer.export import DEFAULT_EXPORTER, Exporter, export_bundle, sample_task_observations
from polyhead.trainer.logs import RunLogger
from polyhead.trainer.policy import PolicyConfig, build_policy
from polyhead.trainer.ppo import (
    MinibatchForward,
    TaskState,
    allocate_envs,
    collect_rollout,
    compute_advantages,
    ppo_update,
    summarize,
)
from polyhead.trainer.relations import write_relations

log = logging.getLogger("polyhead.trainer")

EVAL_SEED_OFFSET = 100_000
FINAL_EVAL_SEED_OFFSET = 500_000
RESUME_SEED_STRIDE = 1_000_003  # env seeds after a resume: far from every seed the run used before


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced; :meth:`summary` is the ``--json`` line.

    ``parameters`` counts everything trained (trunk, policy heads, critics); ``policy_parameters`` only
    what computes actions (trunk + policy heads). A separate critic is still exported in ``head.onnx``
    (its ``value`` output), but no action depends on it.
    """

    bundle: Path
    suite: str
    steps: int
    wall_seconds: float
    parameters: int
    policy_parameters: int
    eval_returns: dict[str, float]
    eval_episodes: dict[str, list[float]]
    best_step: int
    solved: dict[str, bool]
    grad_cosines: list[list[float]] | None = None
    runs: dict[str, TrainResult] = field(default_factory=dict)
    ranks: int = 1
    resumed_from_step: int | None = None

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.wall_seconds if self.wall_seconds > 0 else float("nan")

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "bundle": str(self.bundle),
            "suite": self.suite,
            "steps": self.steps,
            "wall_seconds": round(self.wall_seconds, 2),
            "parameters": self.parameters,
            "tasks": {t: {"eval_return": r} for t, r in self.eval_returns.items()},
            # Beyond the fixed keys above:
            "solved": sorted(t for t, ok in self.solved.items() if ok),
            "policy_parameters": self.policy_parameters,
            "steps_per_second": round(self.steps_per_second, 1),
            "best_step": self.best_step,
            "ranks": self.ranks,
        }
        if self.resumed_from_step is not None:
            out["resumed_from_step"] = self.resumed_from_step
        if self.grad_cosines is not None:
            out["grad_cosines"] = self.grad_cosines
        return out


def validate_suite(suite: Suite) -> tuple[list[TaskSpec], dict[str, tuple[SpaceSpec, SpaceSpec]]]:
    """Build, reset and step every task's env once (fails fast on a bad spec); return the training tasks
    and every task's (observation, action) spaces."""
    spaces = {t.id: validate_task(t) for t in suite.tasks}
    tasks = list(suite.train_tasks)
    if not tasks:
        raise InvalidTaskSpec(f"suite {suite.name!r} has no task with role 'train'")
    return tasks, spaces


def _score(returns: Mapping[str, float], tasks: Sequence[TaskSpec]) -> tuple[int, float]:
    """Rank checkpoints: tasks at or above target first, then the mean of returns scaled by |target|."""
    solved = sum(1 for t in tasks if not math.isnan(t.target_return) and returns[t.id] >= t.target_return)
    scaled = [
        returns[t.id] / max(abs(t.target_return), 1.0) if not math.isnan(t.target_return) else 0.0
        for t in tasks
    ]
    return solved, float(np.mean(scaled))


def _all_solved(returns: Mapping[str, float], tasks: Sequence[TaskSpec]) -> bool:
    with_targets = [t for t in tasks if not math.isnan(t.target_return)]
    return bool(with_targets) and all(returns[t.id] >= t.target_return for t in with_targets)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise BundleError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")


def train(
    suite: Suite,
    out: str | Path,
    *,
    config: PPOConfig | None = None,
    policy_config: PolicyConfig | None = None,
    run_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    exporter: Exporter = DEFAULT_EXPORTER,
    resume: bool = False,
    device: torch.device | None = None,
) -> TrainResult:
    """Train one policy on the suite's training tasks and export the best checkpoint to ``out``.

    Logs go to ``run_dir`` (default ``<out>.logs``) and into the bundle's ``logs/``; a resumable
    checkpoint goes to ``run_dir/checkpoints/last.pt`` every ``config.checkpoint_interval`` steps.
    ``resume`` continues from that checkpoint (step count, learning-rate schedule, optimizer, normaliser
    and random state), which must come from the same suite and configs.

    Under torchrun (an initialised ``torch.distributed`` process group) every rank calls this: each steps
    its share of the environments, DistributedDataParallel averages the gradients, the per-task
    statistics are combined across ranks (polyhead.trainer.distributed), and rank 0 alone writes logs,
    checkpoints and the bundle (the other ranks return the same result without writing it).

    ``device`` holds the policy, optimizer and rollout tensors (default: ``config.device`` resolved for
    one rank per GPU); the environments step on the CPU and the export runs there.

    Raises InvalidTaskSpec (bad suite), BundleError (``out`` not empty) or InvalidArgument (a setting
    the process group cannot run, a checkpoint that does not match) before any training.
    """
    config = config or PPOConfig()
    policy_config = policy_config or PolicyConfig()
    ranks = Ranks.current()
    device = device or resolve_device(config.device)
    out_path = Path(out)
    _check_out(out_path, overwrite)
    started = time.perf_counter()
    cpu_started = time.process_time()
    tasks, spaces = validate_suite(suite)
    unknown_weights = sorted({t for t, _ in config.task_weights} - {t.id for t in tasks})
    if unknown_weights:
        raise InvalidTaskSpec(f"--task-weights names task(s) {unknown_weights} that are not training tasks")
    _check_ranks(config, ranks)
    run_path = Path(run_dir) if run_dir is not None else out_path.with_name(out_path.name + ".logs")
    checkpoint = load_checkpoint(run_path) if resume else None
    if checkpoint is not None:
        _check_resumable(checkpoint, suite, config, policy_config)

    threads = torch.get_num_threads()
    torch.set_num_threads(config.torch_threads)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed + ranks.rank)
    # PCGrad's task order must be the same on every rank (each projects the same global gradients);
    # one process keeps using ``generator`` for it, as before torchrun existed.
    surgery_generator = torch.Generator().manual_seed(config.seed + 104_729) if ranks.distributed else None
    policy = build_policy(policy_config, tasks, spaces, suite.encoders).to(device)
    D = policy.observation_size  # the trainer's padded multi-task arrays; each encoder reads its own width
    # foreach: one kernel per step for all the small parameter tensors instead of one per tensor.
    optimizer = torch.optim.Adam(policy.parameters(), lr=config.learning_rate, eps=1e-5, foreach=True)
    steps_per_iteration = config.envs_per_task * len(tasks) * config.num_steps
    num_iterations = max(1, math.ceil(config.total_steps / steps_per_iteration))

    done_iterations = 0
    global_step = 0
    next_eval = config.eval_interval
    next_checkpoint = config.checkpoint_interval
    best: tuple[tuple[int, float], int, dict[str, Any]] | None = None
    last_cosines = None
    solved_streak = 0
    final_evaluation: dict[str, list[float]] | None = None

    def evaluate_final() -> dict[str, list[float]]:
        """The policy as it is now on the final evaluation's episodes (also what confirms an early stop)."""
        return evaluate(
            policy,
            tasks,
            episodes=config.final_eval_episodes,
            seed=config.seed + FINAL_EVAL_SEED_OFFSET,
            ranks=ranks,
        )

    task_stats: dict[str, Any] = {}
    if checkpoint is not None:
        policy.load_state_dict(checkpoint["policy"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        done_iterations = int(checkpoint["iteration"])
        global_step = int(checkpoint["global_step"])
        next_eval = int(checkpoint["next_eval"])
        next_checkpoint = int(checkpoint["next_checkpoint"])
        solved_streak = int(checkpoint["solved_streak"])
        last_cosines = checkpoint["last_cosines"]
        if checkpoint["best"] is not None:
            b = checkpoint["best"]
            best = ((int(b["score"][0]), float(b["score"][1])), int(b["step"]), b["state_dict"])
        task_stats = checkpoint["tasks"]
        started -= float(checkpoint["wall_seconds"])
        rngs = checkpoint["rng"]
        if len(rngs) == ranks.world_size:
            restore_rng(rngs[ranks.rank], generator)
            if surgery_generator is not None and checkpoint.get("surgery_rng") is not None:
                surgery_generator.set_state(checkpoint["surgery_rng"])
        else:
            # Another number of ranks than the checkpoint's. Everything the checkpoint holds is global
            # (the whole batch's normalisers, reward scaling and recent returns, the optimizer, the
            # counters), and the batch is --envs-per-task x tasks x --num-steps whatever the ranks, so the
            # run continues with the same maths. Only the per-rank random streams have no counterpart:
            # fresh, distinct ones. (The environments restart with fresh seeds on every resume.)
            torch.manual_seed(config.seed + 7919 * (ranks.rank + 1) + done_iterations)
            generator.manual_seed(config.seed + ranks.rank + 7919 * done_iterations)
            log.warning(
                "resuming a %d-rank checkpoint on %d rank(s): the step count, learning-rate schedule, "
                "optimizer, normalisers and per-task statistics continue; each rank's random streams "
                "start afresh",
                len(rngs),
                ranks.world_size,
            )
        log.info(
            "resuming %s from its checkpoint at %s steps (iteration %d of %d)",
            run_path,
            f"{global_step:,}",
            done_iterations,
            num_iterations,
        )
    elif ranks.rank > 0:
        # Every rank built the same initial policy from the seed (DDP broadcasts rank 0's anyway); from
        # here on the ranks sample their actions from distinct streams.
        torch.manual_seed(config.seed + 7919 * ranks.rank)

    env_count = config.envs_per_task * (2 if config.task_sampling == "gap" else 1)
    # A resumed run resets its envs with seeds it has not used (the episodes in flight were not saved).
    seed_base = config.seed * 10_000 + RESUME_SEED_STRIDE * done_iterations
    states: list[TaskState] = []
    for k, t in enumerate(tasks):
        # Env i of task k (whichever rank steps it) is seeded seed * 10_000 + 1_000 k + i.
        envs = TaskEnvs(
            t, env_count, D, seed=seed_base + 1_000 * k, rank=ranks.rank, world_size=ranks.world_size
        )
        state = TaskState(task=t, envs=envs, weight=config.weight(t.id))
        if t.id in task_stats:
            state.return_rms.load_state(tuple(task_stats[t.id]["return_rms"]))
            state.recent_returns.extend(float(r) for r in task_stats[t.id]["recent_returns"])
            state.episodes = int(task_stats[t.id]["episodes"])
        states.append(state)
    weights = {s.task.id: s.weight for s in states}
    forward: torch.nn.Module = MinibatchForward(policy)
    if ranks.distributed:
        # Buffers (the observation normaliser) are updated identically on every rank; no need to broadcast.
        forward = DistributedDataParallel(
            forward,
            device_ids=[device.index] if device.type == "cuda" else None,
            forward_sync_buffers=False,
        )

    def save(iteration: int, logger: RunLogger | None) -> None:
        rngs = ranks.gather(rng_state(generator))  # a collective: every rank calls save
        if logger is None:
            return
        # The logs on disk reach the checkpoint's step, so a resumed run continues them without a gap.
        logger.flush()
        save_checkpoint(
            run_path,
            {
                "suite": suite.name,
                "suite_source": suite.source,
                "suite_tasks": [t.to_json() for t in suite.tasks],
                "suite_encoders": [e.to_json() for e in suite.encoders],
                "out": str(out_path),
                "config": config.to_json(),
                "policy_config": policy_config.to_json(),
                "world_size": ranks.world_size,
                "iteration": iteration,
                "global_step": global_step,
                "next_eval": next_eval,
                "next_checkpoint": next_checkpoint,
                "solved_streak": solved_streak,
                "last_cosines": last_cosines,
                "best": None
                if best is None
                else {"score": list(best[0]), "step": best[1], "state_dict": best[2]},
                "policy": policy.state_dict(),
                "optimizer": optimizer.state_dict(),
                "tasks": {
                    s.task.id: {
                        "return_rms": list(s.return_rms.state()),
                        "recent_returns": list(s.recent_returns),
                        "episodes": s.episodes,
                    }
                    for s in states
                },
                "rng": rngs,
                "surgery_rng": None if surgery_generator is None else surgery_generator.get_state(),
                "wall_seconds": time.perf_counter() - started,
            },
        )

    try:
        with (
            RunLogger(
                run_path,
                [t.id for t in tasks],
                num_iterations * steps_per_iteration,
                progress=progress,
                resume_step=global_step if checkpoint is not None else None,
            )
            if ranks.is_main
            else contextlib.nullcontext()
        ) as logger:
            for iteration in range(done_iterations + 1, num_iterations + 1):
                iter_start = time.perf_counter()
                if config.anneal_lr:
                    frac = 1.0 - (iteration - 1.0) / num_iterations
                    optimizer.param_groups[0]["lr"] = frac * config.learning_rate
                active = allocate_envs(states, config, min_envs=ranks.world_size)
                local = [np.arange(ranks.local_count(len(a))) for a in active]
                policy.train()
                rollouts = collect_rollout(policy, states, local, config, ranks=ranks)
                global_step += sum(len(a) for a in active) * config.num_steps
                compute_advantages(rollouts, config, ranks=ranks)
                stats = ppo_update(
                    policy,
                    optimizer,
                    rollouts,
                    weights,
                    config,
                    generator=generator,
                    forward=forward,
                    ranks=ranks,
                    surgery_generator=surgery_generator,
                )
                elapsed = time.perf_counter() - started
                if logger is not None:
                    scalars = {
                        "iteration": iteration,
                        "wall_seconds": round(elapsed, 3),
                        # CPU time of this process (rank 0): on a shared machine, steadier than wall time.
                        "cpu_seconds": round(time.process_time() - cpu_started, 3),
                        "steps_per_second": steps_per_iteration / max(time.perf_counter() - iter_start, 1e-9),
                        "learning_rate": optimizer.param_groups[0]["lr"],
                        "update_epochs": stats.epochs,
                        "ranks": ranks.world_size,
                        **summarize(stats, states, active),
                    }
                    logger.iteration(global_step, scalars, {s.task.id: s.recent_return for s in states})
                if stats.grad_cosines is not None:
                    last_cosines = stats.grad_cosines
                    if logger is not None:
                        logger.grad_cosines(global_step, stats.grad_cosines)

                last = iteration == num_iterations
                if global_step >= next_eval or last:
                    next_eval = (global_step // config.eval_interval + 1) * config.eval_interval
                    episodes = evaluate(
                        policy,
                        tasks,
                        episodes=config.eval_episodes,
                        seed=config.seed + EVAL_SEED_OFFSET,
                        ranks=ranks,
                    )
                    if logger is not None:
                        logger.evaluation(global_step, time.perf_counter() - started, episodes)
                    means = {t: float(np.mean(v)) for t, v in episodes.items()}
                    score = _score(means, tasks)
                    if best is None or score > best[0]:
                        best = (score, global_step, copy.deepcopy(policy.state_dict()))
                    solved_streak = solved_streak + 1 if _all_solved(means, tasks) else 0
                    if config.solved_evals and solved_streak >= config.solved_evals and not last:
                        # A few short evaluations in a row can all be lucky on a task whose target sits
                        # inside its episode-to-episode spread (Acrobot's -100), and the best of them
                        # overrates its checkpoint. Stop only when this policy also reaches every target
                        # on the final evaluation's episodes, which then is what the summary reports.
                        confirm = evaluate_final()
                        confirmed = {t: float(np.mean(v)) for t, v in confirm.items()}
                        if _all_solved(confirmed, tasks):
                            best = (_score(confirmed, tasks), global_step, copy.deepcopy(policy.state_dict()))
                            final_evaluation = confirm  # the same policy on the same episodes: not run twice
                            log.info(
                                "every training task reached its target in %d evaluations in a row and on "
                                "the %d final-evaluation episodes (%s steps)",
                                solved_streak,
                                config.final_eval_episodes,
                                f"{global_step:,}",
                            )
                            break
                        missed = {
                            t.id: round(confirmed[t.id], 1)
                            for t in tasks
                            if confirmed[t.id] < t.target_return
                        }
                        log.info(
                            "%d evaluations in a row at every target, but not on the %d final-evaluation "
                            "episodes (%s): training goes on",
                            solved_streak,
                            config.final_eval_episodes,
                            missed,
                        )
                        solved_streak = 0
                if config.checkpoint_interval and global_step >= next_checkpoint and not last:
                    next_checkpoint = (
                        global_step // config.checkpoint_interval + 1
                    ) * config.checkpoint_interval
                    save(iteration, logger)

            assert best is not None
            _, best_step, best_state = best
            policy.load_state_dict(best_state)
            final = final_evaluation or evaluate_final()
            eval_returns = {t: float(np.mean(v)) for t, v in final.items()}
            policy.cpu()  # the relations report, the export and its parity check run on the CPU
            if logger is not None:
                logger.evaluation(global_step, time.perf_counter() - started, final)
                log_files = logger.files()
            if ranks.is_main and config.relations_episodes > 0:
                write_relations(
                    policy,
                    tasks,
                    run_path,
                    grad_cosines=last_cosines,
                    episodes=config.relations_episodes,
                    seed=config.seed + FINAL_EVAL_SEED_OFFSET,
                )
        wall = time.perf_counter() - started
        training = {
            "algorithm": "multi-task PPO",
            "steps": global_step,
            "best_step": best_step,
            "steps_per_task": global_step // len(tasks),
            "seed": config.seed,
            "ranks": ranks.world_size,
            "wall_seconds": round(wall, 2),
            "ppo": config.to_json(),
            "policy": policy_config.to_json(),
            "eval_episodes": config.final_eval_episodes,
        }
        bundle_root = out_path
        if ranks.is_main:
            observations = sample_task_observations(tasks, steps_per_task=32, seed=config.seed)
            bundle = export_bundle(
                policy,
                out_path,
                suite_name=suite.name,
                tasks=tasks,
                training=training,
                eval_returns=eval_returns,
                overwrite=overwrite,
                observations=observations,
                extra_files={f"logs/{name}": data for name, data in log_files.items()},
                exporter=exporter,
            )
            bundle_root = bundle.root
    finally:
        for s in states:
            s.envs.close()
        torch.set_num_threads(threads)
    wall = time.perf_counter() - started
    return TrainResult(
        bundle=bundle_root,
        suite=suite.name,
        steps=global_step,
        wall_seconds=wall,
        parameters=policy.parameter_count(),
        policy_parameters=policy.parameter_count(include_critic=policy_config.critic == "shared"),
        eval_returns=eval_returns,
        eval_episodes=final,
        best_step=best_step,
        solved={
            t.id: eval_returns[t.id] >= t.target_return for t in tasks if not math.isnan(t.target_return)
        },
        grad_cosines=None if last_cosines is None else np.round(last_cosines, 4).tolist(),
        ranks=ranks.world_size,
        resumed_from_step=int(checkpoint["global_step"]) if checkpoint is not None else None,
    )


def _check_ranks(config: PPOConfig, ranks: Ranks) -> None:
    """Settings a process group of ``ranks.world_size`` cannot run (InvalidArgument)."""
    if not ranks.distributed:
        return
    if config.envs_per_task < ranks.world_size:
        raise InvalidArgument(
            f"--envs-per-task {config.envs_per_task} is fewer than the {ranks.world_size} ranks; every rank "
            f"needs at least one environment of every task (use --envs-per-task >= {ranks.world_size})"
        )


def _check_resumable(
    checkpoint: Mapping[str, Any], suite: Suite, config: PPOConfig, policy_config: PolicyConfig
) -> None:
    """A checkpoint may only continue the run it came from (InvalidArgument names what differs)."""
    differs: list[str] = []
    if checkpoint["suite_tasks"] != [t.to_json() for t in suite.tasks]:
        differs.append(f"the suite's tasks (checkpoint: suite {checkpoint['suite']!r})")
    ours, theirs = config.to_json(), checkpoint["config"]
    differs += [
        f"--{k.replace('_', '-')} {ours[k]} (checkpoint: {theirs.get(k)})"
        for k in ours
        if k not in PPOConfig.RESUMABLE_CHANGES and ours[k] != theirs.get(k)
    ]
    pours, ptheirs = policy_config.to_json(), checkpoint["policy_config"]
    differs += [
        f"--{k.replace('_', '-')} {pours[k]} (checkpoint: {ptheirs.get(k)})"
        for k in pours
        if pours[k] != ptheirs.get(k)
    ]
    if differs:
        raise InvalidArgument(
            "cannot resume: the run differs from the checkpoint's in "
            + "; ".join(differs)
            + " (resume with the settings the run started with, or start a new run)"
        )


def resume_settings(run_dir: str | Path) -> tuple[Suite, Path, PPOConfig, PolicyConfig]:
    """The suite, bundle path and configs a checkpointed run in ``run_dir`` was started with (what
    ``polyhead train --resume RUN_DIR`` continues); raises InvalidArgument without a checkpoint."""
    checkpoint = load_checkpoint(run_dir)
    suite = Suite(
        name=checkpoint["suite"],
        tasks=tuple(TaskSpec.from_json(t, source=str(run_dir)) for t in checkpoint["suite_tasks"]),
        source=checkpoint["suite_source"],
        encoders=tuple(
            EncoderSpec(
                name=e["name"],
                tasks=tuple(e["tasks"]),
                kind=e["kind"],
                hidden=tuple(e["hidden"]),
                image_shape=tuple(e["image_shape"]),
                pad=bool(e["pad"]),
            )
            for e in checkpoint.get("suite_encoders", [])
        ),
    )
    config = checkpoint["config"]
    config["task_weights"] = tuple((k, float(v)) for k, v in config["task_weights"].items())
    ppo = PPOConfig(**config)
    policy = PolicyConfig.from_json(checkpoint["policy_config"])
    return suite, Path(checkpoint["out"]), ppo, policy


def train_independent(
    suite: Suite,
    out: str | Path,
    *,
    config: PPOConfig | None = None,
    policy_config: PolicyConfig | None = None,
    overwrite: bool = False,
    progress: bool = True,
    exporter: Exporter = DEFAULT_EXPORTER,
    device: torch.device | None = None,
) -> TrainResult:
    """The baseline: one separate policy per training task, each on ``total_steps / n_tasks`` steps,
    exported as one bundle per task under ``out/<task>/``. The result aggregates them."""
    config = config or PPOConfig()
    out_path = Path(out)
    _check_out(out_path, overwrite)
    started = time.perf_counter()
    tasks, _ = validate_suite(suite)
    per_task = replace(config, total_steps=max(1, config.total_steps // len(tasks)), task_weights=())
    runs: dict[str, TrainResult] = {}
    for task in tasks:
        own = replace(suite.encoder_for(task.id), tasks=(task.id,))  # its group's kind, alone
        single = Suite(name=f"{suite.name}/{task.id}", tasks=(task,), source=suite.source, encoders=(own,))
        runs[task.id] = train(
            single,
            out_path / task.id,
            config=per_task,
            policy_config=policy_config,
            run_dir=out_path / f"{task.id}.logs",
            overwrite=overwrite,
            progress=progress,
            exporter=exporter,
            device=device,
        )
    eval_returns = {t: r.eval_returns[t] for t, r in runs.items()}
    return TrainResult(
        bundle=out_path,
        suite=suite.name,
        steps=sum(r.steps for r in runs.values()),
        wall_seconds=time.perf_counter() - started,
        parameters=sum(r.parameters for r in runs.values()),
        policy_parameters=sum(r.policy_parameters for r in runs.values()),
        eval_returns=eval_returns,
        eval_episodes={t: r.eval_episodes[t] for t, r in runs.items()},
        best_step=0,
        solved={t: r.solved.get(t, False) for t, r in runs.items()},
        runs=runs,
    )
