"""Health per task, reflection, and the documented metric series in a real scrape of the metrics port."""

from __future__ import annotations

import json
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


def _without_created(text: str) -> list[str]:
    """Exposition lines but the ``_created`` timestamps (they differ between two registries)."""
    return [line for line in text.splitlines() if "_created" not in line.split(" ")[0]]


def test_hot_metrics_export_what_prometheus_client_metrics_would() -> None:
    """The lock-free hot metrics print the same families, samples, labels and buckets as the
    prometheus_client classes they replace, given the same observations."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    from polyhead.server.metrics import LATENCY_BUCKETS, HotCounter, HotHistogram, HotMetrics

    hot_registry, reference = CollectorRegistry(), CollectorRegistry()
    hot_duration = HotHistogram("x_seconds", "doc", ["method", "task"], buckets=LATENCY_BUCKETS)
    hot_passes = HotHistogram("x_pass_seconds", "doc", buckets=LATENCY_BUCKETS)
    hot_requests = HotCounter("x_requests", "doc", ["method", "task", "code"])
    hot_registry.register(HotMetrics([hot_duration, hot_passes, hot_requests]))
    duration = Histogram("x_seconds", "doc", ["method", "task"], buckets=LATENCY_BUCKETS, registry=reference)
    passes = Histogram("x_pass_seconds", "doc", buckets=LATENCY_BUCKETS, registry=reference)
    requests = Counter("x_requests", "doc", ["method", "task", "code"], registry=reference)
    # Values on bucket bounds, between them, below the first and above the last.
    values = [0.0, 0.00005, 0.00007, 0.0001, 0.001, 0.0011, 0.5, 2.5, 3.0, 1e-9]
    for i, value in enumerate(values):
        task = ("cartpole", "acrobot")[i % 2]
        for h in (hot_duration, duration):
            h.labels(method="Act", task=task).observe(value)
        for p in (hot_passes, passes):
            p.observe(value)
        for c in (hot_requests, requests):
            c.labels(method="Act", task=task, code="OK").inc()
    hot = _without_created(generate_latest(hot_registry).decode())
    assert hot == _without_created(generate_latest(reference).decode())

    def created(text: str) -> list[str]:  # the series, not their timestamps
        return [line.rsplit(" ", 1)[0] for line in text.splitlines() if "_created" in line]

    assert created(generate_latest(hot_registry).decode()) == created(generate_latest(reference).decode())


def test_task_metrics_export_what_prometheus_client_metrics_would() -> None:
    """The per-task entries (locked counters and histograms, gauges with remove, summaries) print the
    same families, samples and labels as prometheus_client's Counter, Histogram, Gauge and Summary."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary, generate_latest

    from polyhead.server.metrics import (
        SWAP_BUCKETS,
        HotCounter,
        HotGauge,
        HotHistogram,
        HotMetrics,
        HotSummary,
    )

    hot_registry, reference = CollectorRegistry(), CollectorRegistry()
    hot_loads = HotCounter("y_loads", "doc", ["task", "source"], locked=True)
    hot_swap = HotHistogram("y_swap_seconds", "doc", ["task"], buckets=SWAP_BUCKETS, locked=True)
    hot_active = HotGauge("y_active", "doc", ["task"])
    hot_returns = HotSummary("y_return", "doc", ["task"])
    hot_registry.register(HotMetrics([hot_loads, hot_swap, hot_active, hot_returns]))
    loads = Counter("y_loads", "doc", ["task", "source"], registry=reference)
    swap = Histogram("y_swap_seconds", "doc", ["task"], buckets=SWAP_BUCKETS, registry=reference)
    active = Gauge("y_active", "doc", ["task"], registry=reference)
    returns = Summary("y_return", "doc", ["task"], registry=reference)
    for task in ("cartpole", "acrobot", "gone", "idle"):  # "idle": created at 0, never observed
        for c in (hot_loads, loads):
            c.labels(task=task, source="bundle")
        for g in (hot_active, active):
            g.labels(task=task).set(0)
        for s in (hot_returns, returns):
            s.labels(task=task)
    for i, value in enumerate([0.0, 1e-7, 0.001, 0.5, 3.0, -2.5]):
        task = ("cartpole", "acrobot", "gone")[i % 3]
        for c in (hot_loads, loads):
            c.labels(task=task, source="upload").inc(2)
        for h in (hot_swap, swap):
            h.labels(task=task).observe(abs(value))
        for g in (hot_active, active):
            g.labels(task=task).set(i + 1)
        for s in (hot_returns, returns):
            s.labels(task=task).observe(value)
    for g in (hot_active, active):
        g.remove("gone")
        g.remove("never")
    with pytest.raises(ValueError):
        hot_loads.labels(task="cartpole", source="bundle").inc(-1)
    hot_text, reference_text = generate_latest(hot_registry).decode(), generate_latest(reference).decode()
    assert _without_created(hot_text) == _without_created(reference_text)

    def created(text: str) -> list[str]:
        return [line.rsplit(" ", 1)[0] for line in text.splitlines() if "_created" in line]

    assert created(hot_text) == created(reference_text)
    assert 'y_return_count{task="idle"} 0.0' in hot_text
    assert 'y_active{task="gone"}' not in hot_text


def test_hot_metrics_in_a_real_scrape(server: Any, policy_stub: Any) -> None:
    act(policy_stub, "cartpole", observations("cartpole", 2))
    text = _scrape(server.metrics_port)
    for name, kind in [
        ("polyhead_requests_total", "counter"),
        ("polyhead_request_duration_seconds", "histogram"),
        ("polyhead_queue_wait_seconds", "histogram"),
        ("polyhead_trunk_seconds", "histogram"),
        ("polyhead_head_seconds", "histogram"),
        ("polyhead_batch_size", "histogram"),
        ("polyhead_batch_requests", "histogram"),
        ("polyhead_batch_encoders", "histogram"),
        ("polyhead_version_act_seconds", "histogram"),
    ]:
        assert f"# TYPE {name} {kind}\n" in text, name
    assert 'polyhead_request_duration_seconds_bucket{le="+Inf",method="Act",task="cartpole"} 1.0' in text
    assert 'polyhead_queue_wait_seconds_count{task="cartpole"} 1.0' in text
    assert 'polyhead_version_act_seconds_count{task="cartpole",version="1"} 1.0' in text
    assert re.search(r"^polyhead_trunk_seconds_count [1-9]", text, re.MULTILINE)


def _series(text: str, task: str) -> dict[str, float]:
    """The scraped samples that carry ``task="<task>"``, ``_created`` left out: name{labels} -> value."""
    out = {}
    for line in text.splitlines():
        if f'task="{task}"' in line and not line.startswith("#") and "_created{" not in line:
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def test_a_loaded_task_exports_its_series_at_0_and_unloading_drops_its_gauges(
    server: Any, admin_stub: Any, tiny_bundle: Path
) -> None:
    from polyhead.bundle import Bundle

    record = Bundle.open(tiny_bundle).head("cartpole")
    meta = record.meta.to_json()
    head_json = json.dumps({**meta, "task": {**meta["task"], "id": "fresh"}, "version": 0, "head_sha256": ""})
    admin_stub.LoadHead(
        admin_pb2.LoadHeadRequest(
            task_id="fresh", onnx=record.read_onnx(), head_json=head_json, activate=True
        )
    )
    loaded = _series(_scrape(server.metrics_port), "fresh")
    for name in (
        "polyhead_rejected_requests_total",
        "polyhead_expired_requests_total",
        "polyhead_experience_steps_total",
        "polyhead_experience_segments_total",
        "polyhead_episode_return_count",
        "polyhead_episode_length_count",
        "polyhead_task_regressed",
        "polyhead_canary_version",
        "polyhead_canary_percent",
    ):
        assert loaded[f'{name}{{task="fresh"}}'] == 0.0, name
    for kind in ("recovered", "regressed"):
        assert loaded[f'polyhead_regression_events_total{{kind="{kind}",task="fresh"}}'] == 0.0
    assert loaded['polyhead_head_loads_total{source="upload",task="fresh"}'] == 1.0
    assert loaded['polyhead_head_swaps_total{task="fresh"}'] == 1.0
    assert loaded['polyhead_head_load_seconds_count{task="fresh"}'] == 1.0
    assert loaded['polyhead_active_head_version{task="fresh"}'] == 1.0
    assert loaded['polyhead_loaded_heads{task="fresh"}'] == 1.0

    admin_stub.UnloadHead(admin_pb2.UnloadHeadRequest(task_id="fresh", all_versions=True))
    unloaded = _series(_scrape(server.metrics_port), "fresh")
    # The gauges that describe what is served go; counters keep their history for rate() over the window.
    gone = {k for k in loaded if k.split("{")[0] in _SERVING_GAUGES}
    assert gone and not gone & set(unloaded)
    assert unloaded['polyhead_loaded_heads{task="fresh"}'] == 0.0
    assert {k: v for k, v in unloaded.items() if k != 'polyhead_loaded_heads{task="fresh"}'} == {
        k: v for k, v in loaded.items() if k not in gone and k != 'polyhead_loaded_heads{task="fresh"}'
    }


_SERVING_GAUGES = ("polyhead_active_head_version", "polyhead_canary_version", "polyhead_canary_percent")
