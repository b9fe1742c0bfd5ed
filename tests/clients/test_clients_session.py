"""The ActStream session reports every reward exactly once (checked on the server's experience feed);
RemotePolicy drives a gymnasium vector env with one request per vector step; the asyncio client."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import numpy as np
from clients_helpers import ADMIN_TOKEN

from polyhead.clients import AdminClient, AsyncPolicyClient, PolicyClient, RemotePolicy
from polyhead.envs import make_env
from polyhead.server.app import BackgroundServer
from polyhead.tensors import from_proto


def _collect(admin_target: str, task: str, want: int, out: list[Any], ready: threading.Event) -> None:
    with AdminClient(admin_target, token=ADMIN_TOKEN, timeout=None) as admin:
        stream = admin.stream_experience([task], timeout=30)
        ready.set()
        for segment in stream:
            out.append(segment)
            if sum(1 for s in out if s.terminated or s.truncated) >= want:
                return


def test_session_reports_every_reward_exactly_once(clients_server: BackgroundServer) -> None:
    task = "acrobot"
    segments: list[Any] = []
    ready = threading.Event()
    hub = clients_server.running.hub
    subscribed_before = len(hub._subscribers)
    collector = threading.Thread(
        target=_collect,
        args=(f"127.0.0.1:{clients_server.admin_port}", task, 3, segments, ready),
        daemon=True,
    )
    collector.start()
    assert ready.wait(10)
    import time

    deadline = time.monotonic() + 30
    while (
        len(hub._subscribers) <= subscribed_before
    ):  # the subscription is registered once the call reached the server
        assert time.monotonic() < deadline, "the experience subscription never reached the server"
        time.sleep(0.01)
    sent: list[list[float]] = []
    with PolicyClient(clients_server.target) as client, client.session(task, deterministic=True) as s:
        spec = client.task(task).spec
        assert spec is not None
        env = make_env(spec)
        for episode in range(2):
            obs, _ = env.reset(seed=episode)
            rewards: list[float] = []
            reward = None
            for step in range(5 + episode):
                action = s.step(obs, reward)
                obs, _, _, _, _ = env.step(int(action))
                # Distinct rewards, so a duplicate or a loss shows in the sums and in the sequence.
                reward = float(episode * 100 + step) + 0.25
                rewards.append(reward)
            episode_return = s.end_episode(reward, terminated=False, truncated=True)
            assert episode_return == sum(rewards)
            sent.append(rewards)
        assert s.episode_returns == [sum(r) for r in sent]
        assert s.head_versions == {1}
        # Third episode, record() style; leaving the block sends the last recorded reward as final feedback.
        obs, _ = env.reset(seed=7)
        rewards = []
        for step in range(4):
            obs, *_ = env.step(int(s.step(obs)))
            rewards.append(1000.0 + step)
            s.record(rewards[-1])
        sent.append(rewards)
    assert s.episode_returns == [sum(r) for r in sent]
    collector.join(20)
    finals = [seg for seg in segments if seg.terminated or seg.truncated]
    assert len(finals) == 3
    for seg, rewards in zip(finals, sent, strict=True):
        got = from_proto(seg.rewards).tolist()
        assert got == rewards  # each reward once, in order, none missing
        assert seg.episode_length == len(rewards)
        assert seg.episode_return == sum(rewards)
        assert seg.truncated and not seg.terminated


def test_record_refuses_a_second_reward_for_the_same_action(clients_server: BackgroundServer) -> None:
    import pytest

    with PolicyClient(clients_server.target) as client, client.session("cartpole") as s:
        with pytest.raises(ValueError, match="no open episode"):
            s.record(1.0)
        s.step(np.zeros(4, np.float32))
        s.record(1.0)
        with pytest.raises(ValueError, match="already recorded"):
            s.record(2.0)
        with pytest.raises(ValueError, match="reward given twice"):
            s.step(np.zeros(4, np.float32), 2.0)
        with pytest.raises(ValueError, match="already recorded"):
            s.record(0.5, terminated=True)
        assert s.end_episode(terminated=True) == 1.0  # the recorded reward, sent once
        assert s.episode_returns == [1.0]


def test_step_with_termination_starts_a_new_episode(clients_server: BackgroundServer) -> None:
    with PolicyClient(clients_server.target) as client, client.session("cartpole") as s:
        obs = np.zeros(4, np.float32)
        s.step(obs)
        first = s.episode_id
        s.step(obs, 1.0)
        s.step(obs, 1.0, terminated=True)  # ends `first` with reward 1, then starts a new episode
        assert s.episode_id != first
        assert s.episode_returns == [2.0]


def test_remote_policy_one_request_per_vector_step(clients_server: BackgroundServer) -> None:
    import gymnasium as gym

    with PolicyClient(clients_server.target) as client:
        spec = client.task("cartpole").spec
        assert spec is not None
        envs = gym.vector.SyncVectorEnv([lambda: make_env(spec) for _ in range(4)])
        policy = RemotePolicy(client, "cartpole", deterministic=True)
        obs, _ = envs.reset(seed=0)
        for _ in range(20):
            actions = policy(obs)
            assert actions.shape == (4,) and actions.dtype == np.int64
            obs, *_ = envs.step(actions)
        envs.close()
        assert policy.calls == 20
        assert policy.versions_seen == {1}
        single = policy(np.zeros(4, np.float32))
        assert single.shape == ()


def test_box_actions_are_decoded_into_the_action_space(clients_server: BackgroundServer) -> None:
    with PolicyClient(clients_server.target) as client:
        task = client.task("cartpole-continuous")
        space = task.gymnasium_action_space()
        result = client.act(
            task.task_id,
            np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32),
            return_log_prob=True,
        )
        assert result.actions.shape == (5, 1) and result.actions.dtype == np.float32
        assert all(space.contains(a) for a in result.actions)
        assert result.log_probs is not None and result.log_probs.shape == (5,)
        assert result.raw_actions is not None


def test_async_client_act_session_and_echo(clients_server: BackgroundServer) -> None:
    async def main() -> None:
        async with AsyncPolicyClient(clients_server.target) as client:
            await client.wait_ready(5)
            catalog = await client.list_tasks()
            assert "acrobot" in catalog
            results = await asyncio.gather(
                *(client.act("acrobot", np.zeros((2, 6), np.float32), deterministic=True) for _ in range(8))
            )
            assert all(r.actions.shape == (2,) and r.head_version == 1 for r in results)
            assert await client.echo(b"ping") == b"ping"
            async with await client.session("acrobot", deterministic=True) as s:
                a0 = await s.step(np.zeros(6, np.float32))
                a1 = await s.step(np.zeros(6, np.float32), -1.0)
                assert a0 == a1  # same observation, deterministic
                assert await s.end_episode(-1.0) == -2.0

    asyncio.run(main())


def test_round_robin_over_two_replicas(
    clients_server: BackgroundServer, second_server: BackgroundServer
) -> None:
    target = f"127.0.0.1:{clients_server.port},127.0.0.1:{second_server.port}"
    servers = (clients_server, second_server)
    before = [srv.running.batcher.stats.requests for srv in servers]
    with PolicyClient(target) as client:
        assert client.config.grpc_target.startswith("ipv4:")
        assert ("grpc.lb_policy_name", "round_robin") in client.config.options()
        client.wait_ready(5)

        def served() -> list[int]:
            return [srv.running.batcher.stats.requests - b for srv, b in zip(servers, before, strict=True)]

        # wait_ready sees the first replica's connection; the second may connect a little later, after
        # which round robin alternates (pick_first would never call it).
        calls = 0
        while min(served()) < 5 and calls < 2_000:
            assert client.act("cartpole", np.zeros(4, np.float32)).head_version == 1
            calls += 1
    assert sum(served()) == calls
    assert min(served()) >= 5, f"round robin should spread the calls over both replicas, got {served()}"
