"""Counts unary RPCs in progress, from the moment gRPC accepts a call until its response is sent.

The batcher uses the count as its signal that requests are arriving: a call accepted by gRPC is counted
before its request message is even read, so while other calls are in progress the batcher waits (briefly,
and only while the queue keeps growing) for them to join the next trunk pass; with no other call in
progress a request runs at once. A server interceptor is the one place that sees calls that early.

Known limit: a call cancelled by its client after gRPC accepted it but before its request message was read
never reaches the handler and stays counted; the count then only makes lone requests take the batching
path (correct, a little slower).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc


class InflightCounter(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Counts calls in progress to the unary methods in ``methods`` (full names, ``/pkg.Service/Method``)."""

    def __init__(self, methods: frozenset[str]) -> None:
        self._methods = methods
        self.count = 0
        self._wrapped: dict[int, grpc.RpcMethodHandler[Any, Any]] = {}

    def __call__(self) -> int:
        return self.count

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler_call_details.method not in self._methods or handler is None or handler.unary_unary is None:
            return handler
        self.count += 1  # released when the wrapped behaviour returns (response sent) or fails
        wrapped = self._wrapped.get(id(handler))
        if wrapped is None:
            wrapped = self._wrap(handler)
            self._wrapped[id(handler)] = wrapped
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        behaviour: Any = handler.unary_unary  # an async callable on a grpc.aio server
        decode = handler.request_deserializer

        async def counted(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            # The request is decoded here rather than by gRPC, so a malformed message still releases the
            # count and gets INVALID_ARGUMENT (gRPC's own decoding failure would be INTERNAL).
            try:
                try:
                    request = decode(raw) if decode is not None else raw
                except Exception as exc:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request message: {exc}")
                return await behaviour(request, context)
            finally:
                self.count -= 1

        return grpc.unary_unary_rpc_method_handler(counted, response_serializer=handler.response_serializer)
