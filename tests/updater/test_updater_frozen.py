"""The trunk is frozen: head-only updates leave every trunk tensor (normaliser included) bit-identical,
and a whole adaptation leaves trunk.onnx, trunk.pt and the other heads' files byte-identical."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import numpy as np
import torch
from updater_helpers import OLD_TASKS

from polyhead.bundle import Bundle
from polyhead.taskspec import load_task_spec
from polyhead.trainer.adapt import adapt, default_config
from polyhead.trainer.envs import TaskEnvs
from polyhead.trainer.policy import load_policy
from polyhead.trainer.ppo import TaskState
from polyhead.trainer.updater.frozen import freeze_trunk, trunk_state_sha256
from polyhead.trainer.updater.head_ppo import HeadLearner, collect_head_rollout
from polyhead.trainer.updater.metrics import UpdaterMetrics


def _file_hashes(root: Path) -> dict[str, str]:
    files = [root / "trunk.onnx", root / "trunk.pt", root / "manifest.json"]
    for task in OLD_TASKS:
        files.extend(p for p in sorted((root / "heads" / task).rglob("*")) if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_head_only_updates_leave_every_trunk_tensor_bit_identical(random_bundle: Path) -> None:
    policy = load_policy(random_bundle)
    task = load_task_spec("cartpole-family:cartpole-reversed")
    freeze_trunk(policy)
    head = policy.add_head(task.id, policy.action_spaces[OLD_TASKS[0]])
    trunk_before = copy.deepcopy(policy.trunk.state_dict())
    encoder_count_before = policy.encoder_of(task.id).normalizer.count.item()
    others_before = {t: copy.deepcopy(policy.head(t).state_dict()) for t in OLD_TASKS}
    head_before = copy.deepcopy(head.state_dict())
    hash_before = trunk_state_sha256(policy)

    from polyhead.trainer.adapt import ADAPT_PPO

    ppo = ADAPT_PPO
    learner = HeadLearner(policy, task.id, ppo, seed=0)
    envs = TaskEnvs(task, ppo.envs_per_task, policy.observation_size, seed=0)
    state = TaskState(task=task, envs=envs, weight=1.0)
    try:
        for _ in range(3):
            learner.update(collect_head_rollout(policy, state, ppo))
    finally:
        envs.close()

    for name, tensor in policy.trunk.state_dict().items():
        assert torch.equal(tensor, trunk_before[name]), f"trunk tensor {name} changed"
    normalizer = policy.encoder_of(task.id).normalizer  # the group's, shared with the old tasks
    assert normalizer.count.item() == encoder_count_before
    assert trunk_state_sha256(policy) == hash_before
    for t in OLD_TASKS:
        for name, tensor in policy.head(t).state_dict().items():
            assert torch.equal(tensor, others_before[t][name]), f"head {t} tensor {name} changed"
    trained = not all(torch.equal(v, head_before[k]) for k, v in head.state_dict().items())
    assert trained, "the new head did not change"
    assert all(not p.requires_grad for p in policy.trunk.parameters())


def test_adaptation_keeps_trunk_and_other_heads_byte_identical(random_copy: Path) -> None:
    files_before = _file_hashes(random_copy)
    trunk_before = load_policy(random_copy).trunk.state_dict()
    config = default_config(
        bundle=random_copy,
        task=load_task_spec("cartpole-family:cartpole-short-heavy"),
        init="scratch",
        exporter="torchscript",
        zero_shot_episodes=2,
        ppo={"total_steps": 1024, "eval_interval": 1024, "eval_episodes": 2, "solved_evals": 0},
    )
    result = adapt(config, metrics=UpdaterMetrics())

    manifest_sha = Bundle.open(random_copy).manifest.trunk_sha256
    assert result.trunk_sha256_before == result.trunk_sha256_after == manifest_sha
    assert result.trunk_state_sha256_before == result.trunk_state_sha256_after
    assert _file_hashes(random_copy) == files_before
    trunk_after = load_policy(random_copy).trunk.state_dict()
    for name, tensor in trunk_after.items():
        assert torch.equal(tensor, trunk_before[name])
    assert np.isfinite(result.final_eval_return)
    assert Bundle.open(random_copy).versions("cartpole-short-heavy") == [1]
