"""Constants and small helpers shared by the updater tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from polyhead.clients.policy_client import PolicyClient
from polyhead.taskspec import TaskSpec
from polyhead.trainer.adapt import AdaptConfig, default_config

#: The tasks of the test bundles (trained_bundle and random_bundle).
OLD_TASKS = ("cartpole-long-pole", "cartpole-heavy-pole")


def fixed_observations(n: int = 32, seed: int = 0) -> npt.NDArray[np.float32]:
    """CartPole-shaped observations spread over the states a policy meets."""
    rng = np.random.default_rng(seed)
    scale = np.asarray([1.0, 1.0, 0.1, 1.0], dtype=np.float32)
    return (rng.standard_normal((n, 4)).astype(np.float32) * scale).astype(np.float32)


def served_actions(target: str, tasks: tuple[str, ...]) -> dict[str, tuple[int, list[int]]]:
    """(active version, deterministic actions on fixed observations) of each task, from the server."""
    out: dict[str, tuple[int, list[int]]] = {}
    with PolicyClient(target, timeout=10.0) as client:
        for task in tasks:
            result = client.act(task, fixed_observations(), deterministic=True)
            out[task] = (result.head_version, [int(a) for a in np.asarray(result.actions).reshape(-1)])
    return out


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.2)


def remote_config(bundle: Path, task: TaskSpec, srv: Any, **overrides: Any) -> AdaptConfig:
    """An updater config that learns from ``srv``'s clients (``source="remote"``), exporting with torchscript
    (fast) and publishing every 2 updates; ``overrides`` set the rest."""
    settings: dict[str, Any] = {
        "source": "remote",
        "server": srv.target,
        "admin_target": srv.admin_target,
        "exporter": "torchscript",
        "publish_every": 2,
        "idle_timeout_s": 60.0,
        **overrides,
    }
    return default_config(bundle=bundle, task=task, **settings)
