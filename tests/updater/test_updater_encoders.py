"""Adapting a task through encoders: an unseen observation space trains an encoder of its own beside its
head against the frozen trunk, and a task of a known space shares (frozen) or copies its group's encoder.
Every old file stays byte-identical either way."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnxruntime as ort

from polyhead.bundle import Bundle
from polyhead.taskspec import load_task_spec
from polyhead.trainer.adapt import adapt, default_config

SMALL_PPO = {
    "total_steps": 2_048,
    "eval_interval": 2_048,
    "eval_episodes": 1,
    "final_eval_episodes": 1,
    "num_steps": 128,
}


def _files(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_an_unseen_observation_space_gets_its_own_encoder_and_nothing_old_changes(random_copy: Path) -> None:
    """Acrobot (6 observations, 3 actions) on a CartPole trunk: no old encoder reads its observations."""
    task = load_task_spec("classic-mixed:acrobot-heavy")
    before = _files(random_copy)
    trunk_before = Bundle.open(random_copy).manifest.trunk_sha256
    result = adapt(
        default_config(
            bundle=random_copy,
            task=task,
            init="scratch",
            exporter="torchscript",
            zero_shot_episodes=1,
            ppo=SMALL_PPO,
            progress=False,
        )
    )
    after = _files(random_copy)
    # Every file that existed is byte-identical; the only new files are the new task's.
    assert {f: after[f] for f in before} == before
    assert all(f.startswith(f"heads/{task.id}/") for f in set(after) - set(before))
    assert result.trunk_sha256_before == result.trunk_sha256_after == trunk_before
    assert result.trunk_state_sha256_before == result.trunk_state_sha256_after
    assert result.zero_shot.returns == {}  # no old head acts in Discrete(3) on 6 observations

    bundle = Bundle.open(random_copy)
    record = bundle.head(task.id)
    assert record.meta.encoder["name"] == task.id and record.meta.observation_size == 6
    old_encoders = {bundle.head(t).meta.encoder_sha256 for t in bundle.task_ids() if t != task.id}
    assert record.meta.encoder_sha256 not in old_encoders
    encoder_bytes = record.read_encoder()
    assert encoder_bytes is not None
    encoder = ort.InferenceSession(encoder_bytes, providers=["CPUExecutionProvider"])
    embedding, obs_norm = encoder.run(None, {"obs": np.zeros((2, 6), np.float32)})
    assert embedding.shape == (2, bundle.manifest.embedding_size) and obs_norm.shape == (2, 6)


def test_a_known_space_shares_or_copies_its_groups_encoder(random_copy: Path, tmp_path: Path) -> None:
    """--encoder share publishes the group's encoder bytes unchanged; --encoder copy trains a copy."""
    import shutil

    copy_dir = tmp_path / "copy-bundle"
    shutil.copytree(random_copy, copy_dir)
    task = load_task_spec("cartpole-family:cartpole-reversed")
    shared_sha = {}
    for mode, root in (("share", random_copy), ("copy", copy_dir)):
        before = _files(root)
        adapt(
            default_config(
                bundle=root,
                task=task,
                init="scratch",
                encoder=mode,
                exporter="torchscript",
                zero_shot_episodes=1,
                ppo=SMALL_PPO,
                progress=False,
            )
        )
        after = _files(root)
        assert {f: after[f] for f in before} == before, mode
        bundle = Bundle.open(root)
        old = {bundle.head(t).meta.encoder_sha256 for t in bundle.task_ids() if t != task.id}
        shared_sha[mode] = bundle.head(task.id).meta.encoder_sha256
        if mode == "share":
            assert shared_sha[mode] in old  # the very bytes the old task serves: one session on a server
        else:
            assert shared_sha[mode] not in old  # trained away from the group's
