"""Health per task, reflection, and the documented metric series in a real scrape of the metrics port."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from server_helpers import TASKS, act, observations

from polyhead.v1 import admin_pb2, policy_pb2

DOCS = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


def _status(channel: grpc.Channel, service: str) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service)).status


def test_health_overall_and_per_task(server: Any, channel: grpc.Channel, admin_stub: Any) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    assert _status(channel, "") == serving
    assert _status(channel, "polyhead.v1.PolicyService") == serving
    for task in TASKS:
        assert _status(channel, f"polyhead.v1.PolicyService/{task}") == serving
    with pytest.raises(grpc.RpcError) as unknown:
        _status(channel, "polyhead.v1.PolicyService/nope")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    admin_stub.UnloadHead(admin_pb2.UnloadHeadRequest(task_id="acrobot", all_versions=True))
    import time

    deadline = time.monotonic() + 5
    while _status(channel, "polyhead.v1.PolicyService/acrobot") != health_pb2.HealthCheckResponse.NOT_SERVING:
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_reflection_lists_the_services(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"polyhead.v1.PolicyService", "polyhead.v1.Diagnostics", "grpc.health.v1.Health"} <= names


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text: str = response.read().decode()
    return text


def documented_metrics() -> list[str]:
    """Every `polyhead_*` series name listed in docs/metrics.md."""
    return sorted(set(re.findall(r"`(polyhead_[a-z_]+)", DOCS.read_text())))


def test_documented_series_are_in_a_real_scrape(server: Any, policy_stub: Any, admin_stub: Any) -> None:
    for task in TASKS:
        act(policy_stub, task, observations(task, 2))
    # Episode metrics need a finished episode; swap metrics need a swap.
    steps = [
        policy_pb2.StepRequest(task_id="cartpole", episode_id="m", observation=_obs()),
        policy_pb2.StepRequest(
            task_id="cartpole", episode_id="m", feedback=policy_pb2.Feedback(reward=1.0, terminated=True)
        ),
    ]
    list(policy_stub.ActStream(iter(steps)))
    admin_stub.SetActiveVersion(admin_pb2.SetActiveVersionRequest(task_id="cartpole", version=1))
    with pytest.raises(grpc.RpcError):
        admin_stub.LoadHead(admin_pb2.LoadHeadRequest(task_id="cartpole", onnx=b"x", head_json="{}"))
    policy_stub.ReportExperience(iter([policy_pb2.ExperienceReport(task_id="cartpole", episode_id="zz")]))
    text = _scrape(server.metrics_port)
    names = documented_metrics()
    assert len(names) >= 20
    missing = [n for n in names if not re.search(rf"^{n}(_bucket|_sum|_count)?(\{{| )", text, re.MULTILINE)]
    assert not missing, missing
    assert 'polyhead_requests_total{code="OK",method="Act",task="cartpole"}' in text
    assert re.search(r'polyhead_server_info\{trunk_sha256="[0-9a-f]{64}",version="[^"]+"\} 1.0', text)
    assert 'polyhead_active_head_version{task="acrobot"} 1.0' in text


def _obs() -> Any:
    from polyhead.tensors import to_proto

    return to_proto(observations("cartpole"))
