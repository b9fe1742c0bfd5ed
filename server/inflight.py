"""Counts ``Act`` calls whose handler is running (from the moment the handler starts until it returns, is
cancelled or fails).

The count is exact at every moment, so it is what the ``max_inflight_calls`` bound uses, and the batcher
reads it to tell a lone client (a pass runs at once on the event-loop thread) from concurrent callers. The
per-call :func:`polyhead.server.calls.wrap` wrapper keeps it; it used to be a server interceptor that also
counted calls accepted but not yet read, which cost an interceptor chain on every call and gave the
batcher nothing its per-turn gathering does not (see :mod:`polyhead.server.batcher`).
"""

from __future__ import annotations


class InflightCounter:
    """Calling the object returns the count. Use from the server's event loop only."""

    __slots__ = ("_handling",)

    def __init__(self) -> None:
        self._handling = 0

    def __call__(self) -> int:
        return self._handling

    def handling(self) -> int:
        """Calls whose handler is running now (the same as the count)."""
        return self._handling

    def enter(self) -> None:
        self._handling += 1

    def leave(self) -> None:
        self._handling -= 1
