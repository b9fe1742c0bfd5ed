"""Served actions: equal to the torch policy's, reproducible sampling, log-probs, values, batching."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from server_helpers import TASKS, act, actions_of, observations

from polyhead.bundle import Bundle
from polyhead.spaces import pad_observations, raw_to_env_action
from polyhead.tensors import from_proto, to_proto
from polyhead.v1 import policy_pb2, policy_pb2_grpc


def _torch_reference(
    bundle_dir: Path, task: str, obs: np.ndarray[Any, Any]
) -> dict[str, np.ndarray[Any, Any]]:
    from polyhead.trainer.policy import load_policy

    bundle = Bundle.open(bundle_dir)
    policy = load_policy(bundle)
    head = policy.head(task)
    x = torch.as_tensor(pad_observations(obs, policy.observation_size))  # the trainer's layout
    with torch.no_grad():
        obs_norm = policy.normalize(x, task)
        features = policy.features(obs_norm, task)
        raw = head.deterministic(features)
        dist = head.dist(features)
        return {
            "raw": raw.numpy(),
            "env": raw_to_env_action(raw.numpy(), head.action_space),
            "log_prob": head.log_prob(dist, raw).numpy(),
            "value": head.value(features, obs_norm).numpy(),
        }


@pytest.mark.parametrize("task", TASKS)
def test_deterministic_actions_equal_the_torch_policy(
    server: Any, policy_stub: Any, tiny_bundle: Path, task: str
) -> None:
    obs = observations(task, 64, seed=3)
    response = act(policy_stub, task, obs, return_log_prob=True, return_value=True)
    ref = _torch_reference(tiny_bundle, task, obs)
    assert response.head_version == 1
    served = actions_of(response)
    if task == "cartpole-continuous":
        np.testing.assert_allclose(served, ref["env"], atol=1e-5)
        np.testing.assert_allclose(from_proto(response.raw_actions), ref["raw"], atol=1e-5)
    else:
        np.testing.assert_array_equal(served, ref["env"])
    np.testing.assert_allclose(from_proto(response.log_probs), ref["log_prob"], atol=1e-4)
    np.testing.assert_allclose(from_proto(response.values), ref["value"], atol=1e-4)


def test_single_observation_gives_unbatched_outputs(policy_stub: Any) -> None:
    response = act(policy_stub, "cartpole", observations("cartpole"), return_log_prob=True, return_value=True)
    assert from_proto(response.actions).shape == ()
    assert from_proto(response.log_probs).shape == ()
    continuous = act(policy_stub, "cartpole-continuous", observations("cartpole-continuous"))
    action = from_proto(continuous.actions)
    assert action.shape == (1,)
    assert -1.0 <= float(action[0]) <= 1.0


def test_seeded_sampling_is_reproducible_and_independent_of_batch_mates(policy_stub: Any) -> None:
    obs = observations("acrobot", 32, seed=5)
    a = actions_of(act(policy_stub, "acrobot", obs, deterministic=False, seed=42))
    b = actions_of(act(policy_stub, "acrobot", obs, deterministic=False, seed=42))
    c = actions_of(act(policy_stub, "acrobot", obs, deterministic=False, seed=43))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    cont = observations("cartpole-continuous", 16)
    x = actions_of(act(policy_stub, "cartpole-continuous", cont, deterministic=False, seed=7))
    y = actions_of(act(policy_stub, "cartpole-continuous", cont, deterministic=False, seed=7))
    np.testing.assert_array_equal(x, y)
    assert np.all((x >= -1.0) & (x <= 1.0))


def test_sampled_log_probs_match_torch(policy_stub: Any, tiny_bundle: Path) -> None:
    from polyhead.trainer.policy import load_policy

    obs = observations("cartpole-continuous", 8)
    response = act(policy_stub, "cartpole-continuous", obs, deterministic=False, seed=1, return_log_prob=True)
    raw = from_proto(response.raw_actions)
    bundle = Bundle.open(tiny_bundle)
    policy = load_policy(bundle)
    head = policy.head("cartpole-continuous")
    with torch.no_grad():
        x = torch.as_tensor(obs)
        features = policy.features(policy.normalize(x, head_task := "cartpole-continuous"), head_task)
        expected = head.log_prob(head.dist(features), torch.as_tensor(raw)).numpy()
    np.testing.assert_allclose(from_proto(response.log_probs), expected, atol=1e-4)


def test_list_tasks_describes_every_task(policy_stub: Any, tiny_bundle: Path) -> None:
    response = policy_stub.ListTasks(policy_pb2.ListTasksRequest())
    assert sorted(t.task_id for t in response.tasks) == sorted(TASKS)
    assert response.trunk_sha256 == Bundle.open(tiny_bundle).manifest.trunk_sha256
    assert response.observation_size == 0  # format 2: no padded trunk input; each task has its own space
    by_space = {t.task_id: list(t.observation_space.box.shape) for t in response.tasks}
    assert by_space == {"acrobot": [6], "cartpole": [4], "cartpole-continuous": [4]}
    by_id = {t.task_id: t for t in response.tasks}
    assert by_id["acrobot"].action_space.discrete.n == 3
    assert list(by_id["cartpole-continuous"].action_space.box.shape) == [1]
    assert by_id["cartpole"].active_version == 1
    assert list(by_id["cartpole"].loaded_versions) == [1]


def test_concurrent_requests_of_mixed_tasks_share_trunk_passes(server: Any) -> None:
    import asyncio

    import grpc

    from polyhead.tensors import to_proto
    from polyhead.v1 import policy_pb2_grpc

    async def run() -> list[policy_pb2.ActResponse]:
        async with grpc.aio.insecure_channel(server.target) as ch:
            stub = policy_pb2_grpc.PolicyServiceStub(ch)
            calls = [
                stub.Act(
                    policy_pb2.ActRequest(
                        task_id=task, observations=to_proto(observations(task, 4, seed=i)), deterministic=True
                    )
                )
                for i in range(40)
                for task in TASKS
            ]
            return list(await asyncio.gather(*calls))

    before = server.running.batcher.stats
    responses = asyncio.run(run())
    after = server.running.batcher.stats
    assert len(responses) == 120
    assert after.requests - before.requests == 120
    assert after.passes - before.passes < 120  # cross-task batching happened
    # Every task has its own encoder: had no trunk pass served more than one of them, encoder runs would
    # equal trunk passes. More runs than passes means mixed-space batches, each still one trunk pass.
    assert after.encoder_runs - before.encoder_runs > after.passes - before.passes


def test_stream_steps_and_unary_calls_share_trunk_passes(server: Any) -> None:
    """ActStream steps queue in the same batcher as unary Act calls: with both in flight at once, some
    trunk pass serves a stream step and a unary call together (the batcher's per-pass counter)."""

    async def stream(stub: Any, episode: str, steps: int) -> int:
        call = stub.ActStream()
        for step in range(steps):
            await call.write(
                policy_pb2.StepRequest(
                    task_id="cartpole",
                    episode_id=episode,
                    observation=to_proto(observations("cartpole", seed=step)),
                    deterministic=True,
                )
            )
            await call.read()
        await call.done_writing()
        return steps

    async def unary(stub: Any, calls: int) -> int:
        request = policy_pb2.ActRequest(
            task_id="acrobot", observations=to_proto(observations("acrobot", 2)), deterministic=True
        )
        for _ in range(calls):
            await stub.Act(request)
        return calls

    async def run() -> list[int]:
        async with grpc.aio.insecure_channel(server.target) as ch:
            stub = policy_pb2_grpc.PolicyServiceStub(ch)
            return list(
                await asyncio.gather(
                    *(stream(stub, f"episode-{i}", 30) for i in range(8)),
                    *(unary(stub, 30) for _ in range(8)),
                )
            )

    before = server.running.batcher.stats
    assert sum(asyncio.run(run())) == 16 * 30
    after = server.running.batcher.stats
    assert after.stream_requests - before.stream_requests == 8 * 30
    assert after.requests - before.requests == 16 * 30
    assert after.mixed_passes > before.mixed_passes
