"""OpenTelemetry spans for data-plane calls: off by default, and then one attribute check per call.

With ``tracing_enabled`` every ``Act`` call and every ``ActStream`` step that the sampler keeps yields:

* a per-call span (``Act`` / ``ActStream``, kind SERVER) whose parent comes from the W3C ``traceparent``
  (and ``tracestate``) in the call's metadata, so a client's trace continues into the server;
* its children ``receive`` (handler entry to queued: decoding, head resolution, validation),
  ``queue_wait`` (queued to the start of the pass that served it) and ``encode`` (the pass's result to
  the response built: resuming the call, recording experience, building the protobuf);
* per inference pass, one ``batch`` span with children ``trunk`` (input encoders and the trunk pass) and
  ``head`` (every head group's pass and action selection). One pass serves many calls, so the batch span
  carries a span link to every traced call it served; its parent is the first of them (a lone call's
  trace nests ``batch`` under ``Act``, and the other calls' traces reach it through their links).

Spans go to an OTLP/gRPC collector through a ``BatchSpanProcessor`` (export happens on the SDK's own
thread, never on the event loop); tests inject an exporter instead. OpenTelemetry is imported only here and
only when tracing is enabled: with it off, a server process never imports it.

The hooks elsewhere are small on purpose: the servicers route a call through :meth:`Tracer.call` when
``tracer.enabled``; the batcher stores :func:`current_call` on the queued request and reports each pass
through :meth:`Tracer.record_pass`; assembly builds the tracer with :func:`build_tracer`.
"""

from __future__ import annotations

import contextvars
import random
import time
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from polyhead.errors import UsageError

if TYPE_CHECKING:
    from polyhead.server.settings import ServerSettings

T = TypeVar("T")

# The traced call that the running task serves; read by the batcher when it queues the request (asyncio
# copies the context into tasks, so the request's own task sees its call even under asyncio.gather).
_CURRENT: contextvars.ContextVar[CallTrace | None] = contextvars.ContextVar(
    "polyhead_call_trace", default=None
)

INSTALL_HINT = "pip install 'polyhead[tracing]'"


def current_call() -> CallTrace | None:
    """The traced call of the running task, or None (not traced, or sampled out)."""
    return _CURRENT.get()


class CallTrace:
    """One sampled call: its span, the context its children start from, and its clock.

    Times inside the server are ``time.perf_counter()`` readings (the batcher already takes them); a call
    converts them to the epoch nanoseconds spans carry with the offset read when the call started.
    """

    __slots__ = ("answered", "context", "offset_ns", "span", "started")

    def __init__(self, span: Any, context: Any, started: float, offset_ns: int) -> None:
        self.span = span
        self.context = context
        self.started = started
        self.offset_ns = offset_ns
        self.answered: float | None = None  # when the pass that served it ended

    def ns(self, t: float) -> int:
        return int(t * 1e9) + self.offset_ns


class QueuedWork(Protocol):
    """What :meth:`Tracer.record_pass` reads from a queued request (``polyhead.server.batcher._Work``)."""

    @property
    def trace(self) -> CallTrace | None: ...
    @property
    def enqueued(self) -> float: ...
    @property
    def head(self) -> Any: ...


class Tracer:
    """Tracing switched off: ``enabled`` is False and nothing else is ever called."""

    enabled = False

    async def call(self, method: str, context: Any, work: Awaitable[T]) -> T:
        """Run ``work`` (the handler's coroutine) as the traced call ``method``; see :class:`OtelTracer`."""
        del method, context  # nothing to record
        return await work

    def record_pass(
        self,
        batch: Sequence[QueuedWork],
        started: float,
        trunk_done: float | None,
        ended: float,
        *,
        rows: int,
        error: BaseException | None = None,
    ) -> None:
        """Spans for one inference pass over ``batch`` (perf_counter times); see :class:`OtelTracer`."""

    def shutdown(self) -> None:
        """Export what is buffered and stop (at server stop)."""


DISABLED = Tracer()


class OtelTracer(Tracer):
    """Tracing on, through the OpenTelemetry SDK. Build it with :func:`build_tracer`."""

    enabled = True

    def __init__(self, provider: Any, *, sample_ratio: float = 1.0) -> None:
        """``provider`` samples every root it is asked for: the ratio is applied here first (below)."""
        from opentelemetry import trace
        from opentelemetry.trace import Link, SpanKind, Status, StatusCode
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._provider = provider
        self._ratio = sample_ratio
        self._draw = random.Random().random
        self._span_of = trace.get_current_span
        self._tracer = provider.get_tracer("polyhead.server")
        self._propagator = TraceContextTextMapPropagator()
        self._in_context = trace.set_span_in_context
        self._link = Link
        self._server = SpanKind.SERVER
        self._status = Status
        self._error_code = StatusCode.ERROR

    # --- calls (event-loop thread) ------------------------------------------------------------------------
    def _start(self, method: str, metadata: Any) -> CallTrace | None:
        """The call's trace, or None when it is not sampled.

        The sampling decision is ParentBased(TraceIdRatioBased(ratio)), taken here before the SDK is asked
        for a span: an unsampled call then costs a metadata scan and a random draw, where the SDK would
        generate ids and build a non-recording span (several times that, on the hot path)."""
        carrier = {key: value for key, value in metadata or () if key in ("traceparent", "tracestate")}
        parent = self._propagator.extract(carrier) if carrier else None
        caller = self._span_of(parent).get_span_context() if parent is not None else None
        if caller is not None and caller.is_valid:
            if not caller.trace_flags.sampled:
                return None  # the caller decided: not sampled
        elif self._ratio < 1.0 and self._draw() >= self._ratio:
            return None
        started = time.perf_counter()
        start_ns = time.time_ns()
        span = self._tracer.start_span(
            method,
            context=parent,
            kind=self._server,
            start_time=start_ns,
            attributes={
                "rpc.system": "grpc",
                "rpc.service": "polyhead.v1.PolicyService",
                "rpc.method": method,
            },
        )
        return CallTrace(span, self._in_context(span), started, start_ns - int(started * 1e9))

    async def call(self, method: str, context: Any, work: Awaitable[T]) -> T:
        """Run ``work`` inside a span for ``method`` whose parent is the metadata's ``traceparent``.

        The span ends when ``work`` does, with ERROR status and the gRPC code when it raises."""
        trace = self._start(method, context.invocation_metadata())
        if trace is None:
            return await work
        token = _CURRENT.set(trace)
        try:
            response = await work
        except BaseException as exc:
            self._end(trace, exc)
            raise
        finally:
            _CURRENT.reset(token)
        self._end(trace, None)
        return response

    def _end(self, trace: CallTrace, exc: BaseException | None) -> None:
        span = trace.span
        end = time.perf_counter()
        if trace.answered is not None:
            self._tracer.start_span("encode", context=trace.context, start_time=trace.ns(trace.answered)).end(
                end_time=trace.ns(end)
            )
        if exc is not None:
            from polyhead.server.status import status_for

            # CancelledError (the client went away) is a BaseException; every other error has its code.
            code = status_for(exc).name if isinstance(exc, Exception) else "CANCELLED"
            span.set_attribute("rpc.grpc.status_code", code)
            span.set_status(self._status(self._error_code, f"{code}: {exc}"))
        else:
            span.set_attribute("rpc.grpc.status_code", "OK")
        span.end(end_time=trace.ns(end))

    # --- passes (inference thread, or the loop thread for an inline pass) ---------------------------------
    def record_pass(
        self,
        batch: Sequence[QueuedWork],
        started: float,
        trunk_done: float | None,
        ended: float,
        *,
        rows: int,
        error: BaseException | None = None,
    ) -> None:
        """``receive`` and ``queue_wait`` for each traced call of ``batch``, then one ``batch`` span (linked
        to every traced call, parented by the first) with ``trunk`` and ``head`` children. ``trunk_done``
        None: the pass failed before the trunk finished (``error`` says why). Nothing when no call of the
        batch is traced."""
        traced = [w for w in batch if w.trace is not None]
        if not traced:
            return
        links = []
        seen: set[int] = set()
        for work in traced:
            trace = work.trace
            assert trace is not None
            trace.answered = ended
            self._tracer.start_span("receive", context=trace.context, start_time=trace.ns(trace.started)).end(
                end_time=trace.ns(work.enqueued)
            )
            self._tracer.start_span(
                "queue_wait", context=trace.context, start_time=trace.ns(work.enqueued)
            ).end(end_time=trace.ns(started))
            if id(trace) not in seen:  # a call split over two versions queues twice
                seen.add(id(trace))
                links.append(self._link(trace.span.get_span_context()))
        first = traced[0].trace
        assert first is not None
        tasks = sorted({f"{w.head.task_id}@{w.head.version}" for w in batch})
        span = self._tracer.start_span(
            "batch",
            context=first.context,
            links=links,
            start_time=first.ns(started),
            attributes={
                "polyhead.batch.requests": len(batch),
                "polyhead.batch.traced_requests": len(traced),
                "polyhead.batch.rows": rows,
                "polyhead.batch.heads": tasks,
            },
        )
        inner = self._in_context(span)
        if trunk_done is not None:
            self._tracer.start_span("trunk", context=inner, start_time=first.ns(started)).end(
                end_time=first.ns(trunk_done)
            )
            self._tracer.start_span(
                "head", context=inner, start_time=first.ns(trunk_done), attributes={"polyhead.heads": tasks}
            ).end(end_time=first.ns(ended))
        if error is not None:
            span.set_status(self._status(self._error_code, f"{type(error).__name__}: {error}"))
        span.end(end_time=first.ns(ended))

    def shutdown(self) -> None:
        self._provider.shutdown()  # flushes the batch processor: spans of the last calls are not lost


def build_tracer(settings: ServerSettings, *, exporter: Any = None) -> Tracer:
    """:data:`DISABLED` unless ``settings.tracing_enabled``; then an :class:`OtelTracer` exporting over
    OTLP/gRPC to ``settings.tracing_endpoint`` (or to ``exporter``, e.g. an in-memory one in tests, through
    a synchronous processor so spans are there when the call returns).

    Raises UsageError when tracing is enabled but OpenTelemetry is not installed, or the CA is unreadable.
    """
    if not settings.tracing_enabled:
        return DISABLED
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.sdk.trace.sampling import ALWAYS_ON
    except ImportError as exc:
        raise UsageError(
            f"tracing is enabled (--tracing, POLYHEAD_TRACING_ENABLED) but OpenTelemetry is not installed "
            f"({exc.name or exc}): {INSTALL_HINT}, or leave tracing off"
        ) from None
    from polyhead import __version__

    provider = TracerProvider(
        resource=Resource.create(
            {"service.name": settings.tracing_service_name, "service.version": __version__}
        ),
        # The tracer decides (a caller's sampled or unsampled trace keeps its decision; a call without one
        # is kept at the ratio) before it asks for a span; every span it asks for is recorded.
        sampler=ALWAYS_ON,
    )
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        provider.add_span_processor(BatchSpanProcessor(_otlp_exporter(settings)))
    return OtelTracer(provider, sample_ratio=settings.tracing_sample_ratio)


def _otlp_exporter(settings: ServerSettings) -> Any:
    try:
        import grpc
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        raise UsageError(
            f"tracing is enabled but the OTLP/gRPC exporter is not installed ({exc.name or exc}): "
            f"{INSTALL_HINT}"
        ) from None
    if not settings.tracing_uses_tls:
        return OTLPSpanExporter(endpoint=settings.tracing_endpoint, insecure=True)
    roots = _read_ca(settings.tracing_ca) if settings.tracing_ca is not None else None
    return OTLPSpanExporter(
        endpoint=settings.tracing_endpoint,
        insecure=False,
        credentials=grpc.ssl_channel_credentials(root_certificates=roots),
    )


def _read_ca(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(
            f"cannot read tracing_ca (--tracing-ca) {path}: {exc.strerror or exc}; give a readable PEM file"
        ) from exc
    if b"-----BEGIN CERTIFICATE" not in data:
        raise UsageError(f"tracing_ca (--tracing-ca) {path} is not a PEM certificate; give the PEM file")
    return data
