"""Experience: ActStream feedback and ReportExperience assembled per episode, StreamExperience feed,
bounded memory (expiry, eviction)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from server_helpers import act, observations

from polyhead.server.experience import ExperienceHub
from polyhead.server.metrics import ServerMetrics
from polyhead.tensors import from_proto, to_proto
from polyhead.v1 import admin_pb2, admin_pb2_grpc, policy_pb2, policy_pb2_grpc


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
    assert dropped.labels(task="acrobot", reason="missing_reward").value == 1
    assert dropped.labels(task="acrobot", reason="unknown_episode").value == 1


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


# --- the edge: poisoned experience is refused, counted, and never reaches the feed -----------------------
def _transition(task: str, **fields: Any) -> policy_pb2.ExperienceReport:
    """A valid full transition of ``task`` with ``fields`` overridden."""
    values: dict[str, Any] = {
        "task_id": task,
        "episode_id": "poison",
        "reward": 1.0,
        "observation": to_proto(observations(task)),
        "action": to_proto(np.int64(1) if task != "cartpole-continuous" else np.array([0.5], np.float32)),
        "log_prob": -0.7,
        "head_version": 1,
    }
    values.update(fields)
    return policy_pb2.ExperienceReport(**values)


POISON = [
    # (reason label, field named in the message, the report)
    ("invalid_reward", "reward", _transition("cartpole", reward=float("nan"))),
    ("invalid_reward", "reward", _transition("cartpole", reward=float("inf"))),
    ("invalid_reward", "reward", _transition("cartpole", reward=1e30)),
    ("invalid_action", "action", _transition("cartpole", action=to_proto(np.int64(2)))),
    ("invalid_action", "action", _transition("cartpole", action=to_proto(np.int64(-1)))),
    ("invalid_action", "action", _transition("cartpole", action=to_proto(np.float32(0.5)))),
    (
        "invalid_action",
        "action",
        _transition("cartpole-continuous", action=to_proto(np.array([np.nan], np.float32))),
    ),
    (
        "invalid_action",
        "action",
        _transition("cartpole-continuous", action=to_proto(np.zeros(3, np.float32))),
    ),
    ("invalid_log_prob", "log_prob", _transition("cartpole", log_prob=float("nan"))),
    ("invalid_log_prob", "log_prob", _transition("cartpole", log_prob=0.5)),
    ("unknown_version", "head_version", _transition("cartpole", head_version=99)),
    ("unknown_version", "head_version", _transition("cartpole", head_version=0)),
    (
        "invalid_observation",
        "observation",
        _transition("cartpole", observation=to_proto(np.full(4, np.nan, np.float32))),
    ),
    (
        "invalid_observation",
        "observation",
        _transition("cartpole", observation=to_proto(np.zeros(5, np.float32))),
    ),
    (
        "invalid_observation",
        "final_observation",
        _transition("cartpole", truncated=True, final_observation=to_proto(np.zeros(3, np.float32))),
    ),
    ("invalid_step", "step", _transition("cartpole", step=-1)),
]


def _refused(call: Callable[[], Any]) -> str:
    """Run ``call``; it must fail with INVALID_ARGUMENT. Returns the status details."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error: Any = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    return str(error.details())


def test_poisoned_reports_are_refused_counted_and_never_reach_the_feed(server: Any, policy_stub: Any) -> None:
    segments, call = _subscribe(server, [])
    dropped = server.running.metrics.experience_dropped
    for reason, field, report in POISON:
        before = dropped.labels(task=report.task_id, reason=reason).value
        # Each poisoned report ends an episode, so were it accepted a segment would reach the feed.
        report.terminated = not report.truncated
        details = _refused(lambda r=report: policy_stub.ReportExperience(iter([r]), timeout=10))
        assert field in details and "expected" in details, (field, details)
        assert dropped.labels(task=report.task_id, reason=reason).value == before + 1, reason
    # Reward-only reports and ActStream feedback are checked the same way.
    act(policy_stub, "acrobot", observations("acrobot"), episode_ids=["r"])
    for bad in (float("nan"), -1e30):
        report = policy_pb2.ExperienceReport(task_id="acrobot", episode_id="r", reward=bad, terminated=True)
        assert "reward" in _refused(lambda r=report: policy_stub.ReportExperience(iter([r]), timeout=10))
    stream = [
        policy_pb2.StepRequest(
            task_id="cartpole", episode_id="s", observation=to_proto(observations("cartpole"))
        ),
        policy_pb2.StepRequest(
            task_id="cartpole",
            episode_id="s",
            feedback=policy_pb2.Feedback(reward=float("inf"), terminated=True),
        ),
    ]
    assert "feedback.reward" in _refused(lambda: list(policy_stub.ActStream(iter(stream), timeout=10)))
    # Nothing of it reached the feed: the first segment the subscriber sees is this valid episode's.
    ok = _transition("cartpole", episode_id="valid", reward=2.5, terminated=True)
    assert policy_stub.ReportExperience(iter([ok]), timeout=10).episodes_completed == 1
    segment = segments.get(timeout=10)
    call.cancel()
    assert segment.episode_id == "valid"
    assert from_proto(segment.rewards).tolist() == [2.5]
    assert segments.empty()
    text = _metrics_text(server)
    assert 'polyhead_experience_dropped_total{reason="invalid_reward",task="cartpole"} 4.0' in text


def _metrics_text(server: Any) -> str:
    from prometheus_client import generate_latest

    return generate_latest(server.running.metrics.registry).decode()


def test_reward_bound_is_a_setting(server_settings: Any) -> None:
    from polyhead.server.app import BackgroundServer

    with (
        BackgroundServer(server_settings(max_abs_reward=10.0)) as srv,
        grpc.insecure_channel(srv.target) as ch,
    ):
        stub = policy_pb2_grpc.PolicyServiceStub(ch)
        assert stub.ReportExperience(iter([_transition("cartpole", reward=10.0)]), timeout=10).accepted == 1
        too_big = _transition("cartpole", episode_id="e2", reward=10.5)
        details = _refused(lambda: stub.ReportExperience(iter([too_big]), timeout=10))
        assert "max_abs_reward" in details and "10" in details


# --- rewards join the right action ---------------------------------------------------------------------
def test_rewards_join_by_step_index_and_a_retried_act_is_recorded_once(server: Any, policy_stub: Any) -> None:
    segments, call = _subscribe(server, ["cartpole"])
    obs = [observations("cartpole", seed=i) for i in range(3)]
    responses = [act(policy_stub, "cartpole", o, episode_ids=["j"], steps=[i]) for i, o in enumerate(obs)]
    # A retry of step 1 (the client saw a timeout): same (episode, step), not recorded again.
    act(policy_stub, "cartpole", obs[1], episode_ids=["j"], steps=[1])
    dropped = server.running.metrics.experience_dropped
    assert dropped.labels(task="cartpole", reason="duplicate_action").value == 1
    # Rewards out of order, each naming its step.
    reports = [
        policy_pb2.ExperienceReport(task_id="cartpole", episode_id="j", reward=3.0, step=2, terminated=True),
        policy_pb2.ExperienceReport(task_id="cartpole", episode_id="j", reward=1.0, step=0),
        policy_pb2.ExperienceReport(task_id="cartpole", episode_id="j", reward=2.0, step=1),
    ]
    summary = policy_stub.ReportExperience(iter(reports), timeout=10)
    # The termination at step 2 arrived while steps 0 and 1 had no reward yet: what is complete then
    # (nothing) is published and the episode ends; so step order matters for the end report only.
    assert summary.accepted >= 1
    call.cancel()
    # The same again with the end report last: every reward on its own action.
    segments, call = _subscribe(server, ["cartpole"])
    responses = [act(policy_stub, "cartpole", o, episode_ids=["k"], steps=[i]) for i, o in enumerate(obs)]
    reports = [
        policy_pb2.ExperienceReport(task_id="cartpole", episode_id="k", reward=2.0, step=1),
        policy_pb2.ExperienceReport(task_id="cartpole", episode_id="k", reward=1.0, step=0),
        policy_pb2.ExperienceReport(task_id="cartpole", episode_id="k", reward=3.0, step=2, terminated=True),
    ]
    summary = policy_stub.ReportExperience(iter(reports), timeout=10)
    assert (summary.accepted, summary.dropped, summary.episodes_completed) == (3, 0, 1)
    segment = segments.get(timeout=10)
    call.cancel()
    assert from_proto(segment.rewards).tolist() == [1.0, 2.0, 3.0]
    np.testing.assert_allclose(from_proto(segment.observations), np.stack(obs), atol=1e-6)
    np.testing.assert_array_equal(
        from_proto(segment.actions), [int(from_proto(r.actions)) for r in responses]
    )
    assert list(segment.deterministic) == [True, True, True]  # act() asks for deterministic actions


def test_a_client_far_behind_loses_old_steps_but_never_shifts_rewards() -> None:
    import asyncio

    from polyhead.server.experience import MAX_PENDING_STEPS

    async def run() -> list[Any]:
        hub, _ = _hub(max_segment_steps=1000, subscriber_queue_size=100)
        sub = hub.subscribe(["t"])
        behind = MAX_PENDING_STEPS + 4
        for step in range(behind):
            hub.record_action(
                "t", "slow", obs=np.full(4, step, np.float32), action=np.int64(0), log_prob=-0.7, version=1
            )
        # The rewards arrive afterwards, in order, without step indices: reward i belongs to step i.
        for step in range(behind):
            hub.report("t", "slow", reward=float(step), terminated=step == behind - 1, truncated=False)
        got = []
        while not sub.queue.empty():
            got.append(sub.queue.get_nowait())
        return got

    got = asyncio.run(run())
    steps = [(s.start_step, s.observations[:, 0].tolist(), s.rewards.tolist()) for s in got]
    for start, obs_ids, rewards in steps:
        # Every published step carries the reward reported for it (reward i on the observation of step i).
        assert obs_ids == rewards, steps
        assert start == obs_ids[0]
    assert sum(len(r) for _, _, r in steps) == MAX_PENDING_STEPS  # the 4 oldest were dropped
    assert got[-1].terminated


def test_truncation_carries_the_final_observation_and_deterministic_steps_are_marked(
    server: Any, policy_stub: Any
) -> None:
    segments, call = _subscribe(server, ["cartpole"])
    obs = observations("cartpole", seed=3)
    final = observations("cartpole", seed=4)
    requests = [
        policy_pb2.StepRequest(task_id="cartpole", episode_id="t", observation=to_proto(obs), seed=1),
        policy_pb2.StepRequest(
            task_id="cartpole", episode_id="t", observation=to_proto(obs), deterministic=True,
            feedback=policy_pb2.Feedback(reward=1.0, step=0),
        ),
        policy_pb2.StepRequest(
            task_id="cartpole",
            episode_id="t",
            feedback=policy_pb2.Feedback(
                reward=1.0, truncated=True, step=1, final_observation=to_proto(final)
            ),
        ),
    ]  # fmt: skip
    list(policy_stub.ActStream(iter(requests), timeout=10))
    segment = segments.get(timeout=10)
    call.cancel()
    assert segment.truncated and not segment.terminated
    np.testing.assert_allclose(from_proto(segment.next_observation), final, atol=1e-6)
    assert list(segment.deterministic) == [False, True]
    assert segment.episode_ordinal == 0


def test_simulated_truncations_carry_their_final_observation_and_deterministic_runs_are_marked(
    server: Any,
) -> None:
    from dataclasses import replace

    from polyhead.clients.simulator import SimulationConfig, run_simulation
    from polyhead.taskspec import load_suite

    spec = replace(load_suite("classic-mixed").task("cartpole"), max_episode_steps=6)
    for mode in ("unary", "stream"):
        segments, call = _subscribe(server, ["cartpole"])
        sampled = run_simulation(
            server.target,
            SimulationConfig("cartpole", episodes=3, envs=1, mode=mode, task_spec=spec, seed=2),  # type: ignore[arg-type]
        )
        deterministic = run_simulation(
            server.target,
            SimulationConfig(
                "cartpole",
                episodes=2,
                envs=1,
                mode=mode,
                task_spec=spec,
                seed=2,
                deterministic=True,  # type: ignore[arg-type]
            ),
        )
        got = [segments.get(timeout=10) for _ in range(5)]
        call.cancel()
        assert sampled.summary()["feeds_training"] and not deterministic.summary()["feeds_training"]
        truncated = [s for s in got if s.truncated]
        assert truncated, f"{mode}: no truncated episode in {[(s.terminated, s.episode_length) for s in got]}"
        for s in truncated:
            assert s.HasField("next_observation") and s.next_observation.shape, (
                mode,
                s.episode_length,
                s.start_step,
            )
            final = from_proto(s.next_observation)
            assert final.shape == (4,) and np.isfinite(final).all(), mode
        assert [bool(any(s.deterministic)) for s in got] == [False] * 3 + [True] * 2, mode
