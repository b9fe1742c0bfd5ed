"""A closed-loop gRPC load generator that speaks any unary protocol: pre-serialised request bytes in,
response bytes out, so every server is driven by the same client code at the same client cost.

Method (the one ``polyhead.clients.bench`` uses, after Triton's perf_analyzer): at concurrency C, C callers
each
keep exactly one request in flight; they are spread over W long-lived worker *processes* (spawned), each
with its own asyncio loop and one channel per target kept open across measurements, so one process's
GIL does not cap the load. A measurement is a warm-up followed by one window ``[start_at, end_at]``;
only requests that *finish* inside the window count, and their latencies are the client-side round trip.

``polyhead.clients.bench`` builds ``polyhead.v1`` messages inside its callers; the peers speak other protocols
(the V2 inference protocol, a Ray Serve gRPC service), so this module takes the request bytes and the
method path from a per-protocol adapter instead (see ``servers.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class Job:
    """What one worker runs for one measurement."""

    target: str
    method: str
    payloads: tuple[bytes, ...]
    metadata: tuple[tuple[str, str], ...]
    callers: int
    start_at: float
    end_at: float
    timeout_s: float


@dataclass
class Result:
    """Latencies (ms) of the requests that finished in the window and failures by status code."""

    latencies_ms: npt.NDArray[np.float64]
    errors: dict[str, int]


def _identity(data: bytes) -> bytes:
    return data


async def _run_job(channels: dict[str, Any], job: Job) -> Result:
    import grpc

    if job.target not in channels:
        channels[job.target] = grpc.aio.insecure_channel(
            job.target, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        )
    call = channels[job.target].unary_unary(
        job.method, request_serializer=_identity, response_deserializer=_identity
    )
    latencies: list[float] = []
    errors: dict[str, int] = {}

    async def caller(n: int) -> None:
        i = n
        while True:
            started = time.time()
            if started >= job.end_at:
                return
            try:
                await call(job.payloads[i % len(job.payloads)], timeout=job.timeout_s, metadata=job.metadata)
            except grpc.RpcError as exc:
                code = exc.code() if callable(getattr(exc, "code", None)) else None
                name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
                if job.start_at <= time.time() <= job.end_at:
                    errors[name] = errors.get(name, 0) + 1
                continue
            finally:
                i += 1
            finished = time.time()
            if job.start_at <= finished <= job.end_at:
                latencies.append((finished - started) * 1e3)

    await asyncio.gather(*(caller(n) for n in range(job.callers)))
    return Result(np.asarray(latencies, np.float64), errors)


async def _serve(conn: Connection) -> None:
    import grpc  # noqa: F401  (imported before "ready", so the first job's window is not spent importing)

    loop = asyncio.get_running_loop()
    channels: dict[str, Any] = {}
    conn.send("ready")
    try:
        while True:
            job = await loop.run_in_executor(None, conn.recv)
            if job is None:
                return
            conn.send(await _run_job(channels, job))
    finally:
        for channel in channels.values():
            await channel.close()


def _worker_main(conn: Connection) -> None:
    asyncio.run(_serve(conn))


class LoadPool:
    """W spawned load-generating processes (spawn, not fork: gRPC's threads do not survive a fork)."""

    def __init__(self, processes: int) -> None:
        if processes < 1:
            raise ValueError("need at least one load process")
        ctx = mp.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        for _ in range(processes):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(child,), daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)
        # A job's window is set in wall-clock time when it is sent: wait until every worker can take one.
        for conn in self.conns:
            if not conn.poll(120.0) or conn.recv() != "ready":
                self.close()
                raise RuntimeError("a load-generator process did not start within 120 s")

    @property
    def pids(self) -> list[int]:
        return [int(p.pid) for p in self.procs]

    def run(
        self,
        *,
        target: str,
        method: str,
        payloads: Sequence[bytes],
        concurrency: int,
        warmup_s: float,
        window_s: float,
        metadata: Sequence[tuple[str, str]] = (),
        timeout_s: float = 10.0,
        at_edges: Callable[[], None] | None = None,
    ) -> Result:
        """Drive ``concurrency`` closed-loop callers through a warm-up and one window of ``window_s``;
        return the merged result. Callers are split evenly over the processes (at most one process per
        caller). ``at_edges`` is called at the window's start and at its end (e.g. to read CPU times)."""
        used = min(len(self.conns), concurrency)
        shares = [concurrency // used + (1 if i < concurrency % used else 0) for i in range(used)]
        start_at = time.time() + 0.1 + warmup_s
        end_at = start_at + window_s
        for conn, callers in zip(self.conns[:used], shares, strict=True):
            conn.send(
                Job(target, method, tuple(payloads), tuple(metadata), callers, start_at, end_at, timeout_s)
            )
        if at_edges is not None:
            time.sleep(max(0.0, start_at - time.time()))
            at_edges()
            time.sleep(max(0.0, end_at - time.time()))
            at_edges()
        parts: list[Result] = [conn.recv() for conn in self.conns[:used]]
        errors: dict[str, int] = {}
        for part in parts:
            for code, n in part.errors.items():
                errors[code] = errors.get(code, 0) + n
        return Result(np.concatenate([p.latencies_ms for p in parts]), errors)

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError, BrokenPipeError):
                conn.send(None)
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)


def default_processes() -> int:
    """One load process per CPU, at least 2 (so the client side is never one GIL)."""
    return max(2, os.cpu_count() or 1)
