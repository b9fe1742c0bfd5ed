"""Refuses new calls with UNAVAILABLE once shutdown begins, and tells when the calls in progress are done.

gRPC's own ``server.stop(grace)`` refuses new calls too, but a call that reaches the transport at the moment
it stops is cancelled (the client sees CANCELLED, which clients do not retry) instead of refused. So the
server refuses new calls itself first, with UNAVAILABLE and a message saying why, waits for the calls in
progress to finish, and only then stops gRPC, when there is nothing left for it to cancel.

Health calls stay answered while draining (load balancers must keep seeing NOT_SERVING, not an error).
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
_REFUSED = "the server is shutting down and takes no new calls; retry on another replica"


class DrainGate:
    """Counts the handlers running on the servers it guards; after :meth:`close`, refuses new calls.

    The per-call steps live in :mod:`polyhead.server.calls` (one wrapper per method, built at registration).
    Use from the server's event loop only.
    """

    def __init__(self) -> None:
        self.closed = False
        self._running = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def running(self) -> int:
        return self._running

    def close(self) -> None:
        """From now on every new call (but health) ends at once with UNAVAILABLE."""
        self.closed = True

    async def refuse(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(grpc.StatusCode.UNAVAILABLE, _REFUSED)

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no handler is running, at most ``timeout`` seconds; True when none is."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=max(timeout, 0.0))
        except TimeoutError:
            return False
        return True

    def enter(self) -> None:
        self._running += 1
        self._idle.clear()

    def leave(self) -> None:
        self._running -= 1
        if self._running == 0:
            self._idle.set()
