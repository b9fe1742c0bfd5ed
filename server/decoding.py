"""Request decoding inside the handler, so malformed request bytes are the client's INVALID_ARGUMENT.

gRPC decodes a unary request before the handler runs and reports a decoding failure as UNKNOWN; this
interceptor hands the raw bytes to a wrapper that decodes them and aborts with INVALID_ARGUMENT on
failure. Streaming requests are decoded as the servicer iterates, where ``polyhead.server.status`` maps
protobuf's
``DecodeError`` to INVALID_ARGUMENT.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

Context = grpc.aio.ServicerContext[Any, Any]


async def _decode(decode: Callable[[bytes], Any], raw: bytes, context: Context) -> Any:
    try:
        return decode(raw)
    except Exception as exc:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request message: {exc}")


class DecodeRequests(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Wraps the unary-request handlers of methods under ``prefix`` (default: every polyhead service)."""

    def __init__(self, prefix: str = "/polyhead.v1.") -> None:
        self._prefix = prefix

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if (
            handler is None
            or not handler_call_details.method.startswith(self._prefix)
            or handler.request_streaming
            or handler.request_deserializer is None
        ):
            return handler
        decode = handler.request_deserializer
        serialize = handler.response_serializer
        if handler.unary_unary is not None:
            unary: Any = handler.unary_unary

            async def unary_unary(raw: bytes, context: Context) -> Any:
                return await unary(await _decode(decode, raw, context), context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, response_serializer=serialize)
        streaming: Any = handler.unary_stream

        async def unary_stream(raw: bytes, context: Context) -> AsyncIterator[Any]:
            async for item in streaming(await _decode(decode, raw, context), context):
                yield item

        return grpc.unary_stream_rpc_method_handler(unary_stream, response_serializer=serialize)
