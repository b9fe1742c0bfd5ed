"""Read a request stream ahead of its consumer, handing it over in batches.

A bulk ``LoadHeads`` stream loads each head in a worker thread; a thread hop per head was a fifth of the
server's time for it. :func:`read_ahead` keeps reading while the consumer works and hands over everything
read meanwhile as one list, so there is one hop per list. What is read ahead is bounded in bytes, not in
messages: a head may be as large as the message limit. No grpc here: the servicer translates.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import TypeVar

T = TypeVar("T")


async def read_ahead(
    messages: AsyncIterator[T], *, max_bytes: int, size: Callable[[T], int]
) -> AsyncGenerator[list[T], None]:
    """The messages in order, as lists of those read while the consumer handled the list before.

    At most ``max_bytes`` (by ``size``) wait unread by the consumer, or one message when it alone is
    larger. An exception raised by ``messages`` is raised here after every message before it was handed
    over. Closing this generator stops the reading.
    """
    pending: collections.deque[T] = collections.deque()
    queued = 0
    done = False
    error: Exception | None = None
    arrived = asyncio.Event()
    room = asyncio.Event()

    async def read() -> None:
        nonlocal queued, done, error
        try:
            async for message in messages:
                n = size(message)
                while pending and queued + n > max_bytes:
                    room.clear()
                    await room.wait()
                pending.append(message)
                queued += n
                arrived.set()
        except Exception as exc:  # e.g. an undecodable message: raised to the consumer in its turn
            error = exc
        finally:
            done = True
            arrived.set()

    reader = asyncio.create_task(read())
    try:
        while True:
            while not pending and not done:
                arrived.clear()
                await arrived.wait()
            if pending:
                batch = list(pending)
                pending.clear()
                queued = 0
                room.set()
                yield batch
            elif error is not None:
                raise error
            else:
                return
    finally:
        reader.cancel()
