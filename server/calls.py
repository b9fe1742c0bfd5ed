"""Per-call cross-cutting work, wrapped around each method's handler once, when the service is registered.

gRPC interceptors run a chain of coroutines and build a new method handler for every call; on the data
plane that was measurable per-call cost. Instead each method's handler is wrapped here once, at
registration, in one ``async def`` that does, in this order (the order the interceptors had):

1. refuse with UNAVAILABLE once draining started (:class:`polyhead.server.draining.DrainGate`; health
   stays answered);
2. count the running handler for the drain (all methods but health) and, for ``Act``, the Act calls in
   progress (:class:`polyhead.server.inflight.InflightCounter`, which counts a call from its lookup in
   :class:`CountingHandlers`, before its message is read);
3. check the admin bearer token on guarded methods (:mod:`polyhead.server.auth`);
4. decode a unary request inside the handler, so malformed bytes are INVALID_ARGUMENT
   (:mod:`polyhead.server.decoding`).

A method that needs none of it (health) keeps its handler as it is.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc

from polyhead.server.auth import TokenCheck
from polyhead.server.decoding import decode_or_abort
from polyhead.server.draining import HEALTH_SERVICE, DrainGate
from polyhead.server.inflight import InflightCounter

Context = grpc.aio.ServicerContext[Any, Any]
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


@dataclass(frozen=True)
class CallPolicy:
    """What every call to one server goes through. ``counted``: full method names whose calls the
    in-flight counter counts; ``token``: the admin token check, None when calls need no token."""

    gate: DrainGate
    inflight: InflightCounter | None = None
    counted: frozenset[str] = frozenset()
    token: TokenCheck | None = None


class _Capture:
    """Stands in for a server while a generated ``add_*_to_server`` function registers its handlers."""

    def __init__(self) -> None:
        self.services: dict[str, dict[str, Handler]] = {}
        self.generic: list[grpc.GenericRpcHandler[Any, Any]] = []

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler[Any, Any]]) -> None:
        self.generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Handler]) -> None:
        self.services[service] = dict(handlers)


def register(server: grpc.aio.Server, policy: CallPolicy, add: Callable[..., None], *args: Any) -> None:
    """Run ``add(*args, server_like)`` (a generated ``add_FooServicer_to_server`` with its servicer, or
    ``enable_server_reflection`` with its names) and register the handlers it adds on ``server``, each
    wrapped once under ``policy``."""
    capture = _Capture()
    add(*args, capture)
    if not capture.services:  # an add function without per-method handlers: nothing to wrap
        server.add_generic_rpc_handlers(tuple(capture.generic))
        return
    for service, handlers in capture.services.items():
        wrapped = {name: wrap(f"/{service}/{name}", handler, policy) for name, handler in handlers.items()}
        if policy.inflight is not None and any(f"/{service}/{name}" in policy.counted for name in wrapped):
            # Looked up per call, when gRPC accepts it: the moment the in-flight count starts.
            server.add_generic_rpc_handlers((CountingHandlers(service, wrapped, policy),))
            continue
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, wrapped),))
        # Registered methods skip the per-call lookup of generic handlers (stubs lack the method).
        server.add_registered_method_handlers(service, wrapped)  # type: ignore[attr-defined]


class CountingHandlers(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """One service's (wrapped) handlers; a call to a counted method is counted as accepted on lookup,
    which gRPC does before it reads the request message."""

    def __init__(self, service: str, handlers: dict[str, Handler], policy: CallPolicy) -> None:
        self._handlers = {f"/{service}/{name}": handler for name, handler in handlers.items()}
        self._counted = policy.counted
        assert policy.inflight is not None
        self._accept = policy.inflight.accept

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        method = handler_call_details.method
        handler = self._handlers.get(method)
        if handler is not None and method in self._counted:
            self._accept()
        return handler


def wrap(method: str, handler: Handler, policy: CallPolicy) -> Handler:
    """``handler`` with the per-call steps of the module docstring, built once."""
    if method.startswith(f"/{HEALTH_SERVICE}/"):
        return handler
    gate = policy.gate
    inflight = policy.inflight if method in policy.counted else None
    token = policy.token if policy.token is not None and policy.token.guards(method) else None
    decode = None if handler.request_streaming else handler.request_deserializer
    codec = {
        # A unary request reaches the wrapper as raw bytes: it decodes them itself (step 4).
        "request_deserializer": None if decode is not None else handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None or handler.stream_unary is not None:
        unary_behaviour: Any = handler.unary_unary or handler.stream_unary

        async def unary_response(request: Any, context: Context) -> Any:
            if gate.closed:
                if inflight is not None:
                    inflight.forget()  # counted on lookup; its handler ends here
                await gate.refuse(context)
            gate.enter()
            if inflight is not None:
                inflight.enter()
            try:
                if token is not None:
                    await token.check(context)
                if decode is not None:
                    request = await decode_or_abort(decode, request, context)
                return await unary_behaviour(request, context)
            finally:
                if inflight is not None:
                    inflight.leave()
                gate.leave()

        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(unary_response, **codec)
        return grpc.stream_unary_rpc_method_handler(unary_response, **codec)

    stream_behaviour: Any = handler.unary_stream or handler.stream_stream

    # gRPC tells streaming handlers by their kind of function, so this is a real async generator.
    async def stream_response(request: Any, context: Context) -> AsyncIterator[Any]:
        if gate.closed:
            await gate.refuse(context)
        gate.enter()
        try:
            if token is not None:
                await token.check(context)
            if decode is not None:
                request = await decode_or_abort(decode, request, context)
            result = stream_behaviour(request, context)
            if inspect.isasyncgen(result):
                try:
                    async for reply in result:
                        yield reply
                finally:
                    await result.aclose()  # on cancellation too, so the handler's cleanup runs now
            else:  # a handler that writes with context.write and returns None
                await result
        finally:
            gate.leave()

    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(stream_response, **codec)
    return grpc.stream_stream_rpc_method_handler(stream_response, **codec)
