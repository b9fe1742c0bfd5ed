"""Dynamic cross-task batching: concurrent requests of any task mix share one trunk pass.

A request is queued with the :class:`LoadedHead` it resolved on arrival (so it finishes on that head
whatever swaps happen meanwhile). One worker coroutine takes queued requests (up to ``max_batch_size``
observations), drops those whose deadline passed, and runs them in a one-thread executor, off the event
loop: one trunk pass over all rows, then one pass per head (task, version) over that head's rows, then
action selection per head group. While a pass runs the loop keeps accepting calls; they form the next
batch, which is where batching comes from under load.

Adaptive wait: before a pass the worker yields to the event loop, and keeps yielding only while new
requests keep arriving (bounded by ``max_queue_delay``), so a lone client never pays the window.

Backpressure: at most ``max_queue_size`` requests wait; the next gets :class:`Overloaded`.
No grpc here: the servicers translate.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from polyhead.errors import DeadlineExpired, Overloaded, ShuttingDown
from server.actions import Actions, Sampling, choose
from server.metrics import ServerMetrics
from server.registry import LoadedHead
from server.runtime import TrunkRuntime

# Consecutive event-loop turns with no new arrival after which the worker stops waiting for more.
_IDLE_TURNS = 2


@dataclass(eq=False)
class _Work:
    head: LoadedHead
    obs: npt.NDArray[np.float32]  # [rows, d], unpadded
    sampling: Sampling
    deadline: float | None
    enqueued: float
    future: asyncio.Future[Actions] = field(repr=False)


@dataclass(frozen=True)
class BatchStats:
    """Totals since start (for tests and benchmarks; the metrics carry the same)."""

    passes: int
    requests: int
    rows: int


class Batcher:
    """Queues act requests and runs them in cross-task batches. Use from one event loop."""

    def __init__(
        self,
        trunk: TrunkRuntime,
        *,
        metrics: ServerMetrics,
        max_batch_size: int,
        max_queue_delay_s: float,
        max_queue_size: int,
        batching: bool = True,
    ) -> None:
        self.trunk = trunk
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self.batching = batching
        self._metrics = metrics
        self._queue: collections.deque[_Work] = collections.deque()
        self._queued_rows = 0
        self._worker: asyncio.Task[None] | None = None
        self._closed = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="polyhead-infer")
        self._rng = np.random.default_rng()
        # Reused input buffer: only one pass runs at a time (one worker, one executor thread).
        self._buffer = np.zeros((max_batch_size, trunk.observation_size), dtype=np.float32)
        self._passes = 0
        self._requests = 0
        self._rows = 0
        self._task_metrics: dict[str, tuple[Any, Any]] = {}

    @property
    def stats(self) -> BatchStats:
        return BatchStats(self._passes, self._requests, self._rows)

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    async def act(
        self,
        head: LoadedHead,
        obs: npt.NDArray[np.float32],
        sampling: Sampling,
        *,
        deadline: float | None = None,
    ) -> Actions:
        """Actions for ``obs`` ([rows, d] float32, already validated) from ``head``.

        ``deadline`` is a ``time.monotonic()`` instant after which the request is dropped before inference.
        Raises Overloaded (queue full), ShuttingDown (after :meth:`close`), DeadlineExpired.
        """
        if self._closed:
            raise ShuttingDown("the server is shutting down and accepts no new requests")
        if len(self._queue) >= self.max_queue_size:
            self._metrics.rejected.labels(task=head.task_id).inc()
            raise Overloaded(
                f"request queue is full ({self.max_queue_size} requests waiting, the server's "
                "max_queue_size); retry with backoff"
            )
        loop = asyncio.get_running_loop()
        work = _Work(head, obs, sampling, deadline, time.perf_counter(), loop.create_future())
        self._queue.append(work)
        self._queued_rows += sampling.rows
        if self._worker is None:
            self._idle.clear()
            self._worker = loop.create_task(self._run())
        return await work.future

    # --- the worker ------------------------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                if self.batching:
                    await self._gather(loop)
                batch = self._take()
                self._metrics.queue_depth.set(len(self._queue))
                if not batch:
                    continue
                try:
                    results = await loop.run_in_executor(self._executor, self._infer, batch)
                except Exception as exc:  # a bug in a pass fails its requests, not the worker
                    for work in batch:
                        if not work.future.done():
                            work.future.set_exception(exc)
                    continue
                for work, result in zip(batch, results, strict=True):
                    if not work.future.done():  # the caller may have been cancelled meanwhile
                        work.future.set_result(result)
        finally:
            self._worker = None
            self._idle.set()

    async def _gather(self, loop: asyncio.AbstractEventLoop) -> None:
        """Yield to the loop while requests keep arriving, up to the queue delay or a full batch."""
        limit = self._queue[0].enqueued + self.max_queue_delay_s
        idle = 0
        while self._queued_rows < self.max_batch_size and idle < _IDLE_TURNS and time.perf_counter() < limit:
            before = len(self._queue)
            await asyncio.sleep(0)
            idle = idle + 1 if len(self._queue) == before else 0

    def _take(self) -> list[_Work]:
        """Up to max_batch_size rows of queued requests (at least one request); expired ones fail now."""
        batch: list[_Work] = []
        rows = 0
        now = time.monotonic()
        while self._queue:
            work = self._queue[0]
            if batch and (rows + work.sampling.rows > self.max_batch_size or not self.batching):
                break
            self._queue.popleft()
            self._queued_rows -= work.sampling.rows
            if work.future.done():  # cancelled by the caller while queued
                continue
            if work.deadline is not None and now >= work.deadline:
                self._metrics.expired.labels(task=work.head.task_id).inc()
                work.future.set_exception(
                    DeadlineExpired(
                        f"deadline passed after {time.perf_counter() - work.enqueued:.4f} s in queue"
                    )
                )
                continue
            batch.append(work)
            rows += work.sampling.rows
        return batch

    def _task_children(self, task_id: str) -> tuple[Any, Any]:
        children = self._task_metrics.get(task_id)
        if children is None:
            children = (
                self._metrics.queue_wait.labels(task=task_id),
                self._metrics.head_seconds.labels(task=task_id),
            )
            self._task_metrics[task_id] = children
        return children

    def _infer(self, batch: Sequence[_Work]) -> list[Actions]:
        """One trunk pass, one pass per head, action selection. Runs in the executor thread."""
        started = time.perf_counter()
        rows = 0
        buf = self._buffer
        for work in batch:
            n, d = work.obs.shape
            buf[rows : rows + n, :d] = work.obs
            if d < buf.shape[1]:
                buf[rows : rows + n, d:] = 0.0
            rows += n
            self._task_children(work.head.task_id)[0].observe(started - work.enqueued)
        features, obs_norm = self.trunk.run(buf[:rows])
        after_trunk = time.perf_counter()
        self._metrics.trunk_seconds.observe(after_trunk - started)
        self._metrics.batch_size.observe(rows)
        self._metrics.batch_requests.observe(len(batch))

        # Group rows by head object (task + version); order within a group follows the batch.
        groups: dict[int, list[tuple[int, _Work]]] = {}
        for index, work in enumerate(batch):
            groups.setdefault(id(work.head), []).append((index, work))
        results: list[Actions | None] = [None] * len(batch)
        offsets = np.cumsum([0] + [w.sampling.rows for w in batch])
        for members in groups.values():
            head = members[0][1].head
            t0 = time.perf_counter()
            if len(members) == len(batch):
                f, o = features, obs_norm
            else:
                idx = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i, _ in members])
                f, o = features[idx], obs_norm[idx]
            outputs = head.runtime.run(f, o)
            actions = choose(outputs, head.meta.action_space, [w.sampling for _, w in members], self._rng)
            self._task_children(head.task_id)[1].observe(time.perf_counter() - t0)
            at = 0
            for index, work in members:
                n = work.sampling.rows
                results[index] = Actions(
                    raw=actions.raw[at : at + n],
                    env=actions.env[at : at + n],
                    log_prob=actions.log_prob[at : at + n],
                    value=actions.value[at : at + n],
                )
                at += n
        self._passes += 1
        self._requests += len(batch)
        self._rows += rows
        return [r for r in results if r is not None]

    # --- lifecycle -------------------------------------------------------------------------------------
    def close(self) -> None:
        """Refuse new requests; queued ones still run (await :meth:`drain`)."""
        self._closed = True

    async def drain(self) -> None:
        """Wait until the queue is empty and no pass runs."""
        await self._idle.wait()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)
