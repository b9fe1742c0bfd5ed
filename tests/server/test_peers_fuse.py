"""The peer benchmark's fused model (benchmarks/peers/fuse.py) computes what polyhead serves, for both
bundle formats: the comparison with MLServer and Ray Serve is only fair while it does (it silently broke
once, when bundles gained per-task encoders)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from server_helpers import act, actions_of, observations

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "peers"))
from fuse import fuse, run_fused

FIXTURES = Path(__file__).parent.parent / "fixtures"


@pytest.mark.parametrize("task", ["cartpole", "acrobot"])
def test_fused_format_2_model_acts_like_the_server(
    server: Any, policy_stub: Any, tiny_bundle: Path, task: str
) -> None:
    model, width = fuse(tiny_bundle, task)
    obs = observations(task, 256, seed=5)
    assert width == obs.shape[1]
    served = actions_of(act(policy_stub, task, obs))
    fused = run_fused(model, obs)
    assert len(set(fused.tolist())) > 1  # a constant policy would make the comparison vacuous
    np.testing.assert_array_equal(fused, served)


def test_fused_format_1_model_acts_as_recorded() -> None:
    """The checked-in format-1 bundle (padded trunk, no encoders): the actions recorded beside it."""
    expected = json.loads((FIXTURES / "bundle_v1_expected.json").read_text())
    obs = np.asarray(expected["observations"], np.float32)
    for task, actions in expected["actions"].items():
        model, _ = fuse(FIXTURES / "bundle_v1", task)
        np.testing.assert_array_equal(run_fused(model, obs), actions)


def test_a_continuous_head_is_refused(tiny_bundle: Path) -> None:
    with pytest.raises(ValueError, match="only categorical heads can be fused"):
        fuse(tiny_bundle, "cartpole-continuous")
