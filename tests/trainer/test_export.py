"""Export: ONNX graphs match torch, the bundle round-trips, normalisation is frozen into the trunk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from polyhead.bundle import Bundle
from polyhead.envs import task_spaces
from polyhead.errors import ExportParityError
from polyhead.spaces import SpaceSpec, raw_to_env_action
from polyhead.taskspec import load_suite
from polyhead.trainer.export import (
    _HeadOnFeaturesAndObs,
    build_random_bundle,
    check_parity,
    export_bundle,
    export_head,
    sample_observations,
)
from polyhead.trainer.policy import MultiTaskPolicy, PolicyConfig, load_policy


def _session(data: bytes | Path) -> ort.InferenceSession:
    source = str(data) if isinstance(data, Path) else data
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def _real_obs(bundle: Bundle, seed: int = 11) -> np.ndarray:
    suite = load_suite(bundle.manifest.suite)
    tasks = [suite.task(t) for t in bundle.manifest.tasks]
    return sample_observations(tasks, bundle.manifest.observation_size, steps_per_task=20, seed=seed)


def test_bundle_round_trip_matches_torch(cartpole_bundle: Bundle) -> None:
    bundle = Bundle.open(cartpole_bundle.root)
    manifest = bundle.manifest
    assert manifest.suite == "cartpole-family"
    assert set(manifest.tasks) == {t.id for t in load_suite("cartpole-family").train_tasks}
    assert set(bundle.task_ids()) == set(manifest.tasks)
    policy = load_policy(bundle)
    obs = _real_obs(bundle)
    trunk = _session(bundle.trunk_path)
    assert [i.name for i in trunk.get_inputs()] == ["obs"]
    features, obs_norm = trunk.run(["features", "obs_norm"], {"obs": obs})
    assert features.shape == (len(obs), manifest.feature_size)
    with torch.no_grad():
        t_features, t_obs_norm = policy.trunk(torch.as_tensor(obs))
    np.testing.assert_allclose(features, t_features.numpy(), atol=1e-5)
    np.testing.assert_allclose(obs_norm, t_obs_norm.numpy(), atol=1e-5)
    for task_id in manifest.tasks:
        record = bundle.head(task_id)
        assert record.version == 1
        assert record.meta.trunk_sha256 == manifest.trunk_sha256
        assert record.meta.distribution == "categorical"
        head = _session(record.read_onnx())
        feeds = {"features": features, "obs_norm": obs_norm}
        logits, value = head.run(["logits", "value"], {n: feeds[n] for n in record.meta.inputs})
        assert logits.shape == (len(obs), 2)
        assert value.shape == (len(obs),)
        expected = policy.act_deterministic(task_id, obs)
        np.testing.assert_array_equal(np.argmax(logits, axis=1), expected)
        actions = raw_to_env_action(np.argmax(logits, axis=1), record.meta.action_space)
        assert set(np.unique(actions)) <= {0, 1}


def test_dynamic_batch_axis(cartpole_bundle: Bundle) -> None:
    trunk = _session(cartpole_bundle.trunk_path)
    for batch in (1, 2, 257):
        obs = np.zeros((batch, cartpole_bundle.manifest.observation_size), np.float32)
        features, obs_norm = trunk.run(None, {"obs": obs})
        assert features.shape[0] == batch == obs_norm.shape[0]


def test_obs_normalisation_is_frozen_in_trunk(cartpole_bundle: Bundle) -> None:
    norm = cartpole_bundle.manifest.normalization
    mean, var = np.asarray(norm.mean), np.asarray(norm.var)
    assert not np.allclose(mean, 0.0)
    assert not np.allclose(var, 1.0)
    obs = _real_obs(cartpole_bundle, seed=99)
    obs[0] = 1e3  # far outside: must hit the clip
    (obs_norm,) = _session(cartpole_bundle.trunk_path).run(["obs_norm"], {"obs": obs})
    manual = np.clip((obs.astype(np.float64) - mean) / np.sqrt(var + norm.epsilon), -norm.clip, norm.clip)
    np.testing.assert_allclose(obs_norm, manual, atol=1e-4, rtol=1e-5)
    assert np.all(obs_norm[0] == norm.clip)


def test_gaussian_and_padded_heads(mixed_bundle_dir: Path) -> None:
    bundle = Bundle.open(mixed_bundle_dir)
    assert bundle.manifest.observation_size == 6  # Acrobot's 6 numbers; CartPole's 4 are zero-padded
    obs = _real_obs(bundle)
    features, obs_norm = _session(bundle.trunk_path).run(None, {"obs": obs})
    record = bundle.head("cartpole-continuous")
    assert record.meta.distribution == "gaussian"
    assert record.meta.outputs == ("mean", "log_std", "value")
    feeds = {"features": features, "obs_norm": obs_norm}
    mean, log_std, value = _session(record.read_onnx()).run(
        list(record.meta.outputs), {n: feeds[n] for n in record.meta.inputs}
    )
    assert mean.shape == log_std.shape == (len(obs), 1)
    assert value.shape == (len(obs),)
    np.testing.assert_allclose(log_std, 0.0)
    env_action = raw_to_env_action(mean, record.meta.action_space)
    assert np.all(np.abs(env_action) <= 1.0)
    acrobot = bundle.head("acrobot")
    assert acrobot.meta.action_space.n == 3  # type: ignore[union-attr]


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("critic", ["separate", "shared"])
def test_both_exporters_pass_parity(tmp_path: Path, exporter: str, critic: str) -> None:
    config = PolicyConfig(trunk_hidden=(32,), feature_size=16, head_hidden=(8,), critic=critic)  # type: ignore[arg-type]
    bundle = build_random_bundle(
        tmp_path / "b",
        suite="classic-mixed",
        task_ids=["cartpole-continuous", "acrobot"],
        config=config,
        exporter=exporter,  # type: ignore[arg-type]
    )
    assert bundle.manifest.trunk_architecture["exporter"] == exporter
    record = bundle.head("acrobot")
    expected_inputs = ("features", "obs_norm") if critic == "separate" else ("features",)
    assert record.meta.inputs == expected_inputs
    session = _session(record.read_onnx())
    assert [i.name for i in session.get_inputs()] == list(expected_inputs)


def _space(suite: str, task_id: str) -> SpaceSpec:
    return task_spaces(load_suite(suite).task(task_id))[1]


def test_parity_check_catches_a_wrong_graph() -> None:
    task = load_suite("classic-mixed").task("cartpole")
    policy = MultiTaskPolicy(PolicyConfig(), 6, {"cartpole": _space("classic-mixed", "cartpole")})
    obs = sample_observations([task], 6, steps_per_task=16)
    policy.trunk.normalizer.update(obs)
    head_bytes = export_head(policy, "cartpole", exporter="torchscript")
    with torch.no_grad():
        features, obs_norm = policy.trunk(torch.as_tensor(obs))
        policy.head("cartpole").critic[-1].bias.add_(0.5)  # the torch module drifts from the graph
    inputs = {"features": features.numpy(), "obs_norm": obs_norm.numpy()}
    with pytest.raises(ExportParityError, match="'value' differs"):
        check_parity(
            "head", _HeadOnFeaturesAndObs(policy.head("cartpole")), head_bytes, inputs, ["logits", "value"]
        )


def test_failed_parity_writes_nothing(tmp_path: Path) -> None:
    suite = load_suite("cartpole-family")
    task = suite.train_tasks[0]
    policy = MultiTaskPolicy(PolicyConfig(), 4, {task.id: _space(suite.name, task.id)})
    out = tmp_path / "never"
    with pytest.raises(ExportParityError):
        # A negative tolerance no graph can meet stands in for a broken exporter.
        export_bundle(
            policy,
            out,
            suite_name=suite.name,
            tasks=[task],
            training={},
            eval_returns={},
            parity_atol=-1.0,
            exporter="torchscript",
        )
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_round_trip_and_overwrite(tmp_path: Path) -> None:
    first = build_random_bundle(
        tmp_path / "b", task_ids=["cartpole-long-pole"], seed=1, exporter="torchscript"
    )
    policy = load_policy(first)
    state = {k: v.clone() for k, v in policy.state_dict().items()}
    with pytest.raises(Exception, match="already exists"):
        build_random_bundle(tmp_path / "b", task_ids=["cartpole-long-pole"], seed=2, exporter="torchscript")
    again = load_policy(str(first.root))
    for key, value in again.state_dict().items():
        assert torch.equal(value, state[key]), key
