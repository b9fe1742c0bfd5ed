"""Dynamic cross-task batching: concurrent requests of any task mix share one trunk pass.

A request (a unary ``Act`` call or one ``ActStream`` step: both come through :meth:`Batcher.act`) is queued
with the :class:`LoadedHead` it resolved on arrival (so it finishes on that head whatever swaps happen
meanwhile). A pass takes queued requests (up to ``max_batch_size`` observations), drops those whose
deadline passed, runs one trunk pass over all rows, one pass per head (task, version) over that head's
rows, and action selection per head group. One pass runs at a time.

When passes run: a lone caller (no other request held, no other Act call accepted by gRPC, see
:mod:`polyhead.server.inflight`) with at most ``inline_max_rows`` observations runs its pass at once on the
event-loop thread, inside its own call: no loop turn, no thread hand-off. Otherwise the first request to
find the batcher idle schedules a pass with ``loop.call_soon``, so it runs after every call that reached
the server in the same loop turn has queued its request; while Act calls accepted by gRPC have not queued
yet, it waits for them a turn at a time (at most ``max_queue_delay``, at most a full batch). A pass of at
most ``inline_max_rows`` observations runs on the loop thread; a larger one in the one-thread executor,
and the loop keeps accepting calls meanwhile for the next pass, which is scheduled as soon as this one is
delivered.

Backpressure: at most ``max_queue_size`` requests wait; the next gets :class:`Overloaded` (the message
names the limit). No grpc here: the servicers translate.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from polyhead.errors import DeadlineExpired, Overloaded, ShuttingDown
from polyhead.server.actions import Actions, Sampling, choose
from polyhead.server.metrics import ServerMetrics
from polyhead.server.mlp_heads import StackedHead, run_stacked
from polyhead.server.registry import LoadedHead
from polyhead.server.runtime import TrunkRuntime
from polyhead.server.tracing import DISABLED, CallTrace, Tracer, current_call

F32 = npt.NDArray[np.float32]
_EMPTY: F32 = np.zeros((0, 0), dtype=np.float32)


@dataclass(eq=False)
class _Work:
    head: LoadedHead
    obs: npt.NDArray[np.float32]  # [rows, d], unpadded
    sampling: Sampling
    deadline: float | None
    enqueued: float
    future: asyncio.Future[Actions] = field(repr=False)
    trace: CallTrace | None = None  # the sampled call this request serves (tracing on)
    stream: bool = False  # an ActStream step (else a unary Act call)


@dataclass(frozen=True)
class BatchStats:
    """Totals since start (for tests and benchmarks; the metrics carry the same).

    ``passes`` counts trunk passes (one per batch, whatever its mix of tasks and encoders);
    ``encoder_runs`` the encoder sessions run (one per distinct encoder in a batch; 0 for format 1);
    ``stream_requests`` the requests that were ActStream steps; ``mixed_passes`` the passes that served
    both an ActStream step and a unary Act call.
    """

    passes: int
    requests: int
    rows: int
    encoder_runs: int = 0
    stream_requests: int = 0
    mixed_passes: int = 0


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
        inline_max_rows: int = 16,
        pending: Callable[[], int] | None = None,
        in_progress: Callable[[], int] | None = None,
        max_in_progress: int = 0,
        tracer: Tracer = DISABLED,
    ) -> None:
        """``pending``: how many act calls are in progress in the transport (accepted, not answered),
        e.g. :class:`polyhead.server.inflight.InflightCounter`; without it only the queue shows arrivals.
        ``in_progress``: how many act calls are being handled now, this one included (e.g.
        ``InflightCounter.handling``). With ``max_in_progress`` > 0, at most that many are admitted: a
        request (an Act call, or an ActStream step while that many Act calls run) that finds more is
        refused at once, before it queues. This bounds what one server holds when far more callers arrive
        than it can serve; the queue bound alone only counts requests that reached the queue."""
        self.trunk = trunk
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self.batching = batching
        self.inline_max_rows = inline_max_rows
        self._pending = pending or (lambda: 0)
        self._in_progress = in_progress or (lambda: 0)
        self.max_in_progress = max_in_progress
        self._metrics = metrics
        self._queue: collections.deque[_Work] = collections.deque()
        self._queued_rows = 0
        self._active = False  # a pass is scheduled or running
        self._held = 0  # requests in act(): queued, in a pass, or answered and not yet resumed
        self._held_streams = 0  # of which ActStream steps
        self._first_enqueued = 0.0  # when the oldest request of the next pass arrived
        self._closed = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="polyhead-infer")
        self._rng = np.random.default_rng()
        # Reused input buffer: only one pass runs at a time (one worker, one executor thread).
        self._buffer = np.zeros((max_batch_size, trunk.input_size), dtype=np.float32)
        self._encoder_runs = 0
        self._passes = 0
        self._requests = 0
        self._rows = 0
        self._stream_requests = 0
        self._mixed_passes = 0
        self._task_metrics: dict[str, tuple[Any, Any]] = {}
        self._tracer = tracer
        self._trunk_done = 0.0  # when the current pass's trunk finished (for its trace)

    @property
    def stats(self) -> BatchStats:
        return BatchStats(
            self._passes,
            self._requests,
            self._rows,
            self._encoder_runs,
            self._stream_requests,
            self._mixed_passes,
        )

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
        stream: bool = False,
    ) -> Actions:
        """Actions for ``obs`` ([rows, d] float32, already validated) from ``head``; ``stream``: the request
        is an ActStream step (counted in :attr:`stats`).

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
        if self.max_in_progress and (running := self._in_progress()) > self.max_in_progress:
            self._metrics.rejected.labels(task=head.task_id).inc()
            raise Overloaded(
                f"{running} Act calls in progress, more than the server's max_inflight_calls "
                f"({self.max_in_progress}); retry with backoff"
            )
        loop = asyncio.get_running_loop()
        work = _Work(
            head,
            obs,
            sampling,
            deadline,
            time.perf_counter(),
            loop.create_future(),
            trace=current_call() if self._tracer.enabled else None,
            stream=stream,
        )
        self._queue.append(work)
        self._queued_rows += sampling.rows
        self._held += 1
        self._held_streams += stream
        try:
            if not self._active:
                self._active = True
                self._idle.clear()
                self._first_enqueued = work.enqueued
                if not self._others_in_progress() and sampling.rows <= self.inline_max_rows:
                    # A lone caller: no other call even accepted by gRPC, so none can join this pass. It
                    # runs now, on the loop thread, and the caller never suspends.
                    self._kick(loop)
                else:
                    loop.call_soon(self._kick, loop)  # after this turn's other arrivals have queued
            return await work.future
        finally:
            self._held -= 1
            self._held_streams -= stream

    # --- passes ----------------------------------------------------------------------------------------
    def _kick(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run the next pass (a loop callback; ``_active`` is set and no pass is running).

        While Act calls accepted by gRPC have not queued their request yet (their message is being read),
        the pass waits for them one loop turn at a time, up to ``max_queue_delay`` after its oldest
        request or until the batch is full. It never waits on a timer for calls that may not come: under
        load on this machine that wait cost throughput and filled passes no better
        (``benchmarks/server_ab.py``, docs/benchmarks.md "#15 hot path")."""
        if (
            self.batching
            and self._queued_rows < self.max_batch_size
            and self._pending() > self._held - self._held_streams
            and time.perf_counter() < self._first_enqueued + self.max_queue_delay_s
        ):
            loop.call_soon(self._kick, loop)
            return
        batch = self._take()
        self._metrics.queue_depth.set(len(self._queue))
        if not batch:
            self._next(loop)
            return
        streams = sum(w.stream for w in batch)
        self._stream_requests += streams
        self._mixed_passes += 0 < streams < len(batch)
        if sum(w.sampling.rows for w in batch) <= self.inline_max_rows:
            # A small pass costs less than the hand-off to the inference thread and back (which, with the
            # GIL contended, measured dearer still: benchmarks/server_executor_hop.py).
            self._run_inline(batch)
            self._next(loop)
            return
        infer = self._traced_infer if self._tracer.enabled else self._infer
        future = loop.run_in_executor(self._executor, infer, batch)
        future.add_done_callback(functools.partial(self._deliver_future, loop, batch))

    def _others_in_progress(self) -> bool:
        """Whether more than one request is held or on its way: Act calls accepted by gRPC (the caller's
        own Act call among them) and ActStream steps held (not counted there)."""
        return self._held > 1 or self._pending() + self._held_streams > 1

    def _next(self, loop: asyncio.AbstractEventLoop) -> None:
        """After a pass: schedule the next for what queued meanwhile, or go idle."""
        if self._queue:
            self._first_enqueued = self._queue[0].enqueued
            loop.call_soon(self._kick, loop)
        else:
            self._active = False
            self._idle.set()

    def _run_inline(self, batch: list[_Work]) -> None:
        if not batch:
            return
        infer = self._traced_infer if self._tracer.enabled else self._infer
        try:
            results = infer(batch)
        except Exception as exc:  # a bug in a pass fails its requests, not the batcher
            self._fail(batch, exc)
            return
        self._deliver(batch, results)

    def _deliver_future(
        self, loop: asyncio.AbstractEventLoop, batch: Sequence[_Work], future: asyncio.Future[list[Actions]]
    ) -> None:
        if future.cancelled():
            self._fail(batch, ShuttingDown("the inference pass was cancelled"))
        elif (exc := future.exception()) is not None:
            self._fail(batch, exc)
        else:
            self._deliver(batch, future.result())
        self._next(loop)

    def _deliver(self, batch: Sequence[_Work], results: Sequence[Actions]) -> None:
        for work, result in zip(batch, results, strict=True):
            if not work.future.done():  # the caller may have been cancelled meanwhile
                work.future.set_result(result)

    @staticmethod
    def _fail(batch: Sequence[_Work], exc: BaseException) -> None:
        for work in batch:
            if not work.future.done():
                work.future.set_exception(exc)

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

    def _encode(self, batch: Sequence[_Work], started: float) -> tuple[F32, list[F32], int]:
        """Trunk input rows for ``batch`` in batch order, and each request's ``obs_norm``.

        Format 2: each distinct encoder runs once on its requests' rows (an encoder group's tasks share
        one); the embeddings land in the input buffer. Format 1: observations are zero-padded into it and
        the trunk pass yields ``obs_norm`` (empty list here).
        """
        buf = self._buffer
        rows = 0
        if self.trunk.padded:
            for work in batch:
                n, d = work.obs.shape
                buf[rows : rows + n, :d] = work.obs
                if d < buf.shape[1]:
                    buf[rows : rows + n, d:] = 0.0
                rows += n
                self._task_children(work.head.task_id)[0].observe(started - work.enqueued)
            return buf[:rows], [], rows
        offsets: list[int] = []
        by_encoder: dict[int, list[int]] = {}
        for index, work in enumerate(batch):
            offsets.append(rows)
            rows += work.sampling.rows
            by_encoder.setdefault(id(work.head.encoder), []).append(index)
            self._task_children(work.head.task_id)[0].observe(started - work.enqueued)
        obs_norms: list[F32] = [_EMPTY] * len(batch)
        self._encoder_runs += len(by_encoder)
        self._metrics.batch_encoders.observe(len(by_encoder))
        if len(by_encoder) == 1 and len(batch) == 1:  # a lone request: no copies at all
            encoder = batch[0].head.encoder
            assert encoder is not None
            embedding, obs_norms[0] = encoder.run(batch[0].obs)
            return embedding, obs_norms, rows
        for members in by_encoder.values():
            encoder = batch[members[0]].head.encoder
            assert encoder is not None
            obs = (
                batch[members[0]].obs
                if len(members) == 1
                else np.concatenate([batch[i].obs for i in members])
            )
            embedding, obs_norm = encoder.run(obs)
            at = 0
            for i in members:
                n = batch[i].sampling.rows
                buf[offsets[i] : offsets[i] + n] = embedding[at : at + n]
                obs_norms[i] = obs_norm[at : at + n]
                at += n
        return buf[:rows], obs_norms, rows

    def _infer(self, batch: Sequence[_Work]) -> list[Actions]:
        """Each encoder once, one trunk pass for the whole batch, one pass per head, action selection.
        Runs in the executor thread (or inline for a lone small request)."""
        started = time.perf_counter()
        trunk_input, obs_norms, rows = self._encode(batch, started)
        features, padded_norm = self.trunk.run(trunk_input)
        after_trunk = self._trunk_done = time.perf_counter()
        self._metrics.trunk_seconds.observe(after_trunk - started)
        self._metrics.batch_size.observe(rows)
        self._metrics.batch_requests.observe(len(batch))

        # Execution groups, order within a group following the batch: the stacked heads (plain MLPs) of
        # one weight bank and action space run as one grouped pass, whatever their tasks and versions;
        # any other head (an onnxruntime session) is its own group.
        groups: dict[Hashable, list[int]] = {}
        for index, work in enumerate(batch):
            runtime = work.head.runtime
            key: Hashable = (
                (id(runtime.policy_bank), runtime.meta.action_space)
                if isinstance(runtime, StackedHead)
                else id(work.head)
            )
            groups.setdefault(key, []).append(index)
        if len(groups) == 1 and (len(batch) == 1 or all(w.head is batch[0].head for w in batch)):
            # One head: every row, in order, no gather and no slicing.
            head = batch[0].head
            t0 = time.perf_counter()
            if padded_norm is not None:
                obs_norm = padded_norm
            elif len(batch) == 1:
                obs_norm = obs_norms[0]
            else:
                obs_norm = np.concatenate(obs_norms)
            actions = choose(
                head.runtime.run(features, obs_norm, value=any(w.sampling.value for w in batch)),
                head.meta.action_space,
                [w.sampling for w in batch],
                self._rng,
            )
            self._task_children(head.task_id)[1].observe(time.perf_counter() - t0)
            self._count(len(batch), rows)
            return [actions] if len(batch) == 1 else _split(actions, [w.sampling.rows for w in batch])
        results: list[Actions | None] = [None] * len(batch)
        offsets = list(itertools.accumulate((w.sampling.rows for w in batch), initial=0))
        for members in groups.values():
            head = batch[members[0]].head
            t0 = time.perf_counter()
            if len(members) == len(batch):
                member_features = features
            elif len(members) == 1:
                member_features = features[offsets[members[0]] : offsets[members[0] + 1]]
            else:
                member_features = features[
                    np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in members])
                ]
            if padded_norm is not None:
                norms = [padded_norm[offsets[i] : offsets[i + 1]] for i in members]
            else:
                norms = [obs_norms[i] for i in members]
            samplings = [batch[i].sampling for i in members]
            if isinstance(head.runtime, StackedHead):
                outputs = run_stacked(
                    [batch[i].head.runtime for i in members],  # type: ignore[misc]
                    [s.rows for s in samplings],
                    member_features,
                    norms,
                    [s.value for s in samplings],
                )
            else:
                member_norm = norms[0] if len(norms) == 1 else np.concatenate(norms)
                outputs = head.runtime.run(member_features, member_norm)
            actions = choose(outputs, head.meta.action_space, samplings, self._rng)
            elapsed = time.perf_counter() - t0
            for task_id in {batch[i].head.task_id for i in members}:
                self._task_children(task_id)[1].observe(elapsed)
            parts = _split(actions, [s.rows for s in samplings])
            for index, part in zip(members, parts, strict=True):
                results[index] = part
        self._count(len(batch), rows)
        return [r for r in results if r is not None]

    def _traced_infer(self, batch: Sequence[_Work]) -> list[Actions]:
        """:meth:`_infer`, then the pass's spans (tracing on)."""
        started = time.perf_counter()
        rows = sum(w.sampling.rows for w in batch)
        try:
            results = self._infer(batch)
        except Exception as exc:
            self._tracer.record_pass(batch, started, None, time.perf_counter(), rows=rows, error=exc)
            raise
        self._tracer.record_pass(batch, started, self._trunk_done, time.perf_counter(), rows=rows)
        return results

    def _count(self, requests: int, rows: int) -> None:
        self._passes += 1
        self._requests += requests
        self._rows += rows

    # --- lifecycle -------------------------------------------------------------------------------------
    def close(self) -> None:
        """Refuse new requests; queued ones still run (await :meth:`drain`)."""
        self._closed = True

    async def drain(self) -> None:
        """Wait until the queue is empty and no pass runs."""
        await self._idle.wait()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)


def _split(actions: Actions, sizes: Sequence[int]) -> list[Actions]:
    """Consecutive row blocks of ``actions`` (views, no copies)."""
    out = []
    at = 0
    for n in sizes:
        out.append(
            Actions(
                raw=actions.raw[at : at + n],
                env=actions.env[at : at + n],
                log_prob=actions.log_prob[at : at + n],
                value=actions.value[at : at + n],
            )
        )
        at += n
    return out
