"""``polyhead demo --scenario drift``: one task's environment changes under a served head; the server
notices, ``polyhead operate`` re-adapts it through canaries, and the other tasks never notice.

1. ``polyhead train`` trains the suite (or ``--bundle`` reuses one);
2. ``polyhead serve`` serves it and ``polyhead operate`` watches it (both subprocesses, as in
   production); stream simulators (sampled actions, rewards reported) play every task;
3. after ``stationary_s`` seconds the drifting task's simulators reverse their actuator (the
   ``reverse-action`` wrapper of ``cartpole-reversed``): its return collapses, the server's live-return
   monitor marks the task regressed, and the controller trains candidates from live experience, publishes
   them as canaries, widens, promotes or rolls them back;
4. the run ends when the controller has promoted a version that plays at least ``recover_fraction`` of
   the pre-change return (and the simulators have played a window of episodes under it), or after
   ``drift_s`` seconds; then the other tasks are checked: the same observations give byte-identical
   actions before and after, their head files' sha256 are unchanged, and no request failed.

Everything is timed from the change: a poller reads ``ListTasks`` (stable, canary and share, regressed)
and the server's experience-step counter twice a second, and the controller's ``decisions.jsonl`` gives
its decisions with their numbers. :mod:`polyhead.trainer.demo_report` turns the :class:`DriftState` into
``summary.md``, ``summary.json`` and ``drift_timeline.png``.
"""

from __future__ import annotations

import hashlib
import json
import math
import signal
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from polyhead.taskspec import TaskSpec, load_suite
from polyhead.trainer.demo import DemoConfig, DemoError, Say, _head_hashes, _polyhead, _run_step

#: The controller's canary settings in the demo (and in benchmarks/operate_drift.py): a regressed stable
#: head is the thing being replaced, so the first share can be larger than for a routine rollout; each
#: share needs its own verdict, so fewer steps mean a faster promotion (docs/benchmarks.md, operate_drift).
DRIFT_SHARES = (25.0, 50.0)


@dataclass
class DriftState:
    """Everything the drift scenario measured (seconds are from the change; negative is before it)."""

    config: DemoConfig
    started: float = field(default_factory=time.perf_counter)
    train: dict[str, Any] = field(default_factory=dict)
    serve: dict[str, Any] = field(default_factory=dict)
    tasks: list[str] = field(default_factory=list)
    drift_task: str = ""
    # (t, versions, return) of every completed episode, per task; the drifting task's episodes in the
    # changed environment under "<task> (changed)".
    returns: dict[str, list[tuple[float, tuple[int, ...], float]]] = field(default_factory=dict)
    # Twice a second: t, stable, canary, share, regressed, the drifting task's experience steps since the
    # change, and which other tasks the server marked regressed (false alarms).
    timeline: list[dict[str, Any]] = field(default_factory=list)
    decisions: list[dict[str, Any]] = field(default_factory=list)
    actions_before: dict[str, str] = field(default_factory=dict)  # task -> sha256 of the action bytes
    actions_after: dict[str, str] = field(default_factory=dict)
    hashes_before: dict[str, str] = field(default_factory=dict)
    hashes_after: dict[str, str] = field(default_factory=dict)
    failed_requests: int = 0
    requests: int = 0
    fleet_errors: dict[str, int] = field(default_factory=dict)
    operate: dict[str, Any] = field(default_factory=dict)
    operate_exit_code: int | None = None
    server_exit_code: int | None = None
    steps_wall: dict[str, float] = field(default_factory=dict)
    drift_s: float = 0.0  # how long the changed environment ran
    drift_limit_s: float = 0.0  # the longest it could run: --drift-s, or less to stay in --budget-s


def drifted_spec(base: TaskSpec) -> TaskSpec:
    """``base`` with its actuator reversed (the suite's ``cartpole-reversed`` wrapper appended)."""
    from polyhead.taskspec import load_task_spec

    reverse = load_task_spec("cartpole-family:cartpole-reversed").wrappers
    return replace(base, wrappers=(*base.wrappers, *reverse))


def probe_observations(size: int, seed: int = 0) -> np.ndarray:
    """The fixed observations the untouched tasks' actions are compared on."""
    return (np.random.default_rng(seed).standard_normal((64, size)) * 0.3).astype(np.float32)


def served_actions(target: str, task: str, observations: np.ndarray) -> str:
    """sha256 of the deterministic actions the server gives ``task`` for ``observations``."""
    from polyhead.clients import PolicyClient

    with PolicyClient(target, timeout=10.0) as client:
        result = client.act(task, observations, deterministic=True)
    return hashlib.sha256(np.ascontiguousarray(result.actions).tobytes()).hexdigest()


#: Decisions that judge a canary (its first verdict ends a --fast run's changed phase).
_VERDICTS = frozenset({"widen", "promote", "rollback", "supersede", "retire", "give_up"})


def _labelled(url: str, *queries: tuple[str, dict[str, str]]) -> list[float]:
    """The value of each (sample name, labels) query in one scrape of ``url`` (0 where absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    values = [0.0] * len(queries)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for i, (name, labels) in enumerate(queries):
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    values[i] = float(sample.value)
    return values


def _train(config: DemoConfig, say: Say, logs: Path) -> tuple[Path, dict[str, Any]]:
    if config.bundle is not None:
        say(f"[1/4] using the trained bundle {config.bundle} (training skipped)")
        return config.bundle, {"bundle": str(config.bundle), "skipped": True, "tasks": {}}
    steps = config.train_steps if config.train_steps is not None else (40_000 if config.fast else None)
    say(
        f"[1/4] training suite {config.suite!r}"
        + (f" ({steps:,} steps)" if steps else " (default budget)")
        + f" -> {config.bundle_dir}"
    )
    argv = [
        "train", "--suite", config.suite, "--out", str(config.bundle_dir), "--overwrite",
        "--seed", str(config.seed), "--run-dir", str(config.out / "train-logs"), "--json",
    ]  # fmt: skip
    if steps is not None:
        argv += ["--total-steps", str(steps)]
    if config.fast:
        argv += ["--eval-interval", "10000", "--eval-episodes", "2", "--final-eval-episodes", "3"]
    result = _run_step(
        "polyhead train",
        _polyhead(*argv),
        logs / "train.log",
        timeout=config.step_timeout_s,
        show_stderr=True,
    )
    return config.bundle_dir, result


def _operate_argv(config: DemoConfig, bundle: Path, target: str, admin: str, state_dir: Path) -> list[str]:
    fast = config.fast
    return _polyhead(
        "operate", "--server", target, "--admin-target", admin, "--bundle", str(bundle),
        "--state-dir", str(state_dir), "--task", config.drift_task, "--poll", "1",
        "--shares", ",".join(f"{s:g}" for s in DRIFT_SHARES),
        "--judge-episodes", "6" if fast else "20", "--publish-every", "1" if fast else "4",
        "--exporter", "torchscript", "--seed", str(config.seed), "--json",
    )  # fmt: skip


def run_drift_demo(config: DemoConfig, say: Say) -> DriftState:
    """Run the scenario; returns everything measured. Raises DemoError when a step fails."""
    from polyhead.clients import PolicyClient
    from polyhead.server.process import ServeProcess
    from polyhead.trainer.updater.fleet import SimulatorFleet

    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    state = DriftState(config)
    suite = load_suite(config.suite)
    state.tasks = [t.id for t in suite.train_tasks]
    if config.drift_task not in state.tasks:
        raise DemoError(f"--drift-task {config.drift_task!r} is not a training task of {config.suite!r}")
    state.drift_task = drift = config.drift_task
    others = [t for t in state.tasks if t != drift]
    stationary_s = 15.0 if config.fast else config.stationary_s
    drift_s = 90.0 if config.fast else config.drift_s

    t0 = time.perf_counter()
    bundle_dir, state.train = _train(config, say, logs)
    state.steps_wall["train"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    say(
        f"[2/4] serving the bundle; `polyhead operate` watches {drift!r}; stream simulators (sampled) on "
        f"{len(state.tasks)} tasks for {stationary_s:.0f} s"
    )
    server = ServeProcess(bundle_dir, args=("--watch-interval", "0.5"), log_path=logs / "server.log")
    state.serve = {
        "target": server.target,
        "admin_target": server.admin_target,
        "log": str(logs / "server.log"),
    }
    operate_log = logs / "operate.log"
    operate_out = logs / "operate.stdout"
    operator: subprocess.Popen[bytes] | None = None
    fleets: list[SimulatorFleet] = []
    stop = threading.Event()
    poller: threading.Thread | None = None
    try:
        obs = probe_observations(4)
        state.hashes_before = _head_hashes(bundle_dir, others)
        state.actions_before = {t: served_actions(server.target, t, obs) for t in others}
        with operate_log.open("wb") as err, operate_out.open("wb") as so:
            operator = subprocess.Popen(
                _operate_argv(config, bundle_dir, server.target, server.admin_target, out / "operate"),
                stdout=so,
                stderr=err,
            )
        for i, task in enumerate(state.tasks):
            clients = 3 if task == drift else 1
            fleets.append(
                SimulatorFleet(
                    server.target, task, clients=clients, episodes_per_round=2, mode="stream",
                    seed=config.seed * 1_000 + 10 * i,
                ).start()
            )  # fmt: skip
        changed_at = time.monotonic() + stationary_s  # provisional; set exactly at the change
        change_wall = [time.time() + stationary_s]
        steps_at_change = [0.0]
        # The regressed flag lasts only until the first promotion, which a poll on a loaded machine can
        # miss; the server's count of regression events cannot be missed.
        regressions_at_change = [math.inf]
        counters = (
            ("polyhead_experience_steps_total", {"task": drift}),
            ("polyhead_regression_events_total", {"task": drift, "kind": "regressed"}),
        )

        def poll() -> None:
            with PolicyClient(server.target, timeout=5.0) as client:
                while not stop.is_set():
                    try:
                        catalog = client.list_tasks(refresh=True)
                        steps, regressions = _labelled(server.metrics_url, *counters)
                    except Exception as exc:  # a poll that fails is a gap in the plot, not a failure
                        say(f"      (poll failed: {exc})")
                        stop.wait(0.5)
                        continue
                    task = catalog.tasks[drift]
                    state.timeline.append(
                        {
                            "t_s": round(time.monotonic() - changed_at, 2),
                            "stable": task.active_version,
                            "canary": task.canary_version,
                            "share": task.canary_percent,
                            "regressed": task.regressed or regressions > regressions_at_change[0],
                            "samples": int(steps - steps_at_change[0]),
                            "others_regressed": sorted(
                                t for t in others if t in catalog.tasks and catalog.tasks[t].regressed
                            ),
                        }
                    )
                    stop.wait(0.5)

        poller = threading.Thread(target=poll, name="drift-poller", daemon=True)
        poller.start()
        time.sleep(stationary_s)
        # The pre-change return is measured and the monitor's live reference (40 episodes) forms on these
        # episodes: wait (up to as long again, at least 30 s) for 40 of them when a loaded machine played
        # fewer, --fast included. A change while the reference is still forming can put a half-changed
        # block into it, and the monitor then misses the drop (seen under the full test suite's load).
        drifting = fleets[state.tasks.index(drift)]
        extra = time.monotonic() + max(stationary_s, 30.0)
        while drifting.stats.episodes < 40 and time.monotonic() < extra:
            time.sleep(1.0)
        if operator.poll() is not None:
            raise DemoError(f"polyhead operate exited with status {operator.returncode}; see {operate_log}")
        state.steps_wall["serve_and_stationary"] = time.perf_counter() - t0

        # --- 3. the environment changes ---------------------------------------------------------------------
        t0 = time.perf_counter()
        say(f"[3/4] {drift!r}: the actuator is reversed in its simulators; operate recovers it")
        index = state.tasks.index(drift)
        normal = fleets[index]
        steps_at_change[0], regressions_at_change[0] = _labelled(server.metrics_url, *counters)
        changed_at = time.monotonic()
        change_wall[0] = time.time()
        fleets[index] = SimulatorFleet(
            server.target, drift, clients=3, episodes_per_round=2, mode="stream",
            seed=config.seed * 1_000 + 7, task_spec=drifted_spec(suite.task(drift)),
        ).start()  # fmt: skip
        normal.stop()
        fleets.append(normal)  # its stats still count (pre-change returns, failed requests)
        decisions_file = out / "operate" / "decisions.jsonl"
        recovered_since: float | None = None
        last_said = 0.0
        # The demo's budget: the changed world runs at most until budget_s of the whole run is used, less a
        # reserve for the checks and the report (a loaded machine trains slower; the cut is reported).
        left = config.budget_s - (time.perf_counter() - state.started) - 45.0
        state.drift_limit_s = max(30.0, min(drift_s, left))
        while time.monotonic() - changed_at < state.drift_limit_s:
            time.sleep(1.0)
            elapsed = time.monotonic() - changed_at
            state.decisions = _read_decisions(decisions_file, change_wall[0], state.timeline)
            if operator.poll() is not None:
                raise DemoError(
                    f"polyhead operate exited with status {operator.returncode}; see {operate_log}"
                )
            ended = [d for d in state.decisions if d["decision"] in ("promote", "give_up") and d["final"]]
            if ended and recovered_since is None:
                recovered_since = elapsed
            # --fast shows the chain, not the recovery: once a canary got its first verdict, the drop,
            # the detection, a candidate at its share and a judgement are all on the timeline.
            if (
                config.fast
                and recovered_since is None
                and fleets[index].stats.episodes >= 20
                and any(d["decision"] in _VERDICTS for d in state.decisions)
            ):
                recovered_since = elapsed
            # After the recovery ends, keep playing long enough to show the recovered return.
            if recovered_since is not None and elapsed - recovered_since >= (10.0 if config.fast else 30.0):
                break
            if elapsed - last_said >= 15.0:
                last_said = elapsed
                now = state.timeline[-1] if state.timeline else {}
                recent = [r for t, _, r in fleets[index].stats.returns[-20:]]
                say(
                    f"      +{elapsed:5.0f}s  stable v{now.get('stable')}  canary v{now.get('canary')} at "
                    f"{now.get('share', 0):g}%  regressed {now.get('regressed')}  last-20 return "
                    f"{np.mean(recent) if recent else float('nan'):6.1f}  decisions "
                    f"{[d['decision'] for d in state.decisions]}"
                )
        state.drift_s = time.monotonic() - changed_at
        state.steps_wall["drift"] = time.perf_counter() - t0

        # --- 4. checks ----------------------------------------------------------------------------------
        t0 = time.perf_counter()
        say("[4/4] checks: the other tasks' actions and head files, failed requests")
        for fleet in fleets:
            fleet.stop()
        stop.set()
        poller.join(timeout=10)
        operator.send_signal(signal.SIGTERM)
        try:
            state.operate_exit_code = operator.wait(timeout=120)
        except subprocess.TimeoutExpired:
            operator.kill()
            state.operate_exit_code = operator.wait()
        operator = None
        state.decisions = _read_decisions(decisions_file, change_wall[0], state.timeline)
        text = operate_out.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        state.operate = json.loads(text[-1]) if text and text[-1].startswith("{") else {}
        state.actions_after = {t: served_actions(server.target, t, obs) for t in others}
        state.hashes_after = _head_hashes(bundle_dir, others)
        for fleet in fleets:
            if fleet.failures:
                raise DemoError(f"a simulator of {fleet.task_id} failed: {fleet.failures[0]}")
            s = fleet.stats
            state.failed_requests += s.failed_requests
            state.requests += s.requests
            for code, n in s.errors.items():
                state.fleet_errors[code] = state.fleet_errors.get(code, 0) + n
            # The changed environment's episodes are "after" whenever they end; the unchanged fleet's
            # last rounds may end just after the change and are still "before".
            key = f"{drift} (changed)" if fleet is fleets[index] else fleet.task_id
            state.returns.setdefault(key, []).extend(
                (t - changed_at, versions, r) for t, versions, r in s.returns
            )
        for rows in state.returns.values():
            rows.sort(key=lambda row: row[0])
        state.steps_wall["checks"] = time.perf_counter() - t0
    finally:
        stop.set()
        for fleet in fleets:
            fleet.stop()
        if operator is not None and operator.poll() is None:
            operator.kill()
            operator.wait()
        state.server_exit_code = server.stop()
    return state


def _read_decisions(path: Path, change_wall: float, timeline: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The controller's decisions, timed from the change, with the samples the poller saw by then.

    ``final`` marks a promote or give-up that ended the recovery (a promote below the recovery bar keeps
    training and says "training goes on")."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        d = json.loads(line)
        t = float(d["at"]) - change_wall
        before = [p["samples"] for p in timeline if p["t_s"] <= t]
        out.append(
            {
                "t_s": round(t, 1),
                "samples": before[-1] if before else 0,
                "decision": d["decision"],
                "version": d["version"],
                "detail": d["detail"],
                "final": d["decision"] == "give_up"
                or (d["decision"] == "promote" and "training goes on" not in d["detail"]),
            }
        )
    return out


# ============================================================================================================
# Summary
# ============================================================================================================
def rolling_mean(values: list[float], window: int) -> list[float]:
    """Mean of the last ``window`` values at each position (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def drift_summary(state: DriftState) -> dict[str, Any]:
    """The ``--json`` summary of the drift scenario (also summary.json)."""
    cfg = state.config
    drift = state.drift_task
    pre = [r for _, _, r in state.returns.get(drift, [])]
    post = [(t, r) for t, _, r in state.returns.get(f"{drift} (changed)", [])]
    pre_mean = float(np.mean(pre[-60:])) if pre else float("nan")
    window = 20
    means = rolling_mean([r for _, r in post], window)
    recovered = None
    for i in range(window - 1, len(post)):
        if means[i] >= cfg.recover_fraction * pre_mean:
            recovered = {"t_s": round(post[i][0], 1), "samples": _samples_at(state, post[i][0])}
            break
    detection = next((p for p in state.timeline if p["t_s"] >= 0 and p["regressed"]), None)
    others = [t for t in state.tasks if t != drift]
    untouched = {
        t: {
            "actions_identical": state.actions_before.get(t) == state.actions_after.get(t),
            "head_sha256_unchanged": all(
                v == state.hashes_after.get(k)
                for k, v in state.hashes_before.items()
                if k.startswith(f"{t}@")
            ),
            "episodes": len(state.returns.get(t, [])),
            "mean_return": float(np.mean([r for _, _, r in state.returns.get(t, [])]))
            if state.returns.get(t)
            else None,
        }
        for t in others
    }
    false_alarms = sorted({t for p in state.timeline for t in p["others_regressed"]})
    promotions = [d for d in state.decisions if d["decision"] == "promote"]
    return {
        "scenario": "drift",
        "report": str(cfg.out),
        "bundle": str(cfg.bundle or cfg.bundle_dir),
        "wall_seconds": round(time.perf_counter() - state.started, 1),
        "steps_wall_seconds": {k: round(v, 1) for k, v in state.steps_wall.items()},
        "train": {
            "steps": state.train.get("steps"),
            "wall_seconds": state.train.get("wall_seconds"),
            "tasks": {t: v.get("eval_return") for t, v in state.train.get("tasks", {}).items()},
        },
        "drift_task": drift,
        "change": "actuator reversed (reverse-action wrapper)",
        "drift_seconds": round(state.drift_s, 1),
        "drift_limit_seconds": round(state.drift_limit_s, 1),
        "budget_seconds": cfg.budget_s,
        "pre_change_mean_return": pre_mean,
        "pre_change_episodes": len(pre),
        "drifted_first_20_mean": float(np.mean([r for _, r in post[:window]])) if post else None,
        "drifted_last_20_mean": float(np.mean([r for _, r in post[-window:]])) if post else None,
        "drifted_episodes": len(post),
        "detection": {"t_s": detection["t_s"], "samples": detection["samples"]} if detection else None,
        "recovered_fraction": cfg.recover_fraction,
        "recovered": recovered,
        "promotions": [{"t_s": d["t_s"], "version": d["version"]} for d in promotions],
        "decisions": state.decisions,
        "decision_counts": {
            k: sum(d["decision"] == k for d in state.decisions)
            for k in sorted({d["decision"] for d in state.decisions})
        },
        "final_stable_version": state.timeline[-1]["stable"] if state.timeline else None,
        "canary_shares_seen": sorted({p["share"] for p in state.timeline if p["canary"]}),
        "untouched_tasks": untouched,
        "untouched_unchanged": all(
            v["actions_identical"] and v["head_sha256_unchanged"] for v in untouched.values()
        ),
        "false_alarms_untouched": false_alarms,
        "failed_requests": state.failed_requests,
        "requests": state.requests,
        "operate_exit_code": state.operate_exit_code,
        "server_exit_code": state.server_exit_code,
        "operate": state.operate,
    }


def _samples_at(state: DriftState, t: float) -> int:
    before = [p["samples"] for p in state.timeline if p["t_s"] <= t]
    return int(before[-1]) if before else 0
