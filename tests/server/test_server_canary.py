"""Canary versions against a real server: the share over 10,000 episodes, stickiness per episode, the
admin paths (set, change, promote, clear, refusals), ListTasks / ListHeads, per-version metrics, and the
live-return monitor marking a task regressed."""

from __future__ import annotations

import queue
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from server_helpers import act, new_head_version, observations

from polyhead.clients.admin import AdminClient
from polyhead.clients.errors import InvalidRequest, PreconditionFailed, TaskNotFound
from polyhead.server.app import BackgroundServer
from polyhead.server.registry import canary_bucket
from polyhead.tensors import to_proto
from polyhead.v1 import policy_pb2, policy_pb2_grpc

TASK = "cartpole"


@pytest.fixture
def canary_server(server_settings: Any, tiny_bundle: Path) -> Iterator[tuple[Any, AdminClient, Any]]:
    """A real server with a staged version 2 of cartpole; (server, admin client, policy stub)."""
    with (
        BackgroundServer(server_settings(max_open_episodes=50_000)) as srv,
        AdminClient(srv.admin_target) as admin,
        grpc.insecure_channel(srv.target) as channel,
    ):
        onnx, head_json = new_head_version(tiny_bundle, TASK)
        loaded = admin.load_head(TASK, onnx=onnx, head_json=head_json, activate=False)
        assert (loaded.head.version, loaded.active_version) == (2, 1)
        yield srv, admin, policy_pb2_grpc.PolicyServiceStub(channel)


def _act_episodes(stub: Any, ids: list[str], **fields: Any) -> list[int]:
    """Act calls of 200 observations, one per episode id; the version that acted for each row."""
    versions: list[int] = []
    for start in range(0, len(ids), 200):
        chunk = ids[start : start + 200]
        response = act(stub, TASK, observations(TASK, len(chunk), seed=start), episode_ids=chunk, **fields)
        assert len(response.head_versions) == len(chunk)
        if len(set(response.head_versions)) == 1:
            assert response.head_version == response.head_versions[0]
        else:
            assert response.head_version == 0  # served by both versions
        versions += response.head_versions
    return versions


def test_canary_share_within_3_percent_over_10000_episodes_and_sticky(canary_server: Any) -> None:
    _, admin, stub = canary_server
    state = admin.set_canary(TASK, 2, 25.0)
    assert (state.stable_version, state.canary_version, state.canary_percent) == (1, 2, 25.0)
    ids = [f"episode-{i}" for i in range(10_000)]
    first = _act_episodes(stub, ids)
    share = first.count(2) / len(first)
    assert abs(share - 0.25) <= 0.03, share
    assert set(first) == {1, 2}
    # Sticky: the same episodes' next steps (in other batches, other orders) act on the same version.
    order = np.random.default_rng(0).permutation(2_000)
    again = _act_episodes(stub, [ids[i] for i in order])
    assert again == [first[i] for i in order]
    # The routing is a hash every replica computes alike, not this server's state.
    assert [2 if canary_bucket(TASK, i) < 2500 else 1 for i in ids[:500]] == first[:500]


def test_widening_the_share_moves_no_running_episode(canary_server: Any) -> None:
    _, admin, stub = canary_server
    admin.set_canary(TASK, 2, 10.0)
    ids = [f"w-{i}" for i in range(1_000)]
    before = _act_episodes(stub, ids)
    admin.set_canary(TASK, 2, 60.0)
    after = _act_episodes(stub, ids)
    assert after == before  # open episodes keep their version
    fresh = _act_episodes(stub, [f"new-{i}" for i in range(1_000)])
    assert 0.55 <= fresh.count(2) / len(fresh) <= 0.65  # new episodes see the wider share

    # ActStream: one episode, many steps, one version, even when the share flips against it midway.
    # Lockstep: each request waits for the previous response, so the flip follows what the episode got.
    answered: queue.Queue[int] = queue.Queue()

    def steps() -> Iterator[policy_pb2.StepRequest]:
        first = 0
        for k in range(20):
            if k:
                version = answered.get(timeout=30)
                first = first or version
            if k == 10:
                admin.set_canary(TASK, 2, 0.5 if first == 2 else 99.5)
            yield policy_pb2.StepRequest(
                task_id=TASK, episode_id="stream-1", observation=to_proto(observations(TASK, seed=k))
            )

    versions: list[int] = []
    for response in stub.ActStream(steps()):
        versions.append(response.head_version)
        answered.put(response.head_version)
    assert len(versions) == 20 and len(set(versions)) == 1


def test_requests_without_episode_id_are_routed_per_request(canary_server: Any) -> None:
    _, admin, stub = canary_server
    admin.set_canary(TASK, 2, 30.0)
    versions = [act(stub, TASK, observations(TASK, seed=i)).head_version for i in range(1_500)]
    assert abs(versions.count(2) / len(versions) - 0.30) <= 0.05
    # A client may still ask for a specific version.
    assert {act(stub, TASK, observations(TASK), version=1).head_version for _ in range(50)} == {1}
    assert {act(stub, TASK, observations(TASK), version=2).head_version for _ in range(50)} == {2}


def test_admin_paths_set_change_promote_clear_and_refusals(canary_server: Any, tiny_bundle: Path) -> None:
    srv, admin, stub = canary_server
    with pytest.raises(PreconditionFailed, match="stable version"):
        admin.set_canary(TASK, 1, 10.0)
    with pytest.raises(TaskNotFound, match="no loaded version 7"):
        admin.set_canary(TASK, 7, 10.0)
    with pytest.raises(InvalidRequest, match=r"0\.\.100"):
        admin.set_canary(TASK, 2, 150.0)
    with pytest.raises(PreconditionFailed, match="no canary"):
        admin.promote_canary(TASK)
    admin.set_canary(TASK, 2, 5.0)
    admin.set_canary(TASK, 2, 20.0)  # change the share
    tasks = {t.task_id: t for t in stub.ListTasks(policy_pb2.ListTasksRequest()).tasks}
    assert (tasks[TASK].active_version, tasks[TASK].canary_version, tasks[TASK].canary_percent) == (
        1,
        2,
        20.0,
    )
    assert tasks["acrobot"].canary_version == 0
    heads = {h.version: h for h in admin.list_heads(TASK)}
    assert heads[2].canary and heads[2].canary_percent == 20.0 and not heads[2].active
    assert heads[1].active and not heads[1].canary
    with pytest.raises(PreconditionFailed, match="canary"):
        admin.unload_head(TASK, 2)
    with pytest.raises(PreconditionFailed, match="not version 5"):
        admin.promote_canary(TASK, 5)
    scrape = _scrape(srv.metrics_port)
    assert f'polyhead_canary_version{{task="{TASK}"}} 2.0' in scrape
    assert f'polyhead_canary_percent{{task="{TASK}"}} 20.0' in scrape
    swap = admin.promote_canary(TASK, 2)
    assert (swap.previous_version, swap.active_version) == (1, 2)
    tasks = {t.task_id: t for t in stub.ListTasks(policy_pb2.ListTasksRequest()).tasks}
    assert (tasks[TASK].active_version, tasks[TASK].canary_version) == (2, 0)
    assert {act(stub, TASK, observations(TASK, seed=i)).head_version for i in range(30)} == {2}
    # Back to 1 as canary, then cleared: all traffic on stable 2 again, version 1 still loaded.
    admin.set_canary(TASK, 1, 50.0)
    cleared = admin.clear_canary(TASK)
    assert (cleared.cleared_version, cleared.canary_version, cleared.stable_version) == (1, 0, 2)
    assert admin.clear_canary(TASK).cleared_version == 0
    assert {act(stub, TASK, observations(TASK, seed=i)).head_version for i in range(30)} == {2}
    assert admin.versions(TASK) == ([1, 2], 2)
    # LoadHead can stage a new version straight into the canary slot; activating the canary promotes it.
    onnx, head_json = new_head_version(tiny_bundle, TASK, seed=5)
    loaded = admin.load_head(TASK, onnx=onnx, head_json=head_json, activate=False, canary_percent=10.0)
    assert loaded.head.canary and loaded.head.canary_percent == 10.0
    admin.set_active_version(TASK, loaded.head.version)
    heads = {h.version: h for h in admin.list_heads(TASK)}
    assert heads[loaded.head.version].active and not any(h.canary for h in heads.values())


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text: str = response.read().decode()
    return text


def _episode(stub: Any, episode_id: str, length: int, reward: float = 1.0) -> list[int]:
    """One ActStream episode of ``length`` steps, ``reward`` each; the versions that acted."""

    def steps() -> Iterator[policy_pb2.StepRequest]:
        for k in range(length):
            feedback = policy_pb2.Feedback(reward=reward) if k else None
            yield policy_pb2.StepRequest(
                task_id=TASK,
                episode_id=episode_id,
                observation=to_proto(observations(TASK, seed=k)),
                feedback=feedback,
            )
        yield policy_pb2.StepRequest(
            task_id=TASK, episode_id=episode_id, feedback=policy_pb2.Feedback(reward=reward, terminated=True)
        )

    return [r.head_version for r in stub.ActStream(steps()) if r.step >= 0]


def test_per_version_returns_and_latency_in_metrics(canary_server: Any) -> None:
    srv, admin, stub = canary_server
    admin.set_canary(TASK, 2, 50.0)
    by_version: dict[int, list[int]] = {1: [], 2: []}
    for i in range(40):
        versions = _episode(stub, f"m-{i}", 5, reward=2.0)
        assert len(set(versions)) == 1
        by_version[versions[0]].append(i)
    scrape = _scrape(srv.metrics_port)
    for version, episodes in by_version.items():
        assert episodes
        count = (
            f'polyhead_version_episode_return_count{{task="{TASK}",version="{version}"}} {len(episodes)}.0'
        )
        total = (
            f'polyhead_version_episode_return_sum{{task="{TASK}",version="{version}"}} {10.0 * len(episodes)}'
        )
        assert count in scrape and total in scrape
        assert f'polyhead_version_act_seconds_count{{task="{TASK}",version="{version}"}}' in scrape


def test_monitor_marks_a_task_regressed_on_a_live_drop(server_settings: Any) -> None:
    settings = server_settings(
        regression_window=8, regression_reference_episodes=16, regression_alpha=0.01, regression_margin=0.2
    )
    rng = np.random.default_rng(3)
    with BackgroundServer(settings) as srv, grpc.insecure_channel(srv.target) as channel:
        stub = policy_pb2_grpc.PolicyServiceStub(channel)

        def listed() -> Any:
            return {t.task_id: t for t in stub.ListTasks(policy_pb2.ListTasksRequest()).tasks}[TASK]

        # Stationary: 48 episodes of 16-24 steps (the tiny bundle has no eval return: the first block
        # starts the reference). No alarm.
        for i in range(48):
            _episode(stub, f"s-{i}", int(rng.integers(16, 25)))
        assert not listed().regressed
        assert 'polyhead_task_regressed{task="cartpole"} 0.0' in _scrape(srv.metrics_port)
        # The environment changes: episodes of 3-6 steps. One block of 8 is enough to detect it.
        for i in range(8):
            _episode(stub, f"d-{i}", int(rng.integers(3, 7)))
        info = listed()
        assert info.regressed, info.regression_detail
        assert "p=" in info.regression_detail
        scrape = _scrape(srv.metrics_port)
        assert 'polyhead_task_regressed{task="cartpole"} 1.0' in scrape
        assert 'polyhead_regression_events_total{kind="regressed",task="cartpole"} 1.0' in scrape
        assert 'polyhead_task_regressed{task="acrobot"} 0.0' in scrape
