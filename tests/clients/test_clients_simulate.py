"""``polyhead simulate`` and the simulator engine against a real server: deterministic returns equal an
in-process onnxruntime evaluation of the bundle; rewards reach the server; failed requests give exit status 1,
no server at all exit status 2."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from clients_inprocess import deterministic_returns

from polyhead.clients.simulator import SimulationConfig, run_simulation
from polyhead.server.app import BackgroundServer

SEED = 3


def _simulate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "polyhead", "simulate", *args, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("task_id", ["cartpole", "cartpole-continuous"])
def test_simulate_deterministic_matches_in_process_evaluation(
    clients_server: BackgroundServer, clients_bundle: Path, task_id: str
) -> None:
    episodes = 4
    proc = _simulate(
        "--target", clients_server.target, "--task", task_id, "--episodes", str(episodes), "--envs", "3",
        "--deterministic", "--seed", str(SEED),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in (
        "task", "episodes", "mean_return", "std_return", "steps", "actions_per_second", "latency_ms",
        "failed_requests", "head_versions",
    ):  # fmt: skip
        assert key in summary
    assert list(summary)[:9] == [
        "task", "episodes", "mean_return", "std_return", "steps", "actions_per_second", "latency_ms",
        "failed_requests", "head_versions",
    ]  # fmt: skip
    assert set(summary["latency_ms"]) == {"p50", "p99"}
    assert summary["task"] == task_id and summary["episodes"] == episodes
    assert summary["failed_requests"] == 0 and summary["head_versions"] == [1]
    expected = deterministic_returns(clients_bundle, task_id, [SEED + j for j in range(episodes)])
    assert summary["returns"] == pytest.approx(expected)
    assert summary["steps"] == pytest.approx(sum(expected))  # reward 1 per step in CartPole
    assert summary["reported"]["accepted"] == summary["steps"]
    assert summary["reported"]["dropped"] == 0
    assert summary["reported"]["episodes_completed"] == episodes
    assert 0 < summary["latency_ms"]["p50"] <= summary["latency_ms"]["p99"]
    assert f"seed {SEED:6d}" in proc.stderr  # per-episode lines


def test_stream_mode_gives_the_same_returns_as_unary(clients_server: BackgroundServer) -> None:
    results = {
        mode: run_simulation(
            clients_server.target,
            SimulationConfig(task_id="acrobot", episodes=3, envs=2, deterministic=True, seed=SEED, mode=mode),
        )
        for mode in ("unary", "stream")
    }
    unary, stream = results["unary"], results["stream"]
    assert unary.completed and stream.completed
    assert unary.returns == stream.returns
    assert [e.length for e in unary.episodes] == [e.length for e in stream.episodes]
    assert stream.failed_requests == 0
    # Stream mode: one request per step plus one final report per episode.
    assert len(stream.latencies_ms) == stream.steps + 3


def test_sampled_runs_are_reproducible_with_a_seed(clients_server: BackgroundServer) -> None:
    config = SimulationConfig(task_id="cartpole", episodes=3, envs=3, deterministic=False, seed=11)
    first = run_simulation(clients_server.target, config)
    second = run_simulation(clients_server.target, config)
    assert first.returns == second.returns


def test_simulate_with_a_users_task_spec(clients_server: BackgroundServer, tmp_path: Path) -> None:
    spec = tmp_path / "heavy.toml"
    spec.write_text('[[task]]\nid = "cartpole-heavy"\nenv = "CartPole-v1"\nattrs = { masscart = 3.0 }\n')
    proc = _simulate(
        "--target", clients_server.target, "--task", "cartpole", "--episodes", "2", "--task-spec", str(spec),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["episodes"] == 2


def test_simulate_without_a_server_fails_in_one_line() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _simulate(
        "--target", f"127.0.0.1:{port}", "--task", "cartpole", "--episodes", "1", "--timeout", "0.5"
    )
    assert proc.returncode == 2
    (line,) = [line for line in proc.stderr.splitlines() if line.strip()]
    assert line.startswith(f"polyhead simulate: error: no polyhead server answered at 127.0.0.1:{port}")
    assert proc.stdout.strip() == ""  # no summary for a run that never started


def test_unknown_task_fails_with_the_served_list(clients_server: BackgroundServer) -> None:
    proc = _simulate("--target", clients_server.target, "--task", "no-such-task", "--episodes", "1")
    assert proc.returncode == 1
    assert "no-such-task" in proc.stderr and "cartpole" in proc.stderr
