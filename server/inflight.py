"""Counts unary ``Act`` calls in progress, from the moment gRPC accepts a call until its handler returns.

The batcher uses the count as its signal that requests are arriving: a call accepted by gRPC is counted
before its request message is even read (:class:`polyhead.server.calls.CountingHandlers` looks the method
up then), so while more calls are in progress than the batcher holds, a pass waits a loop turn at a time
(briefly, bounded by ``max_queue_delay``) for them to join it.

A call cancelled by its client after gRPC accepted it but before its message was read never reaches its
handler; such entries are forgotten after ``stale_after_s``, so the count heals itself.

:meth:`InflightCounter.handling` counts only calls whose handler is running (decremented when it returns,
is cancelled or fails): exact at every moment, so it is what the ``max_inflight_calls`` bound uses (a burst
of cancelled calls cannot hold it up for ``stale_after_s``).
"""

from __future__ import annotations

import collections
import time


class InflightCounter:
    """Calling the object returns the count. Use from the server's event loop only."""

    def __init__(self, *, stale_after_s: float = 60.0) -> None:
        self._stale_after_s = stale_after_s
        # When each accepted call whose handler has not started was accepted, oldest first. Handlers start
        # roughly in acceptance order; which entry a starting handler removes does not change the count.
        self._accepted: collections.deque[float] = collections.deque()
        self._handling = 0

    def __call__(self) -> int:
        accepted = self._accepted
        if accepted and accepted[0] < time.monotonic() - self._stale_after_s:
            limit = time.monotonic() - self._stale_after_s
            while accepted and accepted[0] < limit:
                accepted.popleft()
        return len(accepted) + self._handling

    def handling(self) -> int:
        """Calls whose handler is running now (a subset of the count)."""
        return self._handling

    def accept(self) -> None:
        """gRPC accepted a call (its message is not read yet)."""
        self._accepted.append(time.monotonic())

    def enter(self) -> None:
        """A call's handler starts."""
        if self._accepted:
            self._accepted.popleft()
        self._handling += 1

    def forget(self) -> None:
        """A call counted on acceptance ends before its handler starts (refused while draining)."""
        if self._accepted:
            self._accepted.popleft()

    def leave(self) -> None:
        self._handling -= 1
