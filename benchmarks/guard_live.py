"""The rollout guard with live clients: false rollbacks under A/A, and detection of a real regression.

    nice -n 10 .venv/bin/python benchmarks/guard_live.py [--trials 20] [--clients 4] [--guard-episodes 8]

Setup: a short real multi-task PPO run on two CartPole variants (cached in the temp directory), a real
server on that bundle, and ``--clients`` simulator clients acting on a new task (``--task``, default
``cartpole-family:cartpole-target-right``: CartPole with a reward for staying right of centre, where the
old head's sampled returns spread over roughly 390-485 instead of all hitting the 500 cap, so an A/A
comparison is not decided by ties) with *sampled* actions and reporting rewards, as in remote mode.
Version 1 of the new task is a copy of the old head ``cartpole-heavy-pole``.

* **A/A**: the same head is republished ``--trials`` times; each new version is judged by the guard
  (:class:`polyhead.trainer.updater.guard.RolloutGuard`, the adapt defaults: the first ``guard_episodes``
  episodes to start under it, a one-sided Mann-Whitney test at alpha 0.05, margin 0.2). Every
  ``regressed`` verdict is a false rollback.
* **Regression**: ``--trials`` times a version with negated policy logits (it pushes the cart the wrong
  way) is published and judged; the guard must roll it back. After each rollback the good head serves
  again and the next trial starts from it.

Per verdict: the verdict, the new version's episodes it used, the previous version's episodes it was
compared with, the p-value, and the seconds from publishing to the verdict. One JSON summary line last.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_common import machine_note

OLD_TASKS = ("cartpole-long-pole", "cartpole-heavy-pole")


def _bundle(root: Path) -> Path:
    from polyhead.taskspec import EncoderSpec, Suite, load_suite
    from polyhead.trainer.config import PPOConfig
    from polyhead.trainer.policy import PolicyConfig
    from polyhead.trainer.train import train

    out = root / "guard-live-bundle-format2"  # trained by this polyhead (per-task encoders)
    if not (out / "manifest.json").is_file():
        family = load_suite("cartpole-family")
        train(
            Suite(
                name="cartpole-pair",
                tasks=tuple(family.task(t) for t in OLD_TASKS),
                encoders=(EncoderSpec(name="cartpole", tasks=tuple(OLD_TASKS)),),  # one group, as the family
            ),
            out,
            config=PPOConfig(
                total_steps=60_000,
                eval_interval=10_000,
                eval_episodes=3,
                final_eval_episodes=5,
                solved_evals=2,
            ),
            policy_config=PolicyConfig(trunk_hidden=(32,), feature_size=32, critic_hidden=(32,)),
            progress=False,
            exporter="torchscript",
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=20, help="A/A republishes and regression trials, each")
    parser.add_argument(
        "--clients", type=int, default=4, help="simulator clients acting with sampled actions"
    )
    parser.add_argument(
        "--guard-episodes", type=int, default=8, help="the guard's cohort size (adapt default)"
    )
    parser.add_argument("--alpha", type=float, default=0.05, help="the guard's false-alarm rate")
    parser.add_argument("--margin", type=float, default=0.2, help="the guard's rollback margin")
    parser.add_argument("--timeout", type=float, default=300.0, help="longest wait for one verdict (s)")
    parser.add_argument(
        "--task",
        default="cartpole-family:cartpole-target-right",
        help="the new task the clients act on (SUITE:TASK or a spec file)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)

    import shutil

    from polyhead.bundle import Bundle
    from polyhead.envs import task_spaces
    from polyhead.server.app import BackgroundServer
    from polyhead.server.settings import ServerSettings
    from polyhead.taskspec import load_task_spec
    from polyhead.trainer.export import sample_observations
    from polyhead.trainer.policy import load_policy
    from polyhead.trainer.updater.control import ServerControl
    from polyhead.trainer.updater.fleet import SimulatorFleet
    from polyhead.trainer.updater.frozen import freeze_trunk
    from polyhead.trainer.updater.guard import RolloutGuard
    from polyhead.trainer.updater.metrics import UpdaterMetrics
    from polyhead.trainer.updater.publisher import HeadPublisher

    source = _bundle(Path(tempfile.gettempdir()))
    work = Path(tempfile.mkdtemp(prefix="polyhead-guard-live-"))
    bundle_dir = work / "bundle"
    shutil.copytree(source, bundle_dir)
    task = load_task_spec(args.task)
    policy = load_policy(bundle_dir)
    freeze_trunk(policy)
    obs_space, act_space = task_spaces(task)
    policy.add_head(task.id, act_space, policy.slots[OLD_TASKS[1]])  # on the old head's encoder
    policy.head(task.id).load_state_dict(policy.head(OLD_TASKS[1]).state_dict())
    good = {k: v.clone() for k, v in policy.head(task.id).state_dict().items()}
    last = [m for m in policy.head(task.id).actor if isinstance(m, torch.nn.Linear)][-1]
    settings = ServerSettings(
        bundle=bundle_dir, host="127.0.0.1", port=0, admin_port=0, metrics_port=None, watch_bundle=False
    )
    verdicts: dict[str, list[dict[str, Any]]] = {"aa": [], "regression": []}
    with BackgroundServer(settings) as srv:
        control = ServerControl(srv.admin_target)
        metrics = UpdaterMetrics()
        publisher = HeadPublisher(
            bundle=Bundle.open(bundle_dir),
            policy=policy,
            task=task,
            observation_space=obs_space,
            parity_observations=sample_observations([task], policy.observation_size, steps_per_task=32),
            metrics=metrics,
            control=control,
            exporter="torchscript",
        )
        guard = RolloutGuard(
            publisher, metrics, margin=args.margin, min_episodes=args.guard_episodes, alpha=args.alpha
        )
        feed = control.experience(task.id)
        active = publisher.publish(
            eval_return=0.0, training={}, parent=OLD_TASKS[1], note="good head"
        ).version
        fleet = SimulatorFleet(
            srv.target, task.id, clients=args.clients, episodes_per_round=2, seed=11
        ).start()
        try:
            deadline = time.monotonic() + args.timeout
            while (
                len(guard.live.recent(active, "sampled", 2 * args.guard_episodes)) < 2 * args.guard_episodes
            ):
                if time.monotonic() > deadline:
                    raise RuntimeError("no live episodes of version 1")
                guard.observe(feed.drain(timeout_s=1.0))
            for kind in ("aa", "regression"):
                for trial in range(args.trials):
                    policy.head(task.id).load_state_dict(good)
                    if kind == "regression":
                        with torch.no_grad():
                            last.weight.neg_()
                            last.bias.neg_()
                    started = time.monotonic()
                    new = publisher.publish(eval_return=0.0, training={}, parent=None, note=kind).version
                    guard.watch(new, active)
                    decision = None
                    while decision is None:
                        if time.monotonic() - started > args.timeout:
                            raise RuntimeError(f"no verdict on version {new} in {args.timeout} s")
                        guard.observe(feed.drain(timeout_s=0.5))
                        decision = guard.check()
                    if decision.verdict != "regressed":
                        active = new
                    row = {
                        "trial": trial,
                        "version": new,
                        "verdict": decision.verdict,
                        "new_episodes": decision.episodes,
                        "previous_episodes": decision.test.n_reference if decision.test else 0,
                        "new_mean": round(decision.new_mean, 1),
                        "previous_mean": round(decision.previous_mean, 1),
                        "p_value": round(decision.test.p_value, 5) if decision.test else None,
                        "seconds": round(time.monotonic() - started, 1),
                    }
                    verdicts[kind].append(row)
                    print(json.dumps({"kind": kind, **row}), file=sys.stderr, flush=True)
        finally:
            fleet.stop()
            feed.close()
            control.close()
    aa, reg = verdicts["aa"], verdicts["regression"]
    summary = {
        "task": task.id,
        "trials": args.trials,
        "clients": args.clients,
        "guard_episodes": args.guard_episodes,
        "alpha": args.alpha,
        "margin": args.margin,
        "aa_false_rollbacks": sum(r["verdict"] == "regressed" for r in aa),
        "aa_false_rollback_rate": sum(r["verdict"] == "regressed" for r in aa) / len(aa),
        "aa_without_reference": sum(r["p_value"] is None for r in aa),
        "regression_detected": sum(r["verdict"] == "regressed" for r in reg),
        "regression_detection_rate": sum(r["verdict"] == "regressed" for r in reg) / len(reg),
        "episodes_per_verdict_new": args.guard_episodes,
        "median_previous_episodes": statistics.median(r["previous_episodes"] for r in aa + reg),
        "median_seconds_to_verdict": {
            "aa": statistics.median(r["seconds"] for r in aa),
            "regression": statistics.median(r["seconds"] for r in reg),
        },
        "mean_returns": {
            "aa_new": round(statistics.mean(r["new_mean"] for r in aa), 1),
            "regression_new": round(statistics.mean(r["new_mean"] for r in reg), 1),
        },
        "machine": machine_note(),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
