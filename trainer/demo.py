"""``polyhead demo``: the whole story in one command, each step a public command.

1. ``polyhead train`` trains the default suite and exports the bundle;
2. ``polyhead serve`` serves it; simulators (the engine behind ``polyhead simulate``) run every task
   deterministically and give a table of returns and latencies;
3. a new task arrives: ``polyhead adapt --source remote`` trains only its head from the experience that
   simulator clients stream through the server, and publishes versions the server swaps in live, while
   simulators keep acting on the new task (sampled, so they explore) and on the old tasks;
4. the old tasks are simulated again with the same seeds (returns and head hashes must be unchanged), and
   a final table shows the new task's return version by version, failed requests and swaps.

Train, serve and adapt run as subprocesses (the demo is what a user would type, and the server lives in
its own process as in production); the simulators run in threads of this process through
:mod:`polyhead.clients.simulator`. Everything lands in a report directory: ``summary.md``, ``summary.json``,
PNG
plots (:mod:`polyhead.trainer.demo_report`), the bundle, and the logs of every subprocess.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from polyhead.bundle import Bundle, sha256_file
from polyhead.errors import PolyheadError
from polyhead.server.process import ServeProcess
from polyhead.taskspec import load_suite

log = logging.getLogger("polyhead.demo")

Say = Callable[[str], None]


class DemoError(PolyheadError):
    """A demo step failed; the message names the step and where its log is."""


@dataclass(frozen=True)
class DemoConfig:
    """What ``polyhead demo`` runs (every field is a command-line option)."""

    out: Path = Path("demo-report")
    suite: str = "cartpole-family"
    new_task: str = "cartpole-reversed"
    train_steps: int | None = None  # None: the trainer's default budget
    adapt_steps: int = 60_000
    publish_every: int = 3
    seed: int = 1
    eval_episodes: int = 5
    sim_envs: int = 8
    bundle: Path | None = None  # reuse a trained bundle instead of training
    fast: bool = False  # tiny budgets: proves the chain, not the learning (tests, CI)
    step_timeout_s: float = 900.0
    scenario: str = "adapt"  # "adapt": a new task arrives; "drift": a served task's environment changes
    drift_task: str = "cartpole-long-pole"  # drift: the task whose actuator is reversed
    stationary_s: float = 60.0  # drift: seconds of unchanged traffic before the change
    drift_s: float = 420.0  # drift: the longest the changed environment runs
    recover_fraction: float = 0.9  # drift: recovered = a 20-episode mean at this share of the pre-change one
    budget_s: float = 600.0  # drift: the changed environment runs at most until this much of the run is used

    @property
    def bundle_dir(self) -> Path:
        return self.out / "bundle"


@dataclass
class SimRow:
    """One simulator run, as the tables and plots need it."""

    task: str
    mean_return: float
    std_return: float
    episodes: int
    steps: int
    p50_ms: float
    p99_ms: float
    failed_requests: int
    head_versions: list[int]
    returns: list[float]
    started_s: float = 0.0  # seconds since the new task arrived (adaptation phase only)


@dataclass
class DemoState:
    """Everything the demo measured; turned into summary.json and summary.md."""

    config: DemoConfig
    started: float = field(default_factory=time.perf_counter)
    train: dict[str, Any] = field(default_factory=dict)
    serve: dict[str, Any] = field(default_factory=dict)
    before: dict[str, SimRow] = field(default_factory=dict)
    after: dict[str, SimRow] = field(default_factory=dict)
    adapt_batches: list[SimRow] = field(default_factory=list)
    background: list[SimRow] = field(default_factory=list)
    adapt: dict[str, Any] = field(default_factory=dict)
    new_task_final: SimRow | None = None
    hashes_before: dict[str, str] = field(default_factory=dict)
    hashes_after: dict[str, str] = field(default_factory=dict)
    swaps: float = 0.0
    head_loads: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    server_exit_code: int | None = None
    steps_wall: dict[str, float] = field(default_factory=dict)


# ============================================================================================================
# Subprocesses
# ============================================================================================================
def _polyhead(*args: str) -> list[str]:
    return [sys.executable, "-m", "polyhead", *args]


def _last_json_line(text: str, step: str, log_path: Path) -> dict[str, Any]:
    for raw in reversed(text.strip().splitlines()):
        line = raw.strip()
        if line.startswith("{"):
            try:
                data = json.loads(line)
            except json.JSONDecodeError:
                break
            if isinstance(data, dict):
                return data
    raise DemoError(f"{step}: no JSON summary on stdout; see {log_path}")


def _run_step(
    name: str, argv: list[str], log_path: Path, *, timeout: float, show_stderr: bool
) -> dict[str, Any]:
    """Run a polyhead subcommand to completion; return its --json summary. Raises DemoError."""
    log.debug("%s: %s", name, " ".join(argv))
    with log_path.open("w") as err:
        try:
            proc = subprocess.run(
                argv,
                stdout=subprocess.PIPE,
                stderr=None if show_stderr else err,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise DemoError(f"{name} did not finish within {timeout:.0f} s; see {log_path}") from exc
    if proc.returncode != 0:
        raise DemoError(f"{name} exited with status {proc.returncode}; see {log_path}")
    return _last_json_line(proc.stdout, name, log_path)


# ============================================================================================================
# Simulators (the engine behind `polyhead simulate`)
# ============================================================================================================
def simulate(
    target: str, task: str, *, episodes: int, envs: int, deterministic: bool, seed: int
) -> tuple[SimRow, list[float]]:
    from polyhead.clients.simulator import SimulationConfig, run_simulation

    result = run_simulation(
        target,
        SimulationConfig(
            task_id=task, episodes=episodes, envs=min(envs, episodes), deterministic=deterministic, seed=seed
        ),
    )
    returns = [float(r) for r in result.returns]
    lat = np.asarray(result.latencies_ms, dtype=np.float64)
    row = SimRow(
        task=task,
        mean_return=float(np.mean(returns)) if returns else float("nan"),
        std_return=float(np.std(returns)) if returns else float("nan"),
        episodes=len(returns),
        steps=result.steps,
        p50_ms=float(np.percentile(lat, 50)) if lat.size else float("nan"),
        p99_ms=float(np.percentile(lat, 99)) if lat.size else float("nan"),
        failed_requests=result.failed_requests,
        head_versions=sorted(result.head_versions),
        returns=returns,
    )
    return row, list(result.latencies_ms)


def _wait_for_task(target: str, task: str, proc: subprocess.Popen[str], timeout: float) -> None:
    from polyhead.clients import PolicyClient

    deadline = time.monotonic() + timeout
    with PolicyClient(target) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return  # adapt ended early (e.g. failed); its exit status is checked by the caller
            try:
                catalog = client.list_tasks(refresh=True)
                if task in catalog:
                    return
            except Exception:  # a client error while polling only means "not yet"
                log.debug("waiting for %s to appear on the server", task)
            time.sleep(0.25)
    raise DemoError(f"the new task {task!r} did not appear on the server within {timeout:.0f} s")


def _scrape(url: str) -> dict[str, float]:
    """Sum every sample of the metrics the final table needs."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + float(sample.value)
    return totals


def _head_hashes(bundle_dir: Path, tasks: list[str]) -> dict[str, str]:
    bundle = Bundle.open(bundle_dir)
    out = {"trunk.onnx": sha256_file(bundle.trunk_path)}
    for task in tasks:
        record = bundle.head(task)
        out[f"{task}@{record.version}"] = sha256_file(record.onnx_path)
    return out


# ============================================================================================================
# The demo
# ============================================================================================================
def run_demo(config: DemoConfig, say: Say) -> DemoState:
    """Run the four steps; returns everything measured. Raises DemoError when a step fails."""
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    state = DemoState(config)
    suite = load_suite(config.suite)
    old_tasks = [t.id for t in suite.train_tasks]
    new_task = suite.task(config.new_task)
    fast = config.fast

    # --- 1. train ------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    if config.bundle is not None:
        say(f"[1/4] using the trained bundle {config.bundle} (training skipped)")
        bundle_dir = config.bundle
        state.train = {"bundle": str(bundle_dir), "skipped": True, "tasks": {}}
    else:
        bundle_dir = config.bundle_dir
        steps = config.train_steps if config.train_steps is not None else (6_000 if fast else None)
        say(
            f"[1/4] training suite {config.suite!r} ({len(old_tasks)} tasks"
            + (f", {steps:,} steps" if steps else ", default budget")
            + f") -> {bundle_dir}"
        )
        argv = [
            "train",
            "--suite",
            config.suite,
            "--out",
            str(bundle_dir),
            "--overwrite",
            "--seed",
            str(config.seed),
            "--run-dir",
            str(out / "train-logs"),
            "--json",
        ]
        if steps is not None:
            argv += ["--total-steps", str(steps)]
        if fast:
            argv += ["--eval-interval", "2000", "--eval-episodes", "2", "--final-eval-episodes", "2"]
        state.train = _run_step(
            "polyhead train",
            _polyhead(*argv),
            logs / "train.log",
            timeout=config.step_timeout_s,
            show_stderr=True,
        )
    state.steps_wall["train"] = time.perf_counter() - t0

    # --- 2. serve + simulate every task ---------------------------------------------------------------------
    t0 = time.perf_counter()
    say("[2/4] serving the bundle and running simulators on every task")
    server = ServeProcess(bundle_dir, args=("--watch-interval", "0.5"), log_path=logs / "server.log")
    state.serve = {
        "target": server.target,
        "admin_target": server.admin_target,
        "metrics_url": server.metrics_url,
        "log": str(logs / "server.log"),
    }
    try:
        state.hashes_before = _head_hashes(bundle_dir, old_tasks)
        episodes = 2 if fast else config.eval_episodes
        for task in old_tasks:
            row, lat = simulate(
                server.target, task, episodes=episodes, envs=episodes, deterministic=True, seed=10_000
            )
            state.before[task] = row
            state.latencies_ms += lat
            say(
                f"      {task:<24} return {row.mean_return:7.1f} ± {row.std_return:5.1f}   "
                f"p50 {row.p50_ms:5.2f} ms  p99 {row.p99_ms:5.2f} ms  failed {row.failed_requests}"
            )
        state.steps_wall["serve_and_simulate"] = time.perf_counter() - t0

        # --- 3. a new task arrives: remote adaptation while simulators run ---------------------------------
        t0 = time.perf_counter()
        adapt_steps = 3_000 if fast else config.adapt_steps
        publish_every = 1 if fast else config.publish_every
        say(
            f"[3/4] new task {new_task.id!r} ({new_task.description or new_task.env}): adapting its head "
            f"from live experience ({adapt_steps:,} samples, a version every {publish_every} updates)"
        )
        adapt_log = logs / "adapt.log"
        argv = _polyhead(
            "adapt",
            "--bundle",
            str(bundle_dir),
            "--task-spec",
            f"{config.suite}:{new_task.id}",
            "--source",
            "remote",
            "--server",
            server.target,
            "--admin-target",
            server.admin_target,
            "--total-steps",
            str(adapt_steps),
            "--seed",
            str(config.seed),
            "--publish-every",
            str(publish_every),
            "--no-progress",
            "--json",
        )
        if fast:
            argv += ["--zero-shot-episodes", "2", "--eval-episodes", "2", "--guard-episodes", "2"]
        with adapt_log.open("w") as err:
            adapt_proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True)
            stdout_chunks: list[str] = []
            reader = threading.Thread(
                target=lambda: stdout_chunks.append(adapt_proc.stdout.read() if adapt_proc.stdout else ""),
                daemon=True,
            )
            reader.start()
            _wait_for_task(server.target, new_task.id, adapt_proc, timeout=300.0)
            arrived = time.perf_counter()
            stop = threading.Event()
            errors: list[BaseException] = []

            def background_old_tasks() -> None:
                # Old tasks keep being served while heads swap: their calls must not fail.
                i = 0
                while not stop.is_set():
                    task = old_tasks[i % len(old_tasks)]
                    try:
                        row, lat = simulate(
                            server.target, task, episodes=2, envs=2, deterministic=True, seed=20_000 + i
                        )
                    except BaseException as exc:
                        errors.append(exc)
                        return
                    row.started_s = time.perf_counter() - arrived
                    state.background.append(row)
                    state.latencies_ms += lat
                    i += 1

            bg = threading.Thread(target=background_old_tasks, name="old-task-sims", daemon=True)
            bg.start()
            batch = 0
            deadline = time.monotonic() + config.step_timeout_s
            while adapt_proc.poll() is None and time.monotonic() < deadline:
                started = time.perf_counter() - arrived
                row, lat = simulate(
                    server.target,
                    new_task.id,
                    episodes=config.sim_envs,
                    envs=config.sim_envs,
                    deterministic=False,
                    seed=30_000 + batch * config.sim_envs,
                )
                row.started_s = started
                state.adapt_batches.append(row)
                state.latencies_ms += lat
                say(
                    f"      t={started:6.1f}s  versions {row.head_versions}  "
                    f"mean return {row.mean_return:7.1f}  failed {row.failed_requests}"
                )
                batch += 1
            if adapt_proc.poll() is None:
                adapt_proc.kill()
                raise DemoError(
                    f"polyhead adapt did not finish in {config.step_timeout_s:.0f} s; see {adapt_log}"
                )
            stop.set()
            bg.join(timeout=120)
            reader.join(timeout=10)
            if errors:
                raise DemoError(f"background simulator failed: {errors[0]}")
        if adapt_proc.returncode != 0:
            raise DemoError(f"polyhead adapt exited with status {adapt_proc.returncode}; see {adapt_log}")
        state.adapt = _last_json_line("".join(stdout_chunks), "polyhead adapt", adapt_log)
        state.steps_wall["adapt"] = time.perf_counter() - t0

        # --- 4. final check ----------------------------------------------------------------
        t0 = time.perf_counter()
        say("[4/4] final check: the new task's served head, and the old tasks with the same seeds again")
        final, lat = simulate(
            server.target, new_task.id, episodes=episodes, envs=episodes, deterministic=True, seed=10_000
        )
        state.new_task_final = final
        state.latencies_ms += lat
        for task in old_tasks:
            row, lat = simulate(
                server.target, task, episodes=episodes, envs=episodes, deterministic=True, seed=10_000
            )
            state.after[task] = row
            state.latencies_ms += lat
        state.hashes_after = _head_hashes(bundle_dir, old_tasks)
        totals = _scrape(server.metrics_url)
        state.swaps = totals.get("polyhead_head_swaps_total", 0.0)
        state.head_loads = totals.get("polyhead_head_loads_total", 0.0)
        state.steps_wall["final_check"] = time.perf_counter() - t0
    finally:
        state.server_exit_code = server.stop()
    return state


# ============================================================================================================
# Summary
# ============================================================================================================
def failed_requests(state: DemoState) -> int:
    rows = [*state.before.values(), *state.after.values(), *state.adapt_batches, *state.background]
    if state.new_task_final is not None:
        rows.append(state.new_task_final)
    return sum(r.failed_requests for r in rows)


def per_version_returns(state: DemoState) -> list[dict[str, Any]]:
    """The new task's live (sampled) episode returns grouped by the single version that played them."""
    by_version: dict[int, list[float]] = {}
    for row in state.adapt_batches:
        if len(row.head_versions) == 1:
            by_version.setdefault(row.head_versions[0], []).extend(row.returns)
    published = {int(v["version"]): v for v in state.adapt.get("versions", [])}
    out = []
    for version in sorted(set(by_version) | set(published)):
        live = by_version.get(version, [])
        meta = published.get(version, {})
        out.append(
            {
                "version": version,
                "live_mean_return": float(np.mean(live)) if live else None,
                "live_episodes": len(live),
                "eval_return": meta.get("eval_return"),
                "samples": meta.get("samples"),
                "rolled_back": bool(meta.get("rolled_back", False)),
            }
        )
    return out


def summary(state: DemoState) -> dict[str, Any]:
    """The ``--json`` summary (also written to summary.json)."""
    old = {}
    for task, before in state.before.items():
        after = state.after.get(task)
        head_keys = [k for k in state.hashes_before if k.startswith(f"{task}@")]
        old[task] = {
            "return_before": before.mean_return,
            "return_after": after.mean_return if after else None,
            "returns_identical": bool(after and after.returns == before.returns),
            "head_sha256_unchanged": all(
                state.hashes_before[k] == state.hashes_after.get(k) for k in head_keys
            ),
            "p50_ms": before.p50_ms,
            "p99_ms": before.p99_ms,
        }
    lat = np.asarray(state.latencies_ms, dtype=np.float64)
    final = state.new_task_final
    return {
        "report": str(state.config.out),
        "bundle": str(state.config.bundle or state.config.bundle_dir),
        "wall_seconds": round(time.perf_counter() - state.started, 1),
        "steps_wall_seconds": {k: round(v, 1) for k, v in state.steps_wall.items()},
        "train": {
            "steps": state.train.get("steps"),
            "wall_seconds": state.train.get("wall_seconds"),
            "tasks": {t: v.get("eval_return") for t, v in state.train.get("tasks", {}).items()},
        },
        "old_tasks": old,
        "old_tasks_unchanged": all(
            v["returns_identical"] and v["head_sha256_unchanged"] for v in old.values()
        ),
        "trunk_sha256_unchanged": state.hashes_before.get("trunk.onnx")
        == state.hashes_after.get("trunk.onnx"),
        "new_task": {
            "id": state.config.new_task,
            "zero_shot_best": state.adapt.get("zero_shot_best"),
            "start_eval_return": state.adapt.get("start_eval_return"),
            "final_eval_return": state.adapt.get("final_eval_return"),
            "beat_start": state.adapt.get("beat_start"),
            "versions_published": state.adapt.get("versions_published"),
            "versions": per_version_returns(state),
            "final_return": final.mean_return if final else None,
            "final_version": final.head_versions if final else None,
            "served_by": state.adapt.get("served_by"),
            "rolled_back": state.adapt.get("rolled_back"),
            "adapt_steps": state.adapt.get("steps"),
        },
        "failed_requests": failed_requests(state),
        "requests_measured": int(lat.size),
        "latency_ms": {
            "p50": float(np.percentile(lat, 50)) if lat.size else None,
            "p99": float(np.percentile(lat, 99)) if lat.size else None,
        },
        "swaps": state.swaps,
        "head_loads": state.head_loads,
        "metrics_url": state.serve.get("metrics_url"),
        "server_exit_code": state.server_exit_code,
    }
