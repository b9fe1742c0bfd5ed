"""Fixtures for the online updater's tests: a short real training, real servers, real simulator clients.

* ``trained_bundle`` (session): a two-task CartPole bundle from a short real multi-task PPO run (about
  15 s): heads that balance the pole for a while, so a negated head is clearly worse and learning on a new
  task is visible. Read-only: tests adapt a ``trained_copy``.
* ``random_bundle`` (session): an untrained cartpole bundle (``build_random_bundle``) for tests that only
  need shapes and hashes.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from updater_helpers import OLD_TASKS

from polyhead.taskspec import EncoderSpec, Suite, load_suite


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def trained_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from polyhead.trainer.config import PPOConfig
    from polyhead.trainer.policy import PolicyConfig
    from polyhead.trainer.train import train

    family = load_suite("cartpole-family")
    # One encoder group, as in cartpole-family: new tasks of this space share it.
    suite = Suite(
        name="cartpole-pair",
        tasks=tuple(family.task(t) for t in OLD_TASKS),
        encoders=(EncoderSpec(name="cartpole", tasks=tuple(OLD_TASKS)),),
    )
    out = tmp_path_factory.mktemp("trained") / "bundle"
    train(
        suite,
        out,
        config=PPOConfig(
            total_steps=50_000, eval_interval=8_192, eval_episodes=3, final_eval_episodes=5, solved_evals=2
        ),
        policy_config=PolicyConfig(trunk_hidden=(32,), feature_size=32, critic_hidden=(32,)),
        progress=False,
        exporter="torchscript",
    )
    return out


@pytest.fixture
def trained_copy(trained_bundle: Path, tmp_path: Path) -> Path:
    out = tmp_path / "bundle"
    shutil.copytree(trained_bundle, out)
    return out


@pytest.fixture(scope="session")
def random_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from polyhead.trainer.export import build_random_bundle
    from polyhead.trainer.policy import PolicyConfig

    out = tmp_path_factory.mktemp("random") / "bundle"
    build_random_bundle(
        out,
        task_ids=list(OLD_TASKS),
        seed=2,
        config=PolicyConfig(trunk_hidden=(16,), feature_size=16, critic_hidden=(16,)),
        exporter="torchscript",
    )
    return out


@pytest.fixture
def random_copy(random_bundle: Path, tmp_path: Path) -> Path:
    out = tmp_path / "random-bundle"
    shutil.copytree(random_bundle, out)
    return out


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[[Path], Any]]:
    """``serve(bundle)`` starts a real BackgroundServer on free ports; every one is stopped at the end."""
    from polyhead.server.app import BackgroundServer
    from polyhead.server.settings import ServerSettings

    started: list[BackgroundServer] = []

    def start(bundle: Path, **overrides: Any) -> BackgroundServer:
        values: dict[str, Any] = {
            "bundle": bundle,
            "host": "127.0.0.1",
            "port": 0,
            "admin_port": 0,
            "metrics_port": None,
            "watch_interval_s": 0.3,
            "grace_period_s": 1.0,
        }
        values.update(overrides)
        srv = BackgroundServer(ServerSettings(**values)).start()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()
