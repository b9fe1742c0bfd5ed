"""``grpc.health.v1`` for the server: grpc's asyncio servicer, plus health watches that end at shutdown.

A ``Watch`` call is endless by design. During a graceful stop the server waits for every call in flight,
so one open watch (grpc's client-side health checking keeps one per connection) would hold every
shutdown for the whole grace period. :meth:`HealthServicer.end_watches`, called once new calls are
refused, sends each watcher the final status and ends its call with OK: the watcher has seen NOT_SERVING,
and a new watch is refused like any other new call.
"""

from __future__ import annotations

import asyncio
from typing import Any

from grpc_health.v1 import health, health_pb2


class HealthServicer(health.aio.HealthServicer):  # type: ignore[misc,name-defined]
    """grpc's asyncio ``HealthServicer`` (``set``, ``enter_graceful_shutdown``, ``Check``, ``Watch``) whose
    ``Watch`` calls end when :meth:`end_watches` is called."""

    def __init__(self) -> None:
        super().__init__()
        self._watches_end = asyncio.Event()

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:  # noqa: N802 (gRPC's name)
        watch = asyncio.ensure_future(super().Watch(request, context))
        ending = asyncio.ensure_future(self._watches_end.wait())
        try:
            await asyncio.wait({watch, ending}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (watch, ending):
                task.cancel()
            await asyncio.gather(watch, ending, return_exceptions=True)
        if self._watches_end.is_set():
            # The inner watch may not have had its turn to write the last change: send it (a repeated
            # status is harmless to a watcher), then end the call with OK.
            status = self._server_status.get(request.service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            await context.write(health_pb2.HealthCheckResponse(status=status))

    def end_watches(self) -> None:
        """End every open and future ``Watch`` call after one last status message."""
        self._watches_end.set()
