"""Fixtures for the client tests: a tiny exported bundle (Discrete and Box tasks) and real servers on
port 0, each owned by a yield fixture."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from clients_helpers import ADMIN_TOKEN

from polyhead.server.app import BackgroundServer
from polyhead.server.settings import ServerSettings


@pytest.fixture(scope="session")
def clients_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """classic-mixed: CartPole and Acrobot (Discrete) and a continuous-force CartPole (Box actions)."""
    from polyhead.trainer.export import build_random_bundle

    out = tmp_path_factory.mktemp("clients") / "bundle"
    build_random_bundle(out, suite="classic-mixed", seed=0)
    return out


def _settings(bundle: Path, **overrides: object) -> ServerSettings:
    return ServerSettings(
        bundle=bundle, host="127.0.0.1", port=0, admin_port=0, metrics_port=None, **overrides
    )


@pytest.fixture(scope="session")
def clients_server(clients_bundle: Path) -> Iterator[BackgroundServer]:
    """A real server with a separate, token-protected admin port."""
    with BackgroundServer(_settings(clients_bundle, admin_token=ADMIN_TOKEN)) as srv:
        yield srv


@pytest.fixture
def second_server(clients_bundle: Path) -> Iterator[BackgroundServer]:
    """Another replica of the same bundle (round-robin tests)."""
    with BackgroundServer(_settings(clients_bundle)) as srv:
        yield srv
