"""``read_ahead``: a stream read ahead of a slow consumer, in order, in batches, bounded in bytes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from polyhead.server.readahead import read_ahead


async def _source(items: list[bytes], log: list[str], fail_after: int | None = None) -> AsyncIterator[bytes]:
    for i, item in enumerate(items):
        if fail_after is not None and i == fail_after:
            raise ValueError(f"message {i} is undecodable")
        log.append(f"read {i}")
        yield item
        await asyncio.sleep(0)  # a message per loop turn, as from the network


async def _consume(batches: AsyncIterator[list[bytes]], log: list[str]) -> list[list[bytes]]:
    out = []
    async for batch in batches:
        log.append(f"batch of {len(batch)}")
        out.append(batch)
        await asyncio.sleep(0.01)  # the consumer is slow: the reader runs ahead meanwhile
    return out


def test_order_is_kept_and_what_is_read_meanwhile_comes_as_one_batch() -> None:
    items = [bytes([i]) * 4 for i in range(50)]
    log: list[str] = []
    got = asyncio.run(_consume(read_ahead(_source(items, log), max_bytes=1 << 20, size=len), log))
    assert [m for batch in got for m in batch] == items
    assert len(got) < 10  # batches formed: far fewer hand-overs than messages
    assert got[0] == items[:1]  # the first message is handed over as soon as it is read


def test_read_ahead_is_bounded_in_bytes_and_a_larger_message_still_passes() -> None:
    items = [b"x" * 4 for _ in range(30)] + [b"y" * 100] + [b"z" * 4 for _ in range(5)]
    log: list[str] = []
    got = asyncio.run(_consume(read_ahead(_source(items, log), max_bytes=12, size=len), log))
    assert [m for batch in got for m in batch] == items
    assert all(sum(map(len, batch)) <= 12 or len(batch) == 1 for batch in got), [
        list(map(len, b)) for b in got
    ]
    assert [b"y" * 100] in got


def test_an_error_reading_comes_after_the_messages_before_it() -> None:
    items = [bytes([i]) for i in range(10)]
    log: list[str] = []

    seen: list[bytes] = []

    async def run() -> None:
        async for batch in read_ahead(_source(items, log, fail_after=6), max_bytes=100, size=len):
            seen.extend(batch)
            await asyncio.sleep(0.01)

    with pytest.raises(ValueError, match="message 6 is undecodable"):
        asyncio.run(run())
    assert seen == items[:6]


def test_closing_early_stops_the_reader() -> None:
    log: list[str] = []

    async def endless() -> AsyncIterator[bytes]:
        i = 0
        while True:
            log.append(f"read {i}")
            i += 1
            yield b"x"
            await asyncio.sleep(0)

    async def run() -> int:
        batches = read_ahead(endless(), max_bytes=8, size=len)
        await anext(batches)
        await batches.aclose()
        read = len(log)
        await asyncio.sleep(0.05)
        return len(log) - read

    assert asyncio.run(run()) == 0
