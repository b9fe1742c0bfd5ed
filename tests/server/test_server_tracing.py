"""Tracing: spans of Act calls and ActStream steps from a real server, through an in-memory exporter and
through the real OTLP/gRPC exporter to a collector started here; tracing off leaves no trace at all."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import (
    trace_service_pb2,
    trace_service_pb2_grpc,
)
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from server_helpers import act, observations

from polyhead.server.app import BackgroundServer
from polyhead.tensors import to_proto
from polyhead.v1 import policy_pb2, policy_pb2_grpc
from tests.contract.hidden_modules import without

CALL_CHILDREN = {"receive", "queue_wait", "encode"}


@pytest.fixture
def traced(server_settings: Callable[..., Any]) -> Callable[..., Any]:
    """A server with tracing on, into an in-memory exporter: ``with traced(**settings) as (srv, spans)``."""

    class _Traced:
        def __init__(self, **overrides: Any) -> None:
            self.exporter = InMemorySpanExporter()
            overrides.setdefault("tracing_enabled", True)
            self.server = BackgroundServer(server_settings(**overrides), span_exporter=self.exporter)

        def __enter__(self) -> tuple[BackgroundServer, InMemorySpanExporter]:
            self.server.start()
            return self.server, self.exporter

        def __exit__(self, *exc: object) -> None:
            self.server.stop()

    return _Traced


def _traceparent(sampled: bool = True) -> tuple[str, int, int]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}", int(trace_id, 16), int(span_id, 16)


def _named(spans: Any, name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def _act(stub: Any, metadata: tuple[tuple[str, str], ...] = (), task: str = "cartpole", rows: int = 1) -> Any:
    request = policy_pb2.ActRequest(task_id=task, observations=to_proto(observations(task, rows)))
    return stub.Act(request, timeout=30, metadata=metadata)


def test_a_call_continues_the_callers_trace_with_every_span(traced: Any) -> None:
    with traced() as (srv, exporter), grpc.insecure_channel(srv.target) as channel:
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        header, trace_id, parent_id = _traceparent()
        _act(stub, (("traceparent", header),), rows=3)
        spans = exporter.get_finished_spans()

    (call,) = _named(spans, "Act")
    assert call.kind == SpanKind.SERVER
    assert call.context.trace_id == trace_id, "the call joins the caller's trace"
    assert call.parent is not None and call.parent.span_id == parent_id and call.parent.is_remote
    assert call.attributes["rpc.method"] == "Act" and call.attributes["rpc.grpc.status_code"] == "OK"
    assert {s.context.trace_id for s in spans} == {trace_id}
    by_name = {s.name: s for s in spans}
    assert set(by_name) == {"Act", "receive", "queue_wait", "encode", "batch", "trunk", "head"}
    assert len(spans) == 7
    for name in (*CALL_CHILDREN, "batch"):
        assert by_name[name].parent.span_id == call.context.span_id, name
    batch = by_name["batch"]
    for name in ("trunk", "head"):
        assert by_name[name].parent.span_id == batch.context.span_id, name
    assert [link.context.span_id for link in batch.links] == [call.context.span_id]
    assert batch.attributes["polyhead.batch.rows"] == 3 and batch.attributes["polyhead.batch.requests"] == 1
    assert list(batch.attributes["polyhead.batch.heads"]) == ["cartpole@1"]
    # The phases follow each other inside the call (same clock, so these hold exactly).
    receive, wait, encode = by_name["receive"], by_name["queue_wait"], by_name["encode"]
    trunk, head = by_name["trunk"], by_name["head"]
    assert call.start_time <= receive.start_time <= receive.end_time == wait.start_time
    assert wait.end_time == batch.start_time == trunk.start_time
    assert trunk.end_time == head.start_time <= head.end_time == batch.end_time == encode.start_time
    assert encode.end_time == call.end_time


def test_a_batch_links_every_call_it_served(traced: Any) -> None:
    calls = 48
    with (
        traced(max_queue_delay_ms=20.0) as (srv, exporter),
        grpc.insecure_channel(srv.target) as channel,
        futures.ThreadPoolExecutor(8) as pool,
    ):
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        _act(stub)
        exporter.clear()
        list(pool.map(lambda i: _act(stub, task=("cartpole", "acrobot")[i % 2]), range(calls)))
        spans = exporter.get_finished_spans()
        passes = srv.running.batcher.stats.passes

    call_ids = {s.context.span_id for s in _named(spans, "Act")}
    assert len(call_ids) == calls
    batches = _named(spans, "batch")
    linked = [link.context.span_id for b in batches for link in b.links]
    assert sorted(linked) == sorted(call_ids), "each call is linked from exactly one batch"
    for b in batches:
        assert b.parent is not None and b.parent.span_id in {link.context.span_id for link in b.links}
        assert b.attributes["polyhead.batch.traced_requests"] == len(b.links)
        assert b.attributes["polyhead.batch.requests"] == len(b.links)
    assert len(batches) <= passes
    for s in spans:
        if s.name in CALL_CHILDREN:
            assert s.parent.span_id in call_ids, s.name
    # Each call is its own trace (no traceparent was sent); its batch may be in another call's trace.
    assert len({s.context.trace_id for s in _named(spans, "Act")}) == calls


def test_sampled_out_calls_leave_no_span(traced: Any) -> None:
    with traced(tracing_sample_ratio=0.0) as (srv, exporter), grpc.insecure_channel(srv.target) as channel:
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        for _ in range(5):
            _act(stub)
        _act(stub, (("traceparent", _traceparent(sampled=False)[0]),))
        assert exporter.get_finished_spans() == ()
        # A caller's sampled trace keeps its decision whatever the server's own ratio.
        header, trace_id, _ = _traceparent(sampled=True)
        _act(stub, (("traceparent", header),))
        spans = exporter.get_finished_spans()
    assert len(_named(spans, "Act")) == 1 and {s.context.trace_id for s in spans} == {trace_id}


def test_a_failed_call_has_an_error_span_and_no_batch(traced: Any) -> None:
    with traced() as (srv, exporter), grpc.insecure_channel(srv.target) as channel:
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Act(
                policy_pb2.ActRequest(
                    task_id="no-such-task", observations=to_proto(observations("cartpole"))
                ),
                timeout=30,
            )
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        spans = exporter.get_finished_spans()
    (call,) = spans
    assert call.name == "Act" and call.status.status_code == StatusCode.ERROR
    assert call.attributes["rpc.grpc.status_code"] == "NOT_FOUND"
    assert "no-such-task" in (call.status.description or "")


def test_actstream_steps_are_traced_under_the_streams_traceparent(traced: Any) -> None:
    with traced() as (srv, exporter), grpc.insecure_channel(srv.target) as channel:
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        header, trace_id, parent_id = _traceparent()
        steps = [
            policy_pb2.StepRequest(
                task_id="cartpole", episode_id="ep-1", observation=to_proto(observations("cartpole", seed=i))
            )
            for i in range(3)
        ]
        responses = list(stub.ActStream(iter(steps), timeout=30, metadata=(("traceparent", header),)))
        assert len(responses) == 3
        spans = exporter.get_finished_spans()
    steps_spans = _named(spans, "ActStream")
    assert len(steps_spans) == 3
    assert all(s.parent.span_id == parent_id and s.context.trace_id == trace_id for s in steps_spans)
    assert len(_named(spans, "batch")) == 3 and len(_named(spans, "queue_wait")) == 3


def test_tracing_off_records_nothing(server_settings: Callable[..., Any]) -> None:
    exporter = InMemorySpanExporter()
    with (
        BackgroundServer(server_settings(), span_exporter=exporter) as srv,
        grpc.insecure_channel(srv.target) as channel,
    ):
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        _act(stub, (("traceparent", _traceparent()[0]),))
        act(stub, "acrobot", observations("acrobot", 4))
    assert exporter.get_finished_spans() == ()


_PROBE = """
import json, sys
import grpc
from polyhead.server.app import BackgroundServer
from polyhead.server.settings import ServerSettings
from polyhead.tensors import to_proto
from polyhead.v1 import policy_pb2, policy_pb2_grpc
settings = ServerSettings(bundle=sys.argv[1], host="127.0.0.1", port=0, admin_port=0, metrics_port=None,
                          watch_bundle=False)
with BackgroundServer(settings) as srv, grpc.insecure_channel(srv.target) as channel:
    request = policy_pb2.ActRequest(task_id="cartpole", observations=to_proto([0.0, 0.1, 0.0, -0.1]))
    policy_pb2_grpc.PolicyServiceStub(channel).Act(request, timeout=30)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry")))
"""


def test_tracing_off_never_imports_opentelemetry(tiny_bundle: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(tiny_bundle)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert json.loads(out.stdout.splitlines()[-1]) == []


_WITHOUT_OTEL = (
    without("opentelemetry")
    + """
from polyhead.cli import main
sys.exit(main(sys.argv[1:]))
"""
)


def test_tracing_on_without_the_extra_fails_in_one_line(tiny_bundle: Path) -> None:
    argv = ["serve", "--bundle", str(tiny_bundle), "--port", "0", "--admin-port", "0", "--no-metrics"]
    out = subprocess.run(
        [sys.executable, "-c", _WITHOUT_OTEL, *argv, "--tracing"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert "tracing is enabled" in line and "polyhead[tracing]" in line, line


# --- a real OTLP/gRPC collector ------------------------------------------------------------------------
class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.metadata: list[dict[str, str]] = []
        self.received = threading.Event()

    def Export(  # noqa: N802 (the OTLP service's method name)
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.requests.append(request)
        self.metadata.append(dict(context.invocation_metadata()))
        self.received.set()
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[tuple[dict[str, Any], Any]]:
        out = []
        for request in self.requests:
            for resource_spans in request.resource_spans:
                resource = {kv.key: kv.value.string_value for kv in resource_spans.resource.attributes}
                for scope in resource_spans.scope_spans:
                    out.extend((resource, span) for span in scope.spans)
        return out


@pytest.fixture
def collector() -> Iterator[tuple[_Collector, int]]:
    servicer = _Collector()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, port
    finally:
        server.stop(None)


def test_spans_reach_a_real_otlp_collector(
    server_settings: Callable[..., Any], collector: tuple[_Collector, int]
) -> None:
    servicer, port = collector
    settings = server_settings(
        tracing_enabled=True, tracing_endpoint=f"127.0.0.1:{port}", tracing_service_name="polyhead-test"
    )
    header, trace_id, parent_id = _traceparent()
    with BackgroundServer(settings) as srv, grpc.insecure_channel(srv.target) as channel:
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        for _ in range(3):
            _act(stub, (("traceparent", header),))
    # Stopping the server flushes the batch processor, so every span is at the collector now.
    spans = servicer.spans()
    names = sorted(span.name for _, span in spans)
    assert names.count("Act") == 3 and names.count("batch") == 3
    assert set(names) == {"Act", "receive", "queue_wait", "encode", "batch", "trunk", "head"}
    assert {resource["service.name"] for resource, _ in spans} == {"polyhead-test"}
    assert {int.from_bytes(span.trace_id, "big") for _, span in spans} == {trace_id}
    calls = [span for _, span in spans if span.name == "Act"]
    assert all(int.from_bytes(span.parent_span_id, "big") == parent_id for span in calls)
    assert all(
        span.end_time_unix_nano >= span.start_time_unix_nano > time.time_ns() - 600e9 for _, span in spans
    )


def test_serve_flags_set_the_tracing_settings(tiny_bundle: Path) -> None:
    from polyhead.cli import build_parser
    from polyhead.server.commands import settings_from_args

    argv = ["serve", "--bundle", str(tiny_bundle)]
    assert not settings_from_args(build_parser().parse_args(argv)).tracing_enabled
    traced = [
        *argv,
        "--tracing",
        "--tracing-endpoint",
        "collector:4317",
        "--tracing-sample-ratio",
        "0.25",
        "--tracing-service-name",
        "edge",
        "--tracing-tls",
    ]
    settings = settings_from_args(build_parser().parse_args(traced))
    assert settings.tracing_enabled and settings.tracing_endpoint == "collector:4317"
    assert settings.tracing_sample_ratio == 0.25 and settings.tracing_service_name == "edge"
    assert settings.tracing_uses_tls


def test_a_sample_ratio_outside_0_1_is_refused_in_one_line(tiny_bundle: Path) -> None:
    argv = ["serve", "--bundle", str(tiny_bundle), "--tracing", "--tracing-sample-ratio", "1.5"]
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from polyhead.cli import main; sys.exit(main(sys.argv[1:]))",
            *argv,
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    (line,) = out.stderr.strip().splitlines()
    assert "tracing_sample_ratio" in line, line


def test_an_unusable_collector_ca_is_refused_naming_the_setting(
    server_settings: Callable[..., Any], tmp_path: Path
) -> None:
    from polyhead.errors import UsageError
    from polyhead.server.tracing import build_tracer

    not_pem = tmp_path / "ca.txt"
    not_pem.write_text("hello")
    for ca, words in ((not_pem, "is not a PEM certificate"), (tmp_path / "missing.pem", "cannot read")):
        with pytest.raises(UsageError, match="tracing_ca") as info:
            build_tracer(server_settings(tracing_enabled=True, tracing_ca=ca))
        assert words in str(info.value)
