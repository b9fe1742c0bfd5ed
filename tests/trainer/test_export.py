"""Export: every ONNX graph (encoders, trunk, heads) matches torch, the bundle round-trips, each encoder's
normalisation is frozen into its graph, encoder groups share bytes, padded groups pad inside the graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from polyhead.bundle import Bundle
from polyhead.errors import ExportParityError, InvalidTaskSpec
from polyhead.spaces import raw_to_env_action
from polyhead.taskspec import load_suite
from polyhead.trainer.export import (
    _HeadOnFeaturesAndObs,
    build_random_bundle,
    check_parity,
    encoder_graph,
    export_bundle,
    export_encoder,
    export_head,
    sample_task_observations,
)
from polyhead.trainer.policy import MultiTaskPolicy, PolicyConfig, build_policy, load_policy


def _session(data: bytes | Path) -> ort.InferenceSession:
    source = str(data) if isinstance(data, Path) else data
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def _real_obs(bundle: Bundle, seed: int = 11) -> dict[str, np.ndarray]:
    suite = load_suite(bundle.manifest.suite)
    return sample_task_observations(
        [suite.task(t) for t in bundle.manifest.tasks], steps_per_task=20, seed=seed
    )


def _served(bundle: Bundle, task_id: str, obs: np.ndarray) -> dict[str, np.ndarray]:
    """What a server computes for one task: its encoder, the trunk, its head (straight onnxruntime)."""
    record = bundle.head(task_id)
    encoder_bytes = record.read_encoder()
    assert encoder_bytes is not None
    embedding, obs_norm = _session(encoder_bytes).run(["embedding", "obs_norm"], {"obs": obs})
    (features,) = _session(bundle.trunk_path).run(["features"], {"embedding": embedding})
    feeds = {"features": features, "obs_norm": obs_norm}
    head = _session(record.read_onnx())
    outputs = head.run(list(record.meta.outputs), {n: feeds[n] for n in record.meta.inputs})
    return {
        "embedding": embedding,
        "obs_norm": obs_norm,
        **dict(zip(record.meta.outputs, outputs, strict=True)),
    }


def test_bundle_round_trip_matches_torch(cartpole_bundle: Bundle) -> None:
    bundle = Bundle.open(cartpole_bundle.root)
    manifest = bundle.manifest
    assert manifest.suite == "cartpole-family" and manifest.format_version == 2
    assert set(manifest.tasks) == {t.id for t in load_suite("cartpole-family").train_tasks}
    assert set(bundle.task_ids()) == set(manifest.tasks)
    assert manifest.embedding_size == 64 and set(manifest.encoders) == {"cartpole"}
    assert [i.name for i in _session(bundle.trunk_path).get_inputs()] == ["embedding"]
    policy = load_policy(bundle)
    observations = _real_obs(bundle)
    for task_id in manifest.tasks:
        record = bundle.head(task_id)
        assert record.version == 1
        assert record.meta.trunk_sha256 == manifest.trunk_sha256
        assert record.meta.distribution == "categorical"
        assert record.meta.encoder["name"] == "cartpole"
        out = _served(bundle, task_id, observations[task_id])
        assert out["logits"].shape == (20, 2) and out["value"].shape == (20,)
        with torch.no_grad():
            obs = torch.as_tensor(observations[task_id])
            t_norm = policy.normalize(obs, task_id)
            t_logits = policy.head(task_id).actor(policy.features(t_norm, task_id))
        np.testing.assert_allclose(out["obs_norm"], t_norm.numpy(), atol=1e-5)
        np.testing.assert_allclose(out["logits"], t_logits.numpy(), atol=1e-5)
        expected = policy.act_deterministic(task_id, observations[task_id])
        np.testing.assert_array_equal(np.argmax(out["logits"], axis=1), expected)
        actions = raw_to_env_action(np.argmax(out["logits"], axis=1), record.meta.action_space)
        assert set(np.unique(actions)) <= {0, 1}


def test_an_encoder_group_shares_one_encoder_file(cartpole_bundle: Bundle) -> None:
    hashes = {
        bundle_task: cartpole_bundle.head(bundle_task).meta.encoder_sha256
        for bundle_task in cartpole_bundle.task_ids()
    }
    assert len(set(hashes.values())) == 1, hashes


def test_dynamic_batch_axis(cartpole_bundle: Bundle) -> None:
    record = cartpole_bundle.head(cartpole_bundle.task_ids()[0])
    encoder_bytes = record.read_encoder()
    assert encoder_bytes is not None
    encoder, trunk = _session(encoder_bytes), _session(cartpole_bundle.trunk_path)
    for batch in (1, 2, 257):
        embedding, obs_norm = encoder.run(None, {"obs": np.zeros((batch, 4), np.float32)})
        (features,) = trunk.run(None, {"embedding": embedding})
        assert features.shape == (batch, 64) and obs_norm.shape == (batch, 4)


def test_obs_normalisation_is_frozen_in_the_encoder(cartpole_bundle: Bundle) -> None:
    policy = load_policy(cartpole_bundle)
    normalizer = policy.encoder("cartpole").normalizer
    mean, var = normalizer.mean.numpy(), normalizer.var.numpy()
    assert not np.allclose(mean, 0.0)
    assert not np.allclose(var, 1.0)
    task_id = cartpole_bundle.task_ids()[0]
    obs = _real_obs(cartpole_bundle, seed=99)[task_id]
    obs[0] = 1e3  # far outside: must hit the clip
    encoder_bytes = cartpole_bundle.head(task_id).read_encoder()
    assert encoder_bytes is not None
    (obs_norm,) = _session(encoder_bytes).run(["obs_norm"], {"obs": obs})
    manual = np.clip(
        (obs.astype(np.float64) - mean) / np.sqrt(var + normalizer.epsilon), -normalizer.clip, normalizer.clip
    )
    np.testing.assert_allclose(obs_norm, manual, atol=1e-4, rtol=1e-5)
    assert np.all(obs_norm[0] == normalizer.clip)


def test_per_task_encoders_and_gaussian_heads(mixed_bundle_dir: Path) -> None:
    """classic-mixed: each env its own encoder on its own observation width; nothing is padded."""
    bundle = Bundle.open(mixed_bundle_dir)
    assert set(bundle.manifest.encoders) == {"cartpole", "acrobot", "cartpole-continuous"}
    observations = _real_obs(bundle)
    widths = {
        t: _session(bundle.head(t).read_encoder() or b"").get_inputs()[0].shape[1] for t in bundle.task_ids()
    }
    assert widths == {"cartpole": 4, "acrobot": 6, "cartpole-continuous": 4}
    record = bundle.head("cartpole-continuous")
    assert record.meta.distribution == "gaussian"
    assert record.meta.outputs == ("mean", "log_std", "value")
    out = _served(bundle, "cartpole-continuous", observations["cartpole-continuous"])
    assert out["obs_norm"].shape == (20, 4)
    assert out["mean"].shape == out["log_std"].shape == (20, 1)
    np.testing.assert_allclose(out["log_std"], 0.0)
    assert np.all(np.abs(raw_to_env_action(out["mean"], record.meta.action_space)) <= 1.0)
    assert bundle.head("acrobot").meta.action_space.n == 3  # type: ignore[union-attr]
    assert _served(bundle, "acrobot", observations["acrobot"])["obs_norm"].shape == (20, 6)


def test_padded_layout_pads_inside_the_encoder_graph(tmp_path: Path) -> None:
    """--encoders padded (the baseline): one encoder for all tasks; CartPole's graph still takes its own 4
    numbers and pads them to Acrobot's 6 inside the graph, so no server ever pads."""
    config = PolicyConfig(encoders="padded", feature_size=16, critic_hidden=(8,))
    bundle = build_random_bundle(
        tmp_path / "b",
        suite="classic-mixed",
        task_ids=["cartpole", "acrobot"],
        config=config,
        exporter="torchscript",
    )
    assert set(bundle.manifest.encoders) == {"padded"}
    out = _served(bundle, "cartpole", np.zeros((3, 4), np.float32))
    assert out["obs_norm"].shape == (3, 6)
    # The padded columns normalise like zeros of Acrobot's statistics, as the torch policy does.
    policy = load_policy(bundle)
    x = torch.zeros(3, 6)
    np.testing.assert_allclose(out["obs_norm"], policy.normalize(x, "cartpole").numpy(), atol=1e-5)


def test_cnn_encoder_exports_with_parity(tmp_path: Path) -> None:
    """minigrid: a CNN over the 7x7x3 view; onnxruntime matches torch on real observations."""
    pytest.importorskip("minigrid")
    bundle = build_random_bundle(tmp_path / "mg", suite="minigrid", seed=2, exporter="torchscript")
    assert bundle.manifest.encoders["minigrid-view"]["kind"] == "cnn"
    policy = load_policy(bundle)
    assert policy.encoder("minigrid-view").conv is not None
    task_id = "empty-random-5x5"
    obs = _real_obs(bundle)[task_id]
    out = _served(bundle, task_id, obs)
    with torch.no_grad():
        embedding = policy.embed(policy.normalize(torch.as_tensor(obs), task_id), task_id)
    np.testing.assert_allclose(out["embedding"], embedding.numpy(), atol=1e-5)
    np.testing.assert_array_equal(np.argmax(out["logits"], axis=1), policy.act_deterministic(task_id, obs))


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


def _cartpole_policy() -> tuple[MultiTaskPolicy, np.ndarray]:
    suite = load_suite("classic-mixed")
    task = suite.task("cartpole")
    from polyhead.envs import task_spaces

    policy = build_policy(PolicyConfig(), [task], {task.id: task_spaces(task)})
    obs = sample_task_observations([task], steps_per_task=16)[task.id]
    policy.update_normalizers(obs, [(task.id, len(obs))])
    return policy, obs


def test_parity_check_catches_a_wrong_head_graph() -> None:
    policy, obs = _cartpole_policy()
    head_bytes = export_head(policy, "cartpole", exporter="torchscript")
    with torch.no_grad():
        obs_norm = policy.normalize(torch.as_tensor(obs), "cartpole")
        features = policy.features(obs_norm, "cartpole")
        policy.head("cartpole").critic[-1].bias.add_(0.5)  # the torch module drifts from the graph
    inputs = {"features": features.numpy(), "obs_norm": obs_norm.numpy()}
    with pytest.raises(ExportParityError, match="'value' differs"):
        check_parity(
            "head", _HeadOnFeaturesAndObs(policy.head("cartpole")), head_bytes, inputs, ["logits", "value"]
        )


def test_parity_check_catches_a_wrong_encoder_graph() -> None:
    policy, obs = _cartpole_policy()
    encoder_bytes = export_encoder(policy, "cartpole", exporter="torchscript")
    with torch.no_grad():
        policy.encoder("cartpole").normalizer.mean.add_(0.3)  # statistics drift after the export
    with pytest.raises(ExportParityError, match=r"'(embedding|obs_norm)' differs"):
        check_parity(
            "encoder",
            encoder_graph(policy, "cartpole"),
            encoder_bytes,
            {"obs": obs},
            ["embedding", "obs_norm"],
        )


def test_failed_parity_writes_nothing(tmp_path: Path) -> None:
    suite = load_suite("cartpole-family")
    task = suite.train_tasks[0]
    from polyhead.envs import task_spaces

    policy = build_policy(PolicyConfig(), [task], {task.id: task_spaces(task)})
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


def test_a_group_of_different_widths_needs_pad(tmp_path: Path) -> None:
    suite_file = tmp_path / "bad.toml"
    suite_file.write_text(
        '[[task]]\nid = "c"\nenv = "CartPole-v1"\n[[task]]\nid = "a"\nenv = "Acrobot-v1"\n'
        '[[encoder]]\nname = "both"\ntasks = ["c", "a"]\n'
    )
    with pytest.raises(InvalidTaskSpec, match="different widths"):
        build_random_bundle(tmp_path / "b", suite=str(suite_file), exporter="torchscript")


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
