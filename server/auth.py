"""Bearer-token check for the control plane, as a gRPC server interceptor.

When a token is configured, every call to a guarded service (``polyhead.v1.HeadAdmin``) needs the metadata
``authorization: Bearer <token>``; anything else ends with ``UNAUTHENTICATED`` before the servicer runs.
Other services on the same server (health, reflection, the data plane in ``admin_mode="shared"``) pass.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

GUARDED_PREFIX = "/polyhead.v1.HeadAdmin/"


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Refuses calls to ``/polyhead.v1.HeadAdmin/*`` that lack the configured bearer token."""

    def __init__(self, token: str, *, guarded_prefix: str = GUARDED_PREFIX) -> None:
        self._expected = f"Bearer {token}".encode()
        self._prefix = guarded_prefix

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        method = handler_call_details.method
        if not method.startswith(self._prefix):
            return await continuation(handler_call_details)
        supplied = b""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                supplied = value.encode() if isinstance(value, str) else value
        if hmac.compare_digest(supplied, self._expected):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        why = "missing" if not supplied else "wrong"
        return _denial(handler, f"{why} admin token: send metadata `authorization: Bearer <token>`")


def _denial(handler: grpc.RpcMethodHandler[Any, Any] | None, message: str) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same streaming kind as ``handler`` that aborts with UNAUTHENTICATED."""

    async def abort(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def abort_stream(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    if handler is not None and handler.response_streaming:
        if handler.request_streaming:
            return grpc.stream_stream_rpc_method_handler(abort_stream)
        return grpc.unary_stream_rpc_method_handler(abort_stream)
    if handler is not None and handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)
