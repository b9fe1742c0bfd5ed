"""Poisoned experience of every kind, sent to a real server while a remote updater learns from it: every
message is refused at the edge (INVALID_ARGUMENT, counted), nothing of it reaches the updater, and the
updater finishes with finite weights."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from updater_helpers import remote_config

from polyhead.taskspec import load_task_spec
from polyhead.tensors import from_proto, to_proto
from polyhead.trainer.adapt import adapt
from polyhead.trainer.updater.fleet import SimulatorFleet
from polyhead.v1 import policy_pb2, policy_pb2_grpc

TASK = load_task_spec("cartpole-family:cartpole-reversed")
OBS = np.asarray([0.01, -0.02, 0.03, 0.0], np.float32)


def _transition(episode: str, **fields: Any) -> policy_pb2.ExperienceReport:
    values: dict[str, Any] = {
        "task_id": TASK.id,
        "episode_id": episode,
        "reward": 1.0,
        "terminated": True,
        "observation": to_proto(OBS),
        "action": to_proto(np.int64(1)),
        "log_prob": -0.7,
        "head_version": 1,
    }
    values.update(fields)
    return policy_pb2.ExperienceReport(**values)


#: (reason counted by the server, a poisoned report); one of each kind the issue lists.
POISON: list[tuple[str, Callable[[str], policy_pb2.ExperienceReport]]] = [
    ("invalid_reward", lambda e: _transition(e, reward=float("nan"))),
    ("invalid_reward", lambda e: _transition(e, reward=float("-inf"))),
    ("invalid_reward", lambda e: _transition(e, reward=1e30)),
    ("invalid_action", lambda e: _transition(e, action=to_proto(np.int64(5)))),
    ("invalid_action", lambda e: _transition(e, action=to_proto(np.int64(-3)))),
    ("invalid_log_prob", lambda e: _transition(e, log_prob=float("nan"))),
    ("invalid_log_prob", lambda e: _transition(e, log_prob=2.0)),
    ("unknown_version", lambda e: _transition(e, head_version=12345)),
    ("invalid_observation", lambda e: _transition(e, observation=to_proto(np.full(4, np.inf, np.float32)))),
    ("invalid_observation", lambda e: _transition(e, observation=to_proto(np.zeros(7, np.float32)))),
]


class Poisoner:
    """Sends every poisoned kind in a loop (ReportExperience and ActStream feedback) until stopped."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.sent = 0
        self.codes: dict[str, int] = {}
        self.by_reason: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _note(self, code: grpc.StatusCode) -> None:
        self.codes[code.name] = self.codes.get(code.name, 0) + 1

    def _run(self) -> None:
        with grpc.insecure_channel(self.target) as channel:
            stub = policy_pb2_grpc.PolicyServiceStub(channel)
            n = 0
            while not self._stop.is_set():
                for reason, make in POISON:
                    n += 1
                    try:
                        stub.ReportExperience(iter([make(f"poison-{n}")]), timeout=10)
                        self._note(grpc.StatusCode.OK)
                    except grpc.RpcError as exc:
                        if exc.code() == grpc.StatusCode.NOT_FOUND:
                            break  # the task is not served yet (the updater registers it)
                        self._note(exc.code())
                    self.sent += 1
                    self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
                # ActStream: act on the task, then feed a NaN reward back.
                stream = [
                    policy_pb2.StepRequest(task_id=TASK.id, episode_id=f"ps-{n}", observation=to_proto(OBS)),
                    policy_pb2.StepRequest(
                        task_id=TASK.id,
                        episode_id=f"ps-{n}",
                        feedback=policy_pb2.Feedback(reward=float("nan"), terminated=True),
                    ),
                ]
                try:
                    list(stub.ActStream(iter(stream), timeout=10))
                    self._note(grpc.StatusCode.OK)
                    self.sent += 1
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.NOT_FOUND:
                        self._note(exc.code())
                        self.sent += 1
                        self.by_reason["invalid_reward"] = self.by_reason.get("invalid_reward", 0) + 1
                self._stop.wait(0.05)

    def __enter__(self) -> Poisoner:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def test_poisoned_experience_is_refused_and_the_updater_finishes(
    random_copy: Path, serve: Callable[..., Any]
) -> None:
    srv = serve(random_copy)
    config = remote_config(
        random_copy,
        TASK,
        srv,
        init="scratch",
        guard_episodes=2,
        guard_timeout_s=20.0,
        zero_shot_episodes=2,
        ppo={"total_steps": 1_500, "envs_per_task": 4, "num_steps": 64, "update_epochs": 2},
    )
    with (
        SimulatorFleet(srv.target, TASK.id, clients=2, episodes_per_round=2, seed=3),
        Poisoner(srv.target) as poisoner,
    ):
        result = adapt(config)
    # Every poisoned message was refused with INVALID_ARGUMENT; none was accepted.
    assert poisoner.sent >= len(POISON) + 1, "the poisoner never reached the served task"
    assert poisoner.codes == {"INVALID_ARGUMENT": poisoner.sent}, poisoner.codes
    dropped = srv.running.metrics.experience_dropped
    for reason, sent in poisoner.by_reason.items():
        assert dropped.labels(task=TASK.id, reason=reason).value >= sent, reason
    # Nothing of it reached the updater: its own second line of defence found nothing to skip.
    assert result.steps >= 1_500
    assert result.dropped_steps["non_finite"] == 0
    assert result.dropped_steps["invalid_action"] == 0
    assert result.dropped_steps["malformed"] == 0
    assert math.isfinite(result.final_eval_return)
    # The version it left serving answers with finite log-probs and values.
    with grpc.insecure_channel(srv.target) as channel:
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        response = stub.Act(
            policy_pb2.ActRequest(
                task_id=TASK.id,
                observations=to_proto(np.tile(OBS, (8, 1))),
                return_log_prob=True,
                return_value=True,
            ),
            timeout=10,
        )
    assert response.head_version == result.active_version
    assert np.isfinite(from_proto(response.log_probs)).all()
    assert np.isfinite(from_proto(response.values)).all()
