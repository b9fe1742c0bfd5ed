"""Fixtures for the trainer tests: real environments, real exports, real onnxruntime."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from polyhead.bundle import Bundle
from polyhead.trainer.export import build_random_bundle


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    # The machine is shared; tiny MLPs are fastest on one thread anyway.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def cartpole_bundle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bundle]:
    """An untrained, exported cartpole-family bundle (5 training heads, separate critics)."""
    return build_random_bundle(tmp_path_factory.mktemp("bundle") / "cartpole", seed=3)


@pytest.fixture(scope="module")
def mixed_bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("bundle") / "mixed"
    build_random_bundle(out, suite="classic-mixed", seed=4)
    return out
