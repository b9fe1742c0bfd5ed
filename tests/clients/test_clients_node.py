"""The Node.js example client (clients/node) against a real server: it lists the tasks and runs a
CartPole episode whose return equals the same episode driven from Python through the same server."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from polyhead.clients import PolicyClient
from polyhead.envs import make_env
from polyhead.server.app import BackgroundServer

NODE_DIR = Path(__file__).resolve().parents[2] / "clients" / "node"
STATES = [[0.01, -0.02, 0.03, 0.01], [-0.04, 0.03, -0.02, 0.04], [0.0, 0.0, 0.0, 0.0]]


def _python_return(target: str, state: list[float]) -> float:
    with PolicyClient(target) as client:
        spec = client.task("cartpole").spec
        assert spec is not None
        env = make_env(spec)
        env.reset(seed=0)
        env.unwrapped.state = np.asarray(state, dtype=np.float64)
        obs, total = np.asarray(state, np.float32), 0.0
        while True:
            action = client.act("cartpole", obs, deterministic=True).actions
            obs, reward, terminated, truncated, _ = env.step(int(action))
            total += float(reward)
            if terminated or truncated:
                return total


@pytest.fixture(scope="module")
def node_installed() -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed on this machine")
    proc = subprocess.run(
        [
            "npm",
            "install",
            "--no-audit",
            "--no-fund",
            "--cache",
            str(NODE_DIR / "node_modules" / ".npm-cache"),
        ],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return NODE_DIR


@pytest.mark.service
def test_node_client_runs_an_episode(clients_server: BackgroundServer, node_installed: Path) -> None:
    for state in STATES:
        proc = subprocess.run(
            [
                "node",
                "polyhead_client.js",
                "--target",
                clients_server.target,
                "--task",
                "cartpole",
                "--deterministic",
                "--state",
                ",".join(map(str, state)),
            ],
            cwd=node_installed,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        assert summary["tasks"] == ["acrobot", "cartpole", "cartpole-continuous"]
        assert "task cartpole: env CartPole-v1, actions Discrete(2)" in proc.stderr
        assert summary["head_versions"] == [1]
        assert summary["return"] == summary["steps"] > 0
        assert summary["return"] == _python_return(clients_server.target, state)


@pytest.mark.service
def test_node_client_reports_unknown_task(clients_server: BackgroundServer, node_installed: Path) -> None:
    proc = subprocess.run(
        ["node", "polyhead_client.js", "--target", clients_server.target, "--task", "nope"],
        cwd=node_installed,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert "task nope is not served" in proc.stderr
