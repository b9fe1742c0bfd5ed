"""Trace propagation: the caller's current OpenTelemetry span travels to the server as W3C ``traceparent``.

``ChannelConfig(propagate_trace=True)`` wraps its channels with these interceptors: every call (unary or
streaming, sync or asyncio) carries the ``traceparent`` (and ``tracestate``) of the span current when the
call starts, so a server with tracing on makes its call span a child of the caller's. Nothing is added
when no span is current. Needs ``opentelemetry-api`` (``pip install 'polyhead[tracing]'``); the caller's
own SDK setup (exporter, sampler) is its business.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import grpc
import grpc.aio

INSTALL_HINT = "pip install 'polyhead[tracing]'"


def _injector() -> Callable[[], list[tuple[str, str]]]:
    """The function that reads the current context's trace headers. Raises ImportError (with the install
    hint) without opentelemetry-api."""
    try:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError as exc:
        raise ImportError(
            f"propagate_trace=True needs OpenTelemetry ({exc.name or exc}): {INSTALL_HINT}"
        ) from exc
    propagator = TraceContextTextMapPropagator()

    def headers() -> list[tuple[str, str]]:
        carrier: dict[str, str] = {}
        propagator.inject(carrier)  # nothing when no valid span is current
        return list(carrier.items())

    return headers


def _with_headers(metadata: Any, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    kept = [(k, v) for k, v in (metadata or ()) if k not in ("traceparent", "tracestate")]
    return [*kept, *headers]


class _Details(
    collections.namedtuple(
        "_Details", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


class SyncPropagator(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamStreamClientInterceptor,  # type: ignore[type-arg]
):
    """Adds the current trace headers to every call of a ``grpc.Channel``."""

    def __init__(self) -> None:
        self._headers = _injector()

    def _details(self, details: Any) -> Any:
        headers = self._headers()
        if not headers:
            return details
        return _Details(
            details.method,
            details.timeout,
            _with_headers(details.metadata, headers),
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(details), request_iterator)


class _AioBase:
    def __init__(self) -> None:
        self._headers = _injector()

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        headers = self._headers()
        if not headers:
            return details
        return grpc.aio.ClientCallDetails(
            details.method,
            details.timeout,
            grpc.aio.Metadata(*_with_headers(details.metadata, headers)),
            details.credentials,
            details.wait_for_ready,
        )


class _AioUnaryUnary(_AioBase, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _AioUnaryStream(_AioBase, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _AioStreamUnary(_AioBase, grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[type-arg]
    async def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(details), request_iterator)


class _AioStreamStream(_AioBase, grpc.aio.StreamStreamClientInterceptor):  # type: ignore[type-arg]
    async def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(details), request_iterator)


def aio_propagators() -> list[Any]:
    """One interceptor per call kind: a ``grpc.aio`` channel routes each kind to its own class."""
    return [_AioUnaryUnary(), _AioUnaryStream(), _AioStreamUnary(), _AioStreamStream()]
