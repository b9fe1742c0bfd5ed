"""The task-relationship report: transfer matrix where action spaces allow, gradient cosines, embedding
similarity, heatmaps in the run directory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from polyhead.taskspec import load_suite
from polyhead.trainer.export import build_random_bundle
from polyhead.trainer.policy import PolicyConfig, load_policy
from polyhead.trainer.relations import RELATIONS_JSON, write_relations


def test_relations_report_matrices_and_heatmaps(tmp_path: Path) -> None:
    suite = load_suite("classic-mixed")
    tasks = [suite.task("cartpole"), suite.task("acrobot"), suite.task("cartpole-continuous")]
    bundle = build_random_bundle(
        tmp_path / "b",
        suite="classic-mixed",
        config=PolicyConfig(feature_size=16, embedding_size=16, critic_hidden=(8,)),
        exporter="torchscript",
    )
    policy = load_policy(bundle)
    cosines = np.array([[1.0, -0.2, 0.1], [-0.2, 1.0, 0.3], [0.1, 0.3, 1.0]])
    doc = write_relations(policy, tasks, tmp_path / "run", grad_cosines=cosines, episodes=1, seed=0)
    assert doc == json.loads((tmp_path / "run" / RELATIONS_JSON).read_text())
    transfer = doc["transfer"]
    # Only cartpole's own head acts in Discrete(2) on these three tasks: every other cell of its row and
    # column is n/a except the diagonal of each task.
    assert transfer[0][1] is None and transfer[1][0] is None and transfer[0][2] is None
    assert all(transfer[i][i] is not None and np.isfinite(transfer[i][i]) for i in range(3))
    assert transfer[0][0] >= 8  # CartPole pays 1 per step; an episode lasts at least ~8 steps
    similarity = np.asarray(doc["embedding_similarity"])
    np.testing.assert_allclose(np.diag(similarity), 1.0, atol=1e-4)
    assert np.all(np.abs(similarity) <= 1.0 + 1e-6)
    assert doc["grad_cosines"] == np.round(cosines, 4).tolist()
    for name in doc["plots"]:
        assert (tmp_path / "run" / name).stat().st_size > 1000
    assert len(doc["plots"]) == 3
