"""A task's environment changes under a served head: time and samples to detection and to recovery.

    nice -n 10 .venv/bin/python benchmarks/operate_drift.py --seeds 1 2 3 --stationary-s 90 \
        --after-s 300 --out docs/operate_drift.json --plot docs/operate_drift.png

Per seed: a two-task CartPole bundle is trained briefly (as the updater tests do) unless ``--bundle`` is
given; a real server (default monitor settings: blocks of 20 episodes, alpha 1e-3) serves it; stream
simulators (sampled actions) play both tasks for ``--stationary-s`` seconds (false alarms counted); then
one task's actuator is reversed in its simulators and ``polyhead operate`` (in-process, the settings of
``polyhead demo --scenario drift``: canary shares 25/50 %, 20 episodes per verdict, the adapt PPO
settings; ``--supersede both`` runs each seed's bundle under the controller with and without
superseding stale canaries, side by side) runs until 90 % of the pre-change return is back (plus
``--tail-s``) or ``--after-s`` passes.
Reported: seconds and task samples from the change to the detection, to each decision, and to the end of
the first 20-episode window whose mean return is at least 90 % of the pre-change mean (null when it never
was), the other task's served actions before and after, and failed requests. The long stationary run for
false alarms is ``benchmarks/livewatch_stationary.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from polyhead.clients.policy_client import PolicyClient
from polyhead.server.app import BackgroundServer
from polyhead.server.settings import ServerSettings
from polyhead.taskspec import Suite, load_suite, load_task_spec
from polyhead.trainer.demo_drift import DRIFT_SHARES
from polyhead.trainer.operate import Decision, Operator, default_config
from polyhead.trainer.updater.fleet import SimulatorFleet

TASKS = ("cartpole-long-pole", "cartpole-heavy-pole")
DRIFTING, STEADY = TASKS


def train_bundle(out: Path, seed: int, steps: int = 50_000) -> None:
    from polyhead.trainer.config import PPOConfig
    from polyhead.trainer.policy import PolicyConfig
    from polyhead.trainer.train import train

    family = load_suite("cartpole-family")
    train(
        Suite(name="cartpole-pair", tasks=tuple(family.task(t) for t in TASKS)),
        out,
        config=PPOConfig(
            total_steps=steps, eval_interval=8_192, eval_episodes=3, final_eval_episodes=5, solved_evals=2,
            seed=seed,
        ),
        policy_config=PolicyConfig(trunk_hidden=(32,), feature_size=32, critic_hidden=(32,)),
        progress=False,
        exporter="torchscript",
    )  # fmt: skip


def deterministic_actions(target: str, task: str) -> list[int]:
    obs = np.random.default_rng(0).standard_normal((32, 4)).astype(np.float32) * 0.3
    with PolicyClient(target, timeout=10.0) as client:
        return [int(a) for a in np.asarray(client.act(task, obs, deterministic=True).actions).reshape(-1)]


def first_recovered(fleet: SimulatorFleet, changed_at: float, bar: float, window: int = 20) -> float | None:
    """Seconds from the change to the end of the first ``window`` changed-environment episodes whose mean
    return is at least ``bar`` (None while there is none)."""
    with fleet._lock:
        after = [(t - changed_at, r) for t, _, r in fleet.stats.returns]
    for i in range(window, len(after) + 1):
        if np.mean([r for _, r in after[i - window : i]]) >= bar:
            return after[i - 1][0]
    return None


def run_seed(
    args: argparse.Namespace, seed: int, trained: Path, tmp: Path, *, supersede: bool
) -> dict[str, Any]:
    """One seed with one controller variant, on a fresh copy of the seed's trained bundle."""
    variant = "supersede" if supersede else "wait"
    bundle = tmp / f"bundle-{seed}-{variant}"
    shutil.copytree(trained, bundle)
    settings = ServerSettings(
        bundle=bundle, host="127.0.0.1", port=0, admin_port=0, metrics_port=None, watch_interval_s=1.0
    )
    base = load_suite("cartpole-family").task(DRIFTING)
    drifted = replace(
        base, wrappers=(*base.wrappers, *load_task_spec("cartpole-family:cartpole-reversed").wrappers)
    )
    with BackgroundServer(settings) as srv:
        metrics = srv.running.metrics.registry

        def value(name: str, labels: dict[str, str]) -> float:
            return float(metrics.get_sample_value(name, labels) or 0.0)

        def steps() -> float:
            return value("polyhead_experience_steps_total", {"task": DRIFTING})

        steady_before = deterministic_actions(srv.target, STEADY)
        steady = SimulatorFleet(
            srv.target, STEADY, clients=2, episodes_per_round=2, mode="stream", seed=seed
        ).start()
        normal = SimulatorFleet(
            srv.target, DRIFTING, clients=3, episodes_per_round=2, mode="stream", seed=seed + 1
        ).start()
        time.sleep(args.stationary_s)
        normal.stop()
        stationary_episodes = normal.stats.episodes + steady.stats.episodes
        false_alarms = sum(
            value("polyhead_regression_events_total", {"task": t, "kind": "regressed"}) for t in TASKS
        )
        pre = [r for _, _, r in normal.stats.returns]
        pre_mean = float(np.mean(pre[-60:]))
        changed_at, steps_at_change = time.monotonic(), steps()
        changed = SimulatorFleet(
            srv.target,
            DRIFTING,
            clients=3,
            episodes_per_round=4,
            mode="stream",
            seed=seed + 2,
            task_spec=drifted,
        ).start()
        events: list[dict[str, Any]] = []

        def on_decision(d: Decision) -> None:
            events.append({
                "t_s": round(time.monotonic() - changed_at, 1), "samples": int(steps() - steps_at_change),
                "decision": d.decision, "version": d.version, "detail": d.detail,
            })  # fmt: skip
            print(
                f"seed {seed} {variant} +{events[-1]['t_s']:6.1f}s {d.decision:9s} v{d.version}: {d.detail}",
                flush=True,
            )

        state = tmp / f"state-{seed}-{variant}"
        operator = Operator(
            default_config(
                bundle=bundle, servers=(srv.target,), admin_targets=(srv.admin_target,), state_dir=state,
                exporter="torchscript", judge_episodes=20, shares=DRIFT_SHARES, ppo={"seed": seed},
                supersede=supersede,
            ),
            on_decision=on_decision,
        )  # fmt: skip
        stop = threading.Event()
        runner = threading.Thread(target=operator.run, args=(stop,), daemon=True)
        runner.start()
        detected = None
        counted: list[tuple[float, int]] = []  # (seconds since the change, task samples since it)
        recovered_at = None
        while time.monotonic() - changed_at < args.after_s:
            now = time.monotonic() - changed_at
            counted.append((now, int(steps() - steps_at_change)))
            if detected is None and value("polyhead_task_regressed", {"task": DRIFTING}) == 1.0:
                detected = {"t_s": round(now, 1), "samples": counted[-1][1]}
            if recovered_at is None:
                recovered_at = first_recovered(changed, changed_at, 0.9 * pre_mean)
            elif now - recovered_at > args.tail_s:
                break  # recovered, and a tail of episodes played under the recovered head
            time.sleep(0.5)
        stop.set()
        runner.join(timeout=120)
        stats = changed.stop()
        steady_stats = steady.stop()
        after = [(t - changed_at, r) for t, _, r in stats.returns]
        recovered_at = first_recovered(changed, changed_at, 0.9 * pre_mean)
        recovered_samples = (
            max((n for t, n in counted if t <= recovered_at), default=0) if recovered_at is not None else None
        )
        return {
            "seed": seed,
            "variant": variant,
            "stationary_s": args.stationary_s,
            "stationary_episodes": stationary_episodes,
            "false_alarms_stationary": false_alarms,
            "pre_change_mean_return": round(pre_mean, 1),
            "drifted_first_20_mean": round(float(np.mean([r for _, r in after[:20]])), 1) if after else None,
            "drifted_last_20_mean": round(float(np.mean([r for _, r in after[-20:]])), 1) if after else None,
            "detection": detected,
            "decisions": events,
            "recovered_90pct_at_s": None if recovered_at is None else round(recovered_at, 1),
            "recovered_90pct_samples": recovered_samples,
            "after_s": round(time.monotonic() - changed_at, 1),
            "return_curve": [(round(t, 1), round(r, 1)) for t, r in after],
            "steady_actions_unchanged": deterministic_actions(srv.target, STEADY) == steady_before,
            "failed_requests": stats.failed_requests
            + steady_stats.failed_requests
            + normal.stats.failed_requests,
        }


def plot(results: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    seeds = sorted({res["seed"] for res in results})
    for res in results:
        color = f"C{seeds.index(res['seed'])}"
        style = "-" if res.get("variant", "supersede") == "supersede" else (0, (4, 2))
        curve = res["return_curve"]
        if len(curve) >= 20:
            ts = [t for t, _ in curve][19:]
            means = np.convolve([r for _, r in curve], np.ones(20) / 20, mode="valid")
            ax.plot(
                ts,
                means,
                color=color,
                linestyle=style,
                label=f"seed {res['seed']} {res.get('variant', '')} "
                f"(pre-change {res['pre_change_mean_return']})",
            )
        ax.axhline(0.9 * res["pre_change_mean_return"], color=color, linestyle="--", linewidth=0.8)
        if res["detection"]:
            ax.axvline(res["detection"]["t_s"], color=color, linestyle=":", linewidth=0.8)
        for d in res["decisions"]:
            if d["decision"] == "promote":
                ax.plot(d["t_s"], 0, marker="^", color=color, markersize=8)
        if res["recovered_90pct_at_s"] is not None:
            ax.plot(res["recovered_90pct_at_s"], 0.9 * res["pre_change_mean_return"], marker="o", color=color)
    ax.set_xlabel("seconds since the actuator was reversed")
    ax.set_ylabel("20-episode mean live return")
    ax.set_title(
        "operate_drift: recovery per seed and variant (thin dashed: 90 % of pre-change; ^ promotions; "
        "o recovered)",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--bundle", type=Path, default=None, help="a trained two-task bundle (default: train one per seed)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument(
        "--train-steps", type=int, default=50_000, help="training steps of each seed's bundle (no --bundle)"
    )
    parser.add_argument("--stationary-s", type=float, default=120.0)
    parser.add_argument("--after-s", type=float, default=300.0, help="longest run after the change")
    parser.add_argument(
        "--tail-s", type=float, default=20.0, help="seconds played after recovery before the seed ends"
    )
    parser.add_argument(
        "--supersede",
        choices=("on", "off", "both"),
        default="on",
        help="the controller's --supersede; both: each seed's bundle runs under both, side by side",
    )
    parser.add_argument("--plot", type=Path, default=None, help="PNG: return after the change, per seed")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        variants = {"on": [True], "off": [False], "both": [True, False]}[args.supersede]
        for seed in args.seeds:
            trained = Path(args.bundle) if args.bundle else Path(tmp) / f"trained-{seed}"
            if not args.bundle:
                t0 = time.perf_counter()
                train_bundle(trained, seed, args.train_steps)
                print(f"seed {seed}: bundle trained in {time.perf_counter() - t0:.0f} s", flush=True)
            for supersede in variants:
                results.append(run_seed(args, seed, trained, Path(tmp), supersede=supersede))
            text = json.dumps(
                {"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1
            )
            if args.out:  # after every seed: a long run that is stopped keeps what it measured
                args.out.write_text(text + "\n", encoding="utf-8")
            print(text, flush=True)
            if args.plot:
                plot(results, args.plot)


if __name__ == "__main__":
    main()
