"""Counts unary RPCs in progress, from the moment gRPC accepts a call until its handler returns.

The batcher uses the count as its signal that requests are arriving: a call accepted by gRPC is counted
before its request message is even read, so while other calls are in progress the batcher waits (briefly,
and only while the queue keeps growing) for them to join the next trunk pass; with no other call in
progress a request runs at once. A server interceptor is the one place that sees calls that early.

A call cancelled by its client after gRPC accepted it but before its message was read never reaches its
handler; such entries are forgotten after ``stale_after_s``, so the count heals itself.

:meth:`InflightCounter.handling` counts only calls whose handler is running (decremented when it returns,
is cancelled or fails): exact at every moment, so it is what the ``max_inflight_calls`` bound uses (a burst
of cancelled calls cannot hold it up for ``stale_after_s``).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

_PURGE_EVERY_S = 1.0


class InflightCounter(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Counts calls in progress to the unary methods in ``methods`` (full names, ``/pkg.Service/Method``).

    Calling the object returns the count. Use from the server's event loop only.
    """

    def __init__(self, methods: frozenset[str], *, stale_after_s: float = 60.0) -> None:
        self._methods = methods
        self._stale_after_s = stale_after_s
        self._calls: dict[int, float] = {}  # call token -> time accepted
        self._next_token = 0
        self._last_purge = time.monotonic()
        self._handling = 0

    def __call__(self) -> int:
        now = time.monotonic()
        if now - self._last_purge > _PURGE_EVERY_S:
            self._last_purge = now
            limit = now - self._stale_after_s
            for token in [t for t, accepted in self._calls.items() if accepted < limit]:
                del self._calls[token]
        return len(self._calls)

    def handling(self) -> int:
        """Calls whose handler is running now (a subset of the count)."""
        return self._handling

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler_call_details.method not in self._methods or handler is None or handler.unary_unary is None:
            return handler
        token = self._next_token
        self._next_token += 1
        self._calls[token] = time.monotonic()
        behaviour: Any = handler.unary_unary  # an async callable on a grpc.aio server
        calls = self._calls

        async def counted(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            self._handling += 1
            try:
                return await behaviour(request, context)
            finally:
                self._handling -= 1
                calls.pop(token, None)

        return grpc.unary_unary_rpc_method_handler(
            counted,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
