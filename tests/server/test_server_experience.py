"""Experience: ActStream feedback and ReportExperience assembled per episode, StreamExperience feed,
bounded memory (expiry, eviction)."""

from __future__ import annotations

import queue
import threading
from typing import Any

import grpc
import numpy as np
from prometheus_client import CollectorRegistry
from server_helpers import act, observations

from polyhead.server.experience import ExperienceHub
from polyhead.server.metrics import ServerMetrics
from polyhead.tensors import from_proto, to_proto
from polyhead.v1 import admin_pb2, admin_pb2_grpc, policy_pb2


def _subscribe(server: Any, task_ids: list[str]) -> tuple[queue.Queue[Any], Any]:
    """Collect StreamExperience segments in a background thread; returns (queue, call)."""
    channel = grpc.insecure_channel(server.admin_target)
    call = admin_pb2_grpc.HeadAdminStub(channel).StreamExperience(
        admin_pb2.StreamExperienceRequest(task_ids=task_ids)
    )
    out: queue.Queue[Any] = queue.Queue()

    def pump() -> None:
        try:
            for segment in call:
                out.put(segment)
        except grpc.RpcError:
            pass

    threading.Thread(target=pump, daemon=True).start()
    hub = server.running.hub
    import time

    deadline = time.monotonic() + 5
    while not hub._subscribers:  # the subscription is registered once the call reached the server
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return out, call


def test_act_stream_episode_reaches_the_experience_feed(server: Any, policy_stub: Any) -> None:
    segments, call = _subscribe(server, ["cartpole"])
    obs = [observations("cartpole", seed=i) for i in range(4)]
    requests = [
        policy_pb2.StepRequest(
            task_id="cartpole",
            episode_id="ep-1",
            observation=to_proto(obs[0]),
            deterministic=False,
            seed=1,
            return_log_prob=True,
        ),
        *[
            policy_pb2.StepRequest(
                task_id="cartpole",
                episode_id="ep-1",
                observation=to_proto(obs[i]),
                feedback=policy_pb2.Feedback(reward=float(i)),
                deterministic=False,
                seed=1,
                return_log_prob=True,
            )
            for i in range(1, 4)
        ],
        policy_pb2.StepRequest(
            task_id="cartpole", episode_id="ep-1", feedback=policy_pb2.Feedback(reward=10.0, terminated=True)
        ),
    ]
    responses = list(policy_stub.ActStream(iter(requests)))
    assert [r.step for r in responses[:4]] == [0, 1, 2, 3]
    assert all(r.head_version == 1 for r in responses)
    assert not responses[4].HasField("action")
    segment = segments.get(timeout=10)
    call.cancel()
    assert segment.task_id == "cartpole"
    assert segment.episode_id == "ep-1"
    assert segment.terminated
    assert segment.start_step == 0
    np.testing.assert_allclose(from_proto(segment.rewards), [1.0, 2.0, 3.0, 10.0])
    np.testing.assert_allclose(from_proto(segment.observations), np.stack(obs), atol=1e-6)
    np.testing.assert_array_equal(
        from_proto(segment.actions), [int(from_proto(r.action)) for r in responses[:4]]
    )
    np.testing.assert_allclose(
        from_proto(segment.log_probs), [float(from_proto(r.log_prob)) for r in responses[:4]], atol=1e-6
    )
    assert list(segment.head_versions) == [1, 1, 1, 1]
    assert segment.episode_return == 16.0
    assert segment.episode_length == 4


def test_report_experience_joins_rewards_with_served_actions(server: Any, policy_stub: Any) -> None:
    segments, call = _subscribe(server, [])
    obs = observations("acrobot", 2)
    act(policy_stub, "acrobot", obs, episode_ids=["a", "b"])
    act(policy_stub, "acrobot", obs, episode_ids=["a", "b"])
    reports = [
        policy_pb2.ExperienceReport(task_id="acrobot", episode_id="a", reward=-1.0),
        policy_pb2.ExperienceReport(task_id="acrobot", episode_id="b", reward=-1.0, truncated=True),
        policy_pb2.ExperienceReport(task_id="acrobot", episode_id="unknown", reward=5.0),
    ]
    # Each episode got a second action before the first one's reward arrived (a client reporting on its
    # own stream can be a step behind): the rewards join the actions in the order they were served. "b"
    # ends after its first reward, so its second action never gets one (missing_reward, counted); the
    # report for an unknown episode is dropped.
    summary = policy_stub.ReportExperience(iter(reports))
    assert summary.accepted == 2
    assert summary.dropped == 1
    assert summary.episodes_completed == 1
    segment = segments.get(timeout=10)
    call.cancel()
    assert segment.episode_id == "b"
    assert segment.truncated
    assert not segment.terminated
    assert segment.start_step == 0
    assert from_proto(segment.rewards).tolist() == [-1.0]
    np.testing.assert_allclose(from_proto(segment.observations), obs[1:2], atol=1e-6)
    dropped = server.running.metrics.experience_dropped
    assert dropped.labels(task="acrobot", reason="missing_reward")._value.get() == 1
    assert dropped.labels(task="acrobot", reason="unknown_episode")._value.get() == 1


def test_late_reports_join_actions_in_served_order(server: Any, policy_stub: Any) -> None:
    segments, call = _subscribe(server, ["cartpole"])
    obs = [observations("cartpole", seed=i) for i in range(3)]
    responses = [act(policy_stub, "cartpole", o, episode_ids=["late"]) for o in obs]
    # Every report arrives after all three actions were served.
    reports = [
        policy_pb2.ExperienceReport(
            task_id="cartpole", episode_id="late", reward=float(i + 1), terminated=i == 2
        )
        for i in range(3)
    ]
    summary = policy_stub.ReportExperience(iter(reports))
    assert (summary.accepted, summary.dropped, summary.episodes_completed) == (3, 0, 1)
    segment = segments.get(timeout=10)
    call.cancel()
    assert segment.terminated and segment.start_step == 0 and segment.episode_length == 3
    assert from_proto(segment.rewards).tolist() == [1.0, 2.0, 3.0]
    np.testing.assert_allclose(from_proto(segment.observations), np.stack(obs), atol=1e-6)
    np.testing.assert_array_equal(
        from_proto(segment.actions), [int(from_proto(r.actions)) for r in responses]
    )


def test_full_transitions_from_clients_acting_elsewhere(server: Any, policy_stub: Any) -> None:
    segments, call = _subscribe(server, ["cartpole-continuous"])
    reports = [
        policy_pb2.ExperienceReport(
            task_id="cartpole-continuous",
            episode_id="x",
            reward=1.0,
            terminated=i == 2,
            observation=to_proto(observations("cartpole-continuous", seed=i)),
            action=to_proto(np.array([0.5], np.float32)),
            log_prob=-1.0,
            head_version=1,
        )
        for i in range(3)
    ]
    summary = policy_stub.ReportExperience(iter(reports))
    assert (summary.accepted, summary.episodes_completed) == (3, 1)
    segment = segments.get(timeout=10)
    call.cancel()
    assert from_proto(segment.observations).shape == (3, 4)
    assert from_proto(segment.actions).shape == (3, 1)
    assert segment.episode_return == 3.0


def _hub(**kw: Any) -> tuple[ExperienceHub, list[float]]:
    clock = [0.0]
    defaults = {"ttl_s": 10.0, "max_open_episodes": 100, "max_segment_steps": 4, "subscriber_queue_size": 2}
    hub = ExperienceHub(ServerMetrics(CollectorRegistry()), clock=lambda: clock[0], **{**defaults, **kw})
    return hub, clock


def test_hub_memory_is_bounded() -> None:
    hub, clock = _hub(max_open_episodes=3)
    obs = np.zeros(4, np.float32)
    for i in range(5):
        hub.record_action("t", f"e{i}", obs=obs, action=np.int64(0), log_prob=0.0, version=1)
    assert hub.open_episodes == 3  # the two least recently used were evicted
    clock[0] = 11.0
    hub.record_action("t", "fresh", obs=obs, action=np.int64(0), log_prob=0.0, version=1)
    assert hub.open_episodes == 1  # idle episodes expired


def test_long_episodes_are_published_in_segments_and_slow_subscribers_lose_segments() -> None:
    import asyncio

    async def run() -> tuple[list[Any], int]:
        hub, _ = _hub()
        sub = hub.subscribe(["t"])
        obs = np.zeros(4, np.float32)
        for step in range(10):
            hub.record_action(
                "t", "long", obs=obs + step, action=np.int64(step % 2), log_prob=-0.5, version=1
            )
            hub.report("t", "long", reward=1.0, terminated=step == 9, truncated=False)
        got = []
        while not sub.queue.empty():
            got.append(sub.queue.get_nowait())
        return got, hub.open_episodes

    got, open_episodes = asyncio.run(run())
    assert open_episodes == 0
    # 10 steps in segments of 4: [0-3], [4-7], [8-9]; the queue holds 2, so the last segment was dropped.
    assert [s.start_step for s in got] == [0, 4]
    assert got[0].next_observation is not None
    assert float(got[0].next_observation[0]) == 4.0
