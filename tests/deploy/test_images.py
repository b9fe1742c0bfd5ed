"""The serving image, built with podman from deploy/docker/Dockerfile.server and run on a small bundle.

From outside the container, through ports published on 127.0.0.1: the standard gRPC health service says
SERVING, ``Act`` through :class:`polyhead.clients.PolicyClient` answers what an in-process server on the
same bundle answers, and ``/metrics`` counts those calls. Inside: no torch, the installed package holds
real files (not the source tree's symlinks), the image's own HEALTHCHECK passes, and SIGTERM drains and
exits 0 before podman's stop timeout would kill it.

The image is built by ``deploy/podman/build-images.sh`` (the Debian base and the wheelhouse are cached
between runs; podman's layer cache reuses an unchanged image); see tests/deploy/podman.py.
"""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from polyhead.clients import PolicyClient

from .podman import BuiltImages, build_images, host_port, podman

pytestmark = pytest.mark.slow

GRPC_PORT, ADMIN_PORT, METRICS_PORT = 50051, 50052, 9100
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20


@pytest.fixture(scope="module")
def serving_image() -> BuiltImages:
    built = build_images(["server"])
    size_mb = built.size_bytes["server"] / 1e6
    name, steps = built.names["server"], built.seconds
    print(f"\nserving image {name}: {size_mb:.0f} MB; build seconds {steps} ({built.wall_s:.0f} s in all)")
    return built


@dataclass(frozen=True)
class Container:
    name: str
    image: str
    grpc_target: str
    metrics_url: str
    start_to_serving_s: float


def health_status(target: str) -> str:
    """The ``grpc.health.v1`` status name of the whole server, or the gRPC error code's name."""
    with grpc.insecure_channel(target) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2.0)
        except grpc.RpcError as exc:
            return str(exc.code().name)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def wait_serving(name: str, target: str, started: float) -> float:
    """Seconds from ``started`` until the container's server reports SERVING; fails with its logs."""
    seen = ""
    while time.monotonic() - started < START_TIMEOUT_S:
        seen = health_status(target)
        if seen == "SERVING":
            return time.monotonic() - started
        state = podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
        if state != "running":
            break
        time.sleep(0.1)
    logs = podman("logs", name, check=False)
    raise AssertionError(f"container {name} not SERVING (last: {seen}):\n{logs.stdout}{logs.stderr}")


@pytest.fixture
def container(serving_image: BuiltImages, tiny_bundle: Path) -> Iterator[Container]:
    """The serving image on ``tiny_bundle`` (read-only volume), data plane and metrics published on
    127.0.0.1 ephemeral ports; removed when the test ends."""
    image = serving_image.names["server"]
    name = f"polyhead-test-{uuid.uuid4().hex[:12]}"
    started = time.monotonic()
    podman(
        "run",
        "--detach",
        "--name",
        name,
        "--publish",
        f"127.0.0.1::{GRPC_PORT}",
        "--publish",
        f"127.0.0.1::{METRICS_PORT}",
        "--volume",
        f"{tiny_bundle}:/bundles/polyhead:ro",
        image,
    )
    try:
        target = f"127.0.0.1:{host_port(name, GRPC_PORT)}"
        metrics_url = f"http://127.0.0.1:{host_port(name, METRICS_PORT)}/metrics"
        start_to_serving = wait_serving(name, target, started)
        print(f"\n{image}: podman run to SERVING in {start_to_serving:.2f} s")
        yield Container(name, image, target, metrics_url, start_to_serving)
    finally:
        podman("rm", "--force", "--time", "0", name, check=False)


# Run inside the serving image: what is installed and importable, and as whom it runs.
INSPECT_INSTALL = """
import importlib.metadata as m, importlib.util as u, json, os, pathlib
import polyhead.server.app as app
print(json.dumps({
    "dists": sorted(d.metadata["Name"].lower().replace("_", "-") for d in m.distributions()),
    "top_level": [n for n in ("server", "trainer", "clients", "torch") if u.find_spec(n)],
    "server_dir_is_link": pathlib.Path(app.__file__).parent.is_symlink(),
    "trainer": u.find_spec("polyhead.trainer") is not None,
    "uid": os.getuid(),
}))
"""


def in_image(image: str, code: str) -> Any:
    """Run ``code`` with the image's Python (isolated mode, no network); return the JSON it prints."""
    result = podman("run", "--rm", "--network", "none", "--entrypoint", "python", image, "-I", "-c", code)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_serving_image_has_no_torch_and_installs_real_files(serving_image: BuiltImages) -> None:
    image = serving_image.names["server"]
    seen = in_image(image, INSPECT_INSTALL)
    assert "torch" not in seen["dists"], seen["dists"]
    assert {"polyhead", "onnxruntime", "grpcio", "prometheus-client"} <= set(seen["dists"])
    assert seen["top_level"] == [], "nothing but polyhead (and its dependencies) is importable at top level"
    assert seen["server_dir_is_link"] is False
    assert seen["trainer"] is False, "the serving image packs polyhead.server, not the trainer"
    assert seen["uid"] == 10001
    config = json.loads(podman("image", "inspect", image).stdout)[0]["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["polyhead"]


def test_served_from_outside_the_container(container: Container, server: Any) -> None:
    """Health, Act (equal to an in-process server on the same bundle) and /metrics, all from the host."""
    assert health_status(container.grpc_target) == "SERVING"
    rng = np.random.default_rng(0)
    with PolicyClient(container.grpc_target, timeout=10.0) as remote, PolicyClient(server.target) as local:
        served, expected = remote.list_tasks(), local.list_tasks()
        assert served.trunk_sha256 == expected.trunk_sha256
        assert (
            sorted(served.tasks) == sorted(expected.tasks) == ["acrobot", "cartpole", "cartpole-continuous"]
        )
        for task_id, task in served.tasks.items():
            shape = task.observation_shape
            observations = rng.normal(size=(8, *shape)).astype(np.float32)
            got = remote.act(task_id, observations, deterministic=True, return_value=True)
            want = local.act(task_id, observations, deterministic=True, return_value=True)
            assert got.head_version == want.head_version == 1
            np.testing.assert_allclose(got.actions, want.actions, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(got.values, want.values, rtol=1e-5, atol=1e-6)
    with urllib.request.urlopen(container.metrics_url, timeout=5) as response:
        text = response.read().decode()
    for task_id in served.tasks:
        assert f'polyhead_requests_total{{code="OK",method="Act",task="{task_id}"}} 1.0' in text, task_id
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5) as response:
        local_info = [
            line for line in response.read().decode().splitlines() if "polyhead_server_info{" in line
        ]
    assert local_info and local_info[0] in text, "same bundle, same trunk_sha256 in polyhead_server_info"


def test_image_healthcheck_and_sigterm(container: Container) -> None:
    """The image's HEALTHCHECK (deploy/docker/healthcheck.py inside) passes; `podman stop` (SIGTERM)
    drains and exits 0 instead of running into the stop timeout and SIGKILL (exit 137)."""
    check = podman("healthcheck", "run", container.name, check=False)
    assert check.returncode == 0, f"HEALTHCHECK failed: {check.stdout}{check.stderr}"
    podman("stop", "--time", str(STOP_TIMEOUT_S), container.name, timeout=STOP_TIMEOUT_S + 30)
    state = json.loads(podman("inspect", container.name).stdout)[0]["State"]
    logs = podman("logs", container.name).stderr
    assert state["ExitCode"] == 0, f"exit {state['ExitCode']} after SIGTERM:\n{logs}"
    assert "draining" in logs


def test_image_exports_spans_when_tracing_is_enabled(serving_image: BuiltImages, tiny_bundle: Path) -> None:
    """POLYHEAD_TRACING_ENABLED=true: the image has the tracing extra, and its spans reach an OTLP/gRPC
    collector on the host (host network, so the container's 127.0.0.1 is the host's)."""
    import socket
    from concurrent import futures

    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    names: list[tuple[str, str]] = []

    class Collector(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request: Any, context: Any) -> Any:  # noqa: N802, ARG002 (the OTLP signature)
            for resource_spans in request.resource_spans:
                (service,) = (
                    a.value.string_value
                    for a in resource_spans.resource.attributes
                    if a.key == "service.name"
                )
                names.extend((service, s.name) for scope in resource_spans.scope_spans for s in scope.spans)
            return trace_service_pb2.ExportTraceServiceResponse()

    collector = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Collector(), collector)
    collector_port = collector.add_insecure_port("127.0.0.1:0")
    collector.start()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    name = f"polyhead-test-{uuid.uuid4().hex[:12]}"
    started = time.monotonic()
    try:
        podman(
            "run", "--detach", "--name", name, "--network", "host",
            "--volume", f"{tiny_bundle}:/bundles/polyhead:ro",
            "--env", "POLYHEAD_TRACING_ENABLED=true",
            "--env", f"POLYHEAD_TRACING_ENDPOINT=127.0.0.1:{collector_port}",
            "--env", "POLYHEAD_TRACING_SERVICE_NAME=polyhead-image",
            serving_image.names["server"],
            "serve", "--bundle", "/bundles/polyhead", "--host", "127.0.0.1", "--port", str(port),
            "--admin-port", "0", "--no-metrics",
        )  # fmt: skip
        target = f"127.0.0.1:{port}"
        wait_serving(name, target, started)
        with PolicyClient(target, timeout=10.0) as client:
            for _ in range(3):
                client.act("cartpole", np.zeros(4, dtype=np.float32))
        podman("stop", "--time", str(STOP_TIMEOUT_S), name, timeout=STOP_TIMEOUT_S + 30)  # flushes the spans
    finally:
        podman("rm", "--force", "--time", "0", name, check=False)
        collector.stop(None)
    assert {service for service, _ in names} == {"polyhead-image"}
    spans = sorted(span for _, span in names)
    assert spans.count("Act") == 3 and spans.count("batch") == 3, spans
    assert set(spans) == {"Act", "receive", "queue_wait", "encode", "batch", "trunk", "head"}
