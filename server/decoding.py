"""Request decoding inside the handler, so malformed request bytes are the client's INVALID_ARGUMENT.

gRPC decodes a unary request before the handler runs and reports a decoding failure as UNKNOWN; the
per-method wrapper (:func:`polyhead.server.calls.wrap`) registers the handler without a deserializer and
decodes the raw bytes with :func:`decode_or_abort`. Streaming requests are decoded as the servicer
iterates, where ``polyhead.server.status`` maps protobuf's ``DecodeError`` to INVALID_ARGUMENT.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

Context = grpc.aio.ServicerContext[Any, Any]


async def decode_or_abort(decode: Callable[[bytes], Any], raw: bytes, context: Context) -> Any:
    """``decode(raw)``, or abort the call with INVALID_ARGUMENT naming what protobuf found wrong."""
    try:
        return decode(raw)
    except Exception as exc:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request message: {exc}")
