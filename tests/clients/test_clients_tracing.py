"""Trace propagation: with ``propagate_trace=True`` the caller's current span becomes the parent of the
server's call spans (sync and asyncio clients, unary Act and ActStream sessions); without it, or with no
span current, the server's spans start their own traces."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from polyhead.clients import AsyncPolicyClient, ChannelConfig, PolicyClient
from polyhead.server.app import BackgroundServer
from polyhead.server.settings import ServerSettings
from tests.contract.hidden_modules import without

OBS = np.array([0.01, -0.02, 0.03, 0.0], dtype=np.float32)


@pytest.fixture(scope="module")
def traced_server(clients_bundle: Path) -> Iterator[tuple[BackgroundServer, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    settings = ServerSettings(
        bundle=clients_bundle, host="127.0.0.1", port=0, admin_port=0, metrics_port=None, tracing_enabled=True
    )
    with BackgroundServer(settings, span_exporter=exporter) as srv:
        yield srv, exporter


@pytest.fixture
def server_spans(traced_server: tuple[BackgroundServer, InMemorySpanExporter]) -> InMemorySpanExporter:
    exporter = traced_server[1]
    exporter.clear()
    return exporter


@pytest.fixture(scope="module")
def client_tracer() -> Any:
    """The caller's own SDK (not the global provider): spans made current through the API's context."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    return provider.get_tracer("simulator")


def _calls(exporter: InMemorySpanExporter, name: str) -> list[Any]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def test_sync_client_act_and_session_continue_the_callers_trace(
    traced_server: Any, server_spans: InMemorySpanExporter, client_tracer: Any
) -> None:
    srv, _ = traced_server
    with PolicyClient(srv.target, propagate_trace=True) as client:
        client.list_tasks()
        with client_tracer.start_as_current_span("episode") as episode:
            client.act("cartpole", OBS)
            with client.session("cartpole") as session:
                session.step(OBS)
                session.step(OBS, reward=1.0)
    ours = episode.get_span_context()
    calls = _calls(server_spans, "Act") + _calls(server_spans, "ActStream")
    assert len(calls) == 3
    for call in calls:
        assert call.context.trace_id == ours.trace_id
        assert call.parent is not None and call.parent.span_id == ours.span_id and call.parent.is_remote


def test_async_client_act_and_session_continue_the_callers_trace(
    traced_server: Any, server_spans: InMemorySpanExporter, client_tracer: Any
) -> None:
    srv, _ = traced_server

    async def run() -> Any:
        async with AsyncPolicyClient(ChannelConfig(srv.target, propagate_trace=True)) as client:
            await client.list_tasks()
            with client_tracer.start_as_current_span("episode") as episode:
                await client.act("cartpole", OBS)
                async with await client.session("cartpole") as session:
                    await session.step(OBS)
            return episode.get_span_context()

    ours = asyncio.run(run())
    calls = _calls(server_spans, "Act") + _calls(server_spans, "ActStream")
    assert len(calls) == 2
    assert all(c.context.trace_id == ours.trace_id and c.parent.span_id == ours.span_id for c in calls)


def test_without_propagation_or_a_current_span_the_server_starts_its_own_trace(
    traced_server: Any, server_spans: InMemorySpanExporter, client_tracer: Any
) -> None:
    srv, _ = traced_server
    with PolicyClient(srv.target) as plain, PolicyClient(srv.target, propagate_trace=True) as propagating:
        with client_tracer.start_as_current_span("episode") as episode:
            plain.act("cartpole", OBS)
        propagating.act("cartpole", OBS)  # no span current: nothing to send
    calls = _calls(server_spans, "Act")
    assert len(calls) == 2
    assert all(c.parent is None for c in calls)
    assert episode.get_span_context().trace_id not in {c.context.trace_id for c in calls}


_WITHOUT_OTEL = (
    without("opentelemetry")
    + """
from polyhead.clients import ChannelConfig
ChannelConfig("127.0.0.1:1")  # fine without OpenTelemetry
try:
    ChannelConfig("127.0.0.1:1", propagate_trace=True)
except ImportError as exc:
    print(exc)
"""
)


def test_propagation_without_opentelemetry_says_what_to_install() -> None:
    out = subprocess.run([sys.executable, "-c", _WITHOUT_OTEL], capture_output=True, text=True, check=True)
    assert "propagate_trace=True needs OpenTelemetry" in out.stdout and "polyhead[tracing]" in out.stdout
