"""Refuses new calls with UNAVAILABLE once shutdown begins, and tells when the calls in progress are done.

gRPC's own ``server.stop(grace)`` refuses new calls too, but a call that reaches the transport at the moment
it stops is cancelled (the client sees CANCELLED, which clients do not retry) instead of refused. So the
server refuses new calls itself first, with UNAVAILABLE and a message saying why, waits for the calls in
progress to finish, and only then stops gRPC, when there is nothing left for it to cancel.

Health calls stay answered while draining (load balancers must keep seeing NOT_SERVING, not an error).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
_REFUSED = "the server is shutting down and takes no new calls; retry on another replica"


class DrainGate(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Counts the handlers running on the servers it is installed on; after :meth:`close`, refuses new calls.

    Use from the server's event loop only.
    """

    def __init__(self) -> None:
        self._closed = False
        self._running = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def running(self) -> int:
        return self._running

    def close(self) -> None:
        """From now on every new call (but health) ends at once with UNAVAILABLE."""
        self._closed = True

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no handler is running, at most ``timeout`` seconds; True when none is."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=max(timeout, 0.0))
        except TimeoutError:
            return False
        return True

    def _enter(self) -> None:
        self._running += 1
        self._idle.clear()

    def _leave(self) -> None:
        self._running -= 1
        if self._running == 0:
            self._idle.set()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(f"/{HEALTH_SERVICE}/"):
            return handler
        if self._closed:
            return _refusing(handler)
        return _counted(handler, self)


def _refusing(handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
    async def refuse(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(grpc.StatusCode.UNAVAILABLE, _REFUSED)

    return _same_kind(handler, refuse, refuse, refuse, refuse)


def _counted(handler: grpc.RpcMethodHandler[Any, Any], gate: DrainGate) -> grpc.RpcMethodHandler[Any, Any]:
    # gRPC tells streaming handlers by their kind of function, so each wrapper is a real ``async def``.
    def unary_response(behaviour: Any) -> Any:
        async def run(request: Any, context: Any) -> Any:
            gate._enter()
            try:
                return await behaviour(request, context)
            finally:
                gate._leave()

        return run

    def stream_response(behaviour: Any) -> Any:
        async def run(request: Any, context: Any) -> AsyncIterator[Any]:
            gate._enter()
            try:
                result = behaviour(request, context)
                if inspect.isasyncgen(result):
                    try:
                        async for reply in result:
                            yield reply
                    finally:
                        await result.aclose()  # on cancellation too, so the handler's cleanup runs now
                else:  # a handler that writes with context.write and returns None
                    await result
            finally:
                gate._leave()

        return run

    def bind(wrapper: Callable[[Any], Any], behaviour: Any) -> Any:
        return None if behaviour is None else wrapper(behaviour)

    return _same_kind(
        handler,
        bind(unary_response, handler.unary_unary),
        bind(stream_response, handler.unary_stream),
        bind(unary_response, handler.stream_unary),
        bind(stream_response, handler.stream_stream),
    )


def _same_kind(
    handler: grpc.RpcMethodHandler[Any, Any],
    unary_unary: Any,
    unary_stream: Any,
    stream_unary: Any,
    stream_stream: Any,
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same kind and (de)serialisers as ``handler`` that runs the matching behaviour."""
    codec = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary_unary, **codec)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(unary_stream, **codec)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(stream_unary, **codec)
    return grpc.stream_stream_rpc_method_handler(stream_stream, **codec)
