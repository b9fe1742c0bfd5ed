"""Multi-task PPO end to end on real environments: short runs that must produce valid bundles."""

from __future__ import annotations

import math
from collections import deque
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from polyhead.bundle import Bundle
from polyhead.envs import task_spaces
from polyhead.errors import BundleError
from polyhead.taskspec import TaskSpec, load_suite
from polyhead.trainer.config import PPOConfig
from polyhead.trainer.envs import TaskEnvs
from polyhead.trainer.evaluate import evaluate
from polyhead.trainer.policy import PolicyConfig, build_policy, load_policy
from polyhead.trainer.ppo import TaskState, allocate_envs
from polyhead.trainer.train import train, train_independent

SMOKE = PPOConfig(
    total_steps=512,
    envs_per_task=2,
    num_steps=16,
    update_epochs=2,
    num_minibatches=2,
    eval_interval=10**9,
    eval_episodes=1,
    final_eval_episodes=2,
)


@pytest.mark.parametrize(
    ("suite_name", "steps"), [("cartpole-family", 512), ("classic-mixed", 384), ("minigrid", 256)]
)
def test_smoke_run_exports_a_valid_bundle(tmp_path: Path, suite_name: str, steps: int) -> None:
    suite = load_suite(suite_name)
    config = PPOConfig(**{**SMOKE.__dict__, "total_steps": steps})
    result = train(suite, tmp_path / "bundle", config=config, progress=False, exporter="torchscript")
    train_ids = [t.id for t in suite.train_tasks]
    assert result.steps >= steps
    assert set(result.eval_returns) == set(train_ids)
    assert all(math.isfinite(r) for r in result.eval_returns.values())
    bundle = Bundle.open(result.bundle)
    assert set(bundle.task_ids()) == set(train_ids)
    assert bundle.manifest.training["steps"] == result.steps
    assert (bundle.root / "logs" / "metrics.csv").is_file()
    assert (bundle.root / "logs" / "eval.csv").is_file()
    assert any(p.name.startswith("events.out.tfevents") for p in (bundle.root / "logs").iterdir())
    for task_id in train_ids:
        meta = bundle.head(task_id).meta
        assert meta.eval_return == pytest.approx(result.eval_returns[task_id])
    policy = load_policy(bundle)
    embedding = np.random.default_rng(0).normal(size=(3, bundle.manifest.embedding_size)).astype(np.float32)
    (features,) = ort.InferenceSession(str(bundle.trunk_path)).run(None, {"embedding": embedding})
    with torch.no_grad():
        expected = policy.trunk(torch.as_tensor(embedding))
    np.testing.assert_allclose(features, expected.numpy(), atol=1e-5)
    assert result.parameters == policy.parameter_count()


def test_same_seed_same_weights(tmp_path: Path) -> None:
    suite = load_suite("cartpole-family")
    tiny = PPOConfig(**{**SMOKE.__dict__, "total_steps": 160, "final_eval_episodes": 1})
    a = train(suite, tmp_path / "a", config=tiny, progress=False, exporter="torchscript")
    b = train(suite, tmp_path / "b", config=tiny, progress=False, exporter="torchscript")
    sa, sb = load_policy(Bundle.open(a.bundle)).state_dict(), load_policy(Bundle.open(b.bundle)).state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.eval_returns == b.eval_returns


def test_pcgrad_logs_the_cosine_matrix(tmp_path: Path) -> None:
    suite = load_suite("classic-mixed")
    config = PPOConfig(**{**SMOKE.__dict__, "total_steps": 192, "grad_surgery": "pcgrad"})
    result = train(suite, tmp_path / "b", config=config, progress=False, exporter="torchscript")
    assert result.grad_cosines is not None
    cos = np.asarray(result.grad_cosines)
    n = len(suite.train_tasks)
    assert cos.shape == (n, n)
    np.testing.assert_allclose(np.diag(cos), 1.0, atol=1e-3)
    np.testing.assert_allclose(cos, cos.T, atol=1e-4)
    assert np.all(np.abs(cos) <= 1.0 + 1e-4)
    rows = (result.bundle / "logs" / "grad_cosines.csv").read_text().splitlines()
    assert rows[0] == "step,task_a,task_b,cosine"
    assert len(rows) > n * n


def test_out_must_be_empty_before_training(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(BundleError, match="already exists"):
        train(load_suite("cartpole-family"), tmp_path / "taken", config=SMOKE, progress=False)


def test_gap_sampling_gives_lagging_tasks_more_envs() -> None:
    tasks = [TaskSpec(id=f"t{i}", env="CartPole-v1", target_return=500.0) for i in range(3)]
    config = PPOConfig(envs_per_task=4, task_sampling="gap")
    states = [TaskState(task=t, envs=TaskEnvs(t, 8, 4, seed=i), weight=1.0) for i, t in enumerate(tasks)]
    try:
        states[0].recent_returns = deque([500.0])  # solved
        states[1].recent_returns = deque([250.0])
        states[2].recent_returns = deque([20.0])  # far behind
        counts = [len(a) for a in allocate_envs(states, config)]
        assert sum(counts) == 12
        assert counts[0] < counts[1] < counts[2] <= 8
        assert counts[0] >= 1
        uniform = allocate_envs(states, PPOConfig(envs_per_task=4))
        assert [len(a) for a in uniform] == [4, 4, 4]
    finally:
        for s in states:
            s.envs.close()


def test_gap_sampling_run(tmp_path: Path) -> None:
    config = PPOConfig(**{**SMOKE.__dict__, "total_steps": 320, "task_sampling": "gap"})
    result = train(
        load_suite("cartpole-family"), tmp_path / "b", config=config, progress=False, exporter="torchscript"
    )
    header = (result.bundle / "logs" / "metrics.csv").read_text().splitlines()[0]
    assert "cartpole-long-pole/envs" in header


def test_independent_baseline(tmp_path: Path) -> None:
    suite = load_suite("classic-mixed")
    config = PPOConfig(**{**SMOKE.__dict__, "total_steps": 192})
    result = train_independent(suite, tmp_path / "sep", config=config, progress=False, exporter="torchscript")
    assert set(result.runs) == {t.id for t in suite.train_tasks}
    for task_id, run in result.runs.items():
        assert Bundle.open(run.bundle).task_ids() == [task_id]
    assert result.parameters == sum(r.parameters for r in result.runs.values())


def test_deterministic_evaluation_is_repeatable() -> None:
    tasks = list(load_suite("classic-mixed").train_tasks)
    torch.manual_seed(0)
    policy = build_policy(PolicyConfig(), tasks, {t.id: task_spaces(t) for t in tasks})
    first = evaluate(policy, tasks, episodes=2, seed=5)
    second = evaluate(policy, tasks, episodes=2, seed=5)
    assert first == second
    assert all(len(v) == 2 for v in first.values())


def test_an_early_stop_is_confirmed_on_the_final_evaluation_episodes(tmp_path: Path) -> None:
    # One short evaluation episode in a row can be lucky; the run may stop early only when the policy
    # also reaches the target on the 10 final-evaluation episodes, which the summary then reports.
    path = tmp_path / "easy.toml"
    path.write_text(
        '[suite]\nname = "easy"\n\n[[task]]\nid = "cartpole"\nenv = "CartPole-v1"\ntarget_return = 40\n'
    )
    config = PPOConfig(
        total_steps=40_960,
        envs_per_task=4,
        num_steps=64,
        update_epochs=4,
        eval_interval=1_024,
        eval_episodes=1,
        final_eval_episodes=10,
        solved_evals=2,
    )
    result = train(
        load_suite(path), tmp_path / "bundle", config=config, progress=False, exporter="torchscript"
    )
    assert result.steps < config.total_steps, "CartPole to 40 in 40k steps: the run should have stopped early"
    assert result.eval_returns["cartpole"] >= 40
