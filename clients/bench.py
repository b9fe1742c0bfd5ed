"""The load generator behind ``polyhead bench``: a perf_analyzer-style concurrency sweep, plus behaviour
while heads are hot-swapped and a floor measured on a trivial RPC.

Method (after Triton's perf_analyzer):

* closed loop: at concurrency C, C callers each keep exactly one request in flight (unary ``Act`` calls,
  or one step at a time on their own ``ActStream``);
* the callers are spread over W worker *processes*, each with its own asyncio loop and channel, so one
  Python process's GIL does not cap the load (W defaults to the number of CPUs, at most C);
* time is cut into measurement windows (``window_s``) after a warm-up; a level ends when the last
  ``stable_windows`` windows agree within ``stability`` (throughput and mean latency, both relative to
  their average) or after ``max_windows``; the row reports the merged stable windows;
* ``echo_floor``: the same level against ``Diagnostics.Echo`` with a payload the size of the Act
  request, so each figure can be read as a ratio to what the RPC stack alone costs;
* ``swap_every_ms``: each level is measured twice, first steady, then while an admin client flips one
  task's active head between two loaded versions at that interval; the row adds swaps done, errors during
  the swapping windows, versions seen, and p99 of the swapped task and of the other tasks vs steady.

Figures depend on the machine and on what else runs on it: the load generator shares the CPUs with the
server when both run on one host, which the report states.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing as mp
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from multiprocessing.connection import Connection
from typing import Any, Literal

import grpc
import numpy as np
import numpy.typing as npt

from polyhead.clients.admin import AdminClient
from polyhead.clients.catalog import RemoteTask
from polyhead.clients.channel import ChannelConfig
from polyhead.clients.errors import PolicyClientError
from polyhead.clients.policy_client import PolicyClient
from polyhead.spaces import BoxSpec, SpaceSpec
from polyhead.tensors import to_proto
from polyhead.v1 import policy_pb2, policy_pb2_grpc

Mode = Literal["unary", "stream"]
Kind = Literal["act", "echo"]
# Requests per stream-mode episode before it is ended and a new one begins (bounds server-side state).
STREAM_EPISODE_STEPS = 256
_OK = "OK"


# --- configuration and results ---------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchConfig:
    """One sweep. ``tasks`` empty: every served task. ``workers`` 0: one per CPU (at most C)."""

    channel: ChannelConfig
    concurrency: tuple[int, ...] = (1, 4, 16, 64)
    batch: int = 1
    tasks: tuple[str, ...] = ()
    mode: Mode = "unary"
    window_s: float = 1.0
    warmup_s: float = 0.5
    stability: float = 0.10
    stable_windows: int = 3
    max_windows: int = 10
    workers: int = 0
    request_timeout_s: float = 5.0
    echo_floor: bool = False
    swap_every_ms: float | None = None
    swap_task: str | None = None
    admin_channel: ChannelConfig | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError("concurrency levels must be >= 1")
        if self.batch < 1:
            raise ValueError("batch must be >= 1")
        if self.stable_windows < 1 or self.max_windows < self.stable_windows:
            raise ValueError("need 1 <= stable_windows <= max_windows")
        if self.swap_every_ms is not None and self.admin_channel is None:
            raise ValueError("--swap-every needs --admin-target (the HeadAdmin address)")
        if self.mode not in ("unary", "stream"):
            raise ValueError(f"mode must be 'unary' or 'stream', got {self.mode!r}")


@dataclass(frozen=True)
class _Level:
    """What one worker runs for one measurement phase (sent to the worker process)."""

    kind: Kind
    mode: Mode
    callers: int
    batch: int
    tasks: tuple[str, ...]
    spaces: tuple[SpaceSpec, ...]
    start_at: float
    window_s: float
    timeout_s: float
    seed: int
    payload_bytes: int


@dataclass
class _Window:
    """Everything recorded in one window by one worker (merged across workers by the parent)."""

    latencies_ms: npt.NDArray[np.float64]
    task_index: npt.NDArray[np.int16]
    errors: dict[str, int]
    versions: dict[str, list[int]]

    @staticmethod
    def merge(parts: Sequence[_Window]) -> _Window:
        errors: dict[str, int] = {}
        versions: dict[str, set[int]] = {}
        for p in parts:
            for code, n in p.errors.items():
                errors[code] = errors.get(code, 0) + n
            for task, vs in p.versions.items():
                versions.setdefault(task, set()).update(vs)
        return _Window(
            latencies_ms=np.concatenate([p.latencies_ms for p in parts]) if parts else np.zeros(0),
            task_index=np.concatenate([p.task_index for p in parts]).astype(np.int16)
            if parts
            else np.zeros(0, np.int16),
            errors=errors,
            versions={t: sorted(v) for t, v in versions.items()},
        )


@dataclass(frozen=True)
class Stats:
    """Throughput and latency of a set of windows."""

    requests: int
    rps: float
    actions_per_s: float
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    errors: int
    errors_by_code: dict[str, int]

    @staticmethod
    def of(window: _Window, seconds: float, batch: int) -> Stats:
        lat = window.latencies_ms
        n = int(lat.size)

        def pct(q: float) -> float:
            return float(np.percentile(lat, q)) if n else math.nan

        return Stats(
            requests=n,
            rps=n / seconds if seconds > 0 else math.nan,
            actions_per_s=n * batch / seconds if seconds > 0 else math.nan,
            mean_ms=float(lat.mean()) if n else math.nan,
            p50_ms=pct(50),
            p90_ms=pct(90),
            p95_ms=pct(95),
            p99_ms=pct(99),
            errors=sum(window.errors.values()),
            errors_by_code=dict(window.errors),
        )


@dataclass
class BenchRow:
    concurrency: int
    batch: int
    stats: Stats
    windows: int
    stable: bool
    mode: Mode
    tasks: tuple[str, ...]
    echo: Stats | None = None
    swap: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        s = self.stats
        row: dict[str, Any] = {
            "concurrency": self.concurrency,
            "batch": self.batch,
            "rps": s.rps,
            "actions_per_s": s.actions_per_s,
            "p50_ms": s.p50_ms,
            "p99_ms": s.p99_ms,
            "errors": s.errors,
            "p90_ms": s.p90_ms,
            "p95_ms": s.p95_ms,
            "mean_ms": s.mean_ms,
            "requests": s.requests,
            "errors_by_code": s.errors_by_code,
            "windows": self.windows,
            "stable": self.stable,
            "mode": self.mode,
            "tasks": list(self.tasks),
        }
        if self.echo is not None:
            e = self.echo
            row["echo"] = {"rps": e.rps, "p50_ms": e.p50_ms, "p99_ms": e.p99_ms, "errors": e.errors}
            row["rps_vs_echo"] = s.rps / e.rps if e.rps else math.nan
            row["p50_vs_echo"] = s.p50_ms / e.p50_ms if e.p50_ms else math.nan
            row["p99_vs_echo"] = s.p99_ms / e.p99_ms if e.p99_ms else math.nan
        if self.swap is not None:
            row["swap"] = self.swap
        return row


@dataclass
class BenchReport:
    rows: list[BenchRow]
    workers: int
    target: str
    duration_s: float
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "rows": [r.to_json() for r in self.rows],
            "target": self.target,
            "workers": self.workers,
            "duration_s": self.duration_s,
            "cpus": os.cpu_count(),
            "notes": self.notes,
        }

    @property
    def total_errors(self) -> int:
        return sum(r.stats.errors for r in self.rows)


# --- worker process -----------------------------------------------------------------------------------
def _observation_pool(space: SpaceSpec, batch: int | None, rng: np.random.Generator, n: int) -> list[Any]:
    """``n`` encoded observation tensors inside the space (standard normal, clipped to finite bounds):
    ``[batch, *shape]`` each, or one observation ``[*shape]`` when ``batch`` is None (stream steps)."""
    lead = () if batch is None else (batch,)
    pool = []
    for _ in range(n):
        if isinstance(space, BoxSpec):
            obs = rng.standard_normal((*lead, *space.shape)).astype(np.float32)
            low = np.asarray(space.low, np.float32).reshape(space.shape)
            high = np.asarray(space.high, np.float32).reshape(space.shape)
            obs = np.clip(
                obs, np.where(np.isfinite(low), low, -1e30), np.where(np.isfinite(high), high, 1e30)
            )
        else:
            obs = (rng.integers(0, space.n, size=lead) + space.start).astype(np.float32)
        pool.append(to_proto(obs))
    return pool


class _Recorder:
    def __init__(self, tasks: Sequence[str]) -> None:
        self.tasks = tasks
        self.latencies: list[float] = []
        self.task_index: list[int] = []
        self.errors: dict[str, int] = {}
        self.versions: dict[str, set[int]] = {}

    def ok(self, latency_s: float, task: int, version: int) -> None:
        self.latencies.append(latency_s * 1e3)
        self.task_index.append(task)
        if version:
            self.versions.setdefault(self.tasks[task], set()).add(version)

    def fail(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1

    def cut(self) -> _Window:
        window = _Window(
            latencies_ms=np.asarray(self.latencies, dtype=np.float64),
            task_index=np.asarray(self.task_index, dtype=np.int16),
            errors=self.errors,
            versions={t: sorted(v) for t, v in self.versions.items()},
        )
        self.latencies, self.task_index, self.errors, self.versions = [], [], {}, {}
        return window


def _code_of(exc: grpc.RpcError) -> str:
    code = exc.code() if callable(getattr(exc, "code", None)) else None
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"


async def _unary_caller(
    stub: Any,
    diag: Any,
    *,
    level: _Level,
    pools: list[list[Any]],
    rec: _Recorder,
    stop: asyncio.Event,
    n: int,
) -> None:
    metadata: tuple[tuple[str, str], ...] = ()
    i = n
    echo = policy_pb2.EchoRequest(payload=b"\0" * level.payload_bytes)
    while not stop.is_set():
        t = i % len(level.tasks)
        i += 1
        started = time.perf_counter()
        try:
            if level.kind == "echo":
                await diag.Echo(echo, timeout=level.timeout_s, metadata=metadata)
                version = 0
            else:
                pool = pools[t]
                req = policy_pb2.ActRequest(
                    task_id=level.tasks[t], observations=pool[i % len(pool)], deterministic=False
                )
                resp = await stub.Act(req, timeout=level.timeout_s, metadata=metadata)
                version = resp.head_version
        except grpc.RpcError as exc:
            rec.fail(_code_of(exc))
            continue
        rec.ok(time.perf_counter() - started, t, version)


async def _stream_caller(
    stub: Any, *, level: _Level, pools: list[list[Any]], rec: _Recorder, stop: asyncio.Event, n: int
) -> None:
    t = n % len(level.tasks)
    task_id, pool = level.tasks[t], pools[t]
    episode = 0
    while not stop.is_set():
        call = stub.ActStream(timeout=None)
        try:
            step = 0
            while not stop.is_set():
                req = policy_pb2.StepRequest(task_id=task_id, episode_id=f"bench-{os.getpid()}-{n}-{episode}")
                if step == STREAM_EPISODE_STEPS:
                    req.feedback.reward = 0.0
                    req.feedback.truncated = True
                else:
                    req.observation.CopyFrom(pool[step % len(pool)])
                    if step:
                        req.feedback.reward = 0.0
                started = time.perf_counter()
                await call.write(req)
                resp = await call.read()
                if not isinstance(resp, policy_pb2.StepResponse):
                    rec.fail("CANCELLED")
                    break
                rec.ok(time.perf_counter() - started, t, resp.head_version)
                step += 1
                if step > STREAM_EPISODE_STEPS:
                    episode, step = episode + 1, 0
        except grpc.RpcError as exc:
            rec.fail(_code_of(exc))
        finally:
            call.cancel()
            episode += 1


async def _run_level(channel_cfg: ChannelConfig, level: _Level, conn: Connection) -> None:
    rng = np.random.default_rng(level.seed)
    stream = level.mode == "stream" and level.kind == "act"
    pools = [_observation_pool(space, None if stream else level.batch, rng, 32) for space in level.spaces]
    rec = _Recorder(level.tasks)
    stop = asyncio.Event()
    async with channel_cfg.aio_channel() as channel:
        stub = policy_pb2_grpc.PolicyServiceStub(channel)  # type: ignore[no-untyped-call]
        diag = policy_pb2_grpc.DiagnosticsStub(channel)  # type: ignore[no-untyped-call]
        if level.mode == "stream" and level.kind == "act":
            callers = [
                _stream_caller(stub, level=level, pools=pools, rec=rec, stop=stop, n=n)
                for n in range(level.callers)
            ]
        else:
            callers = [
                _unary_caller(stub, diag, level=level, pools=pools, rec=rec, stop=stop, n=n)
                for n in range(level.callers)
            ]
        tasks = [asyncio.ensure_future(c) for c in callers]
        # Warm-up: everything before start_at is discarded.
        await asyncio.sleep(max(0.0, level.start_at - time.time()))
        rec.cut()
        k = 1
        while True:
            boundary = level.start_at + k * level.window_s
            while time.time() < boundary:
                if conn.poll():
                    break
                await asyncio.sleep(min(0.02, max(0.0, boundary - time.time())))
            if conn.poll():
                conn.recv()
                break
            conn.send(("window", k, rec.cut()))
            k += 1
        stop.set()
        # Callers finish their in-flight request (bounded by its deadline), then the channel closes.
        await asyncio.wait(tasks, timeout=level.timeout_s + 1.0)
        for task in tasks:
            task.cancel()
    conn.send(("stopped", k, None))


def _worker_main(channel_cfg: ChannelConfig, conn: Connection) -> None:
    """A worker process: run each level it is sent until told to stop; exit on None."""
    while True:
        msg = conn.recv()
        if msg is None:
            return
        asyncio.run(_run_level(channel_cfg, msg, conn))


# --- the coordinator ------------------------------------------------------------------------------------
class _Pool:
    """W spawned worker processes (spawn, not fork: gRPC's threads do not survive a fork)."""

    def __init__(self, channel_cfg: ChannelConfig, workers: int) -> None:
        ctx = mp.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        for _ in range(workers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(channel_cfg, child), daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError, BrokenPipeError):
                conn.send(None)
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _stable(windows: Sequence[Stats], n: int, tolerance: float) -> bool:
    if len(windows) < n:
        return False
    last = windows[-n:]
    for values in ([w.rps for w in last], [w.mean_ms for w in last]):
        if any(not math.isfinite(v) for v in values):
            return False
        mean = sum(values) / n
        if mean <= 0 or any(abs(v - mean) > tolerance * mean for v in values):
            return False
    return True


class _Swapper(threading.Thread):
    """Flip one task's active head between two versions every ``interval_s`` until stopped."""

    def __init__(self, admin: AdminClient, task: str, versions: tuple[int, int], interval_s: float) -> None:
        super().__init__(name="bench-swapper", daemon=True)
        self.admin, self.task, self.versions, self.interval_s = admin, task, versions, interval_s
        self.stop_event = threading.Event()
        self.swaps = 0
        self.errors: dict[str, int] = {}
        self.swap_seconds: list[float] = []

    def run(self) -> None:
        i = 0
        next_at = time.monotonic() + self.interval_s
        while not self.stop_event.wait(max(0.0, next_at - time.monotonic())):
            next_at += self.interval_s
            i += 1
            try:
                result = self.admin.set_active_version(self.task, self.versions[i % 2])
                self.swaps += 1
                self.swap_seconds.append(result.swap_seconds)
            except PolicyClientError as exc:
                self.errors[exc.code.name] = self.errors.get(exc.code.name, 0) + 1


class Bench:
    """Runs a :class:`BenchConfig` sweep. ``progress(message)`` receives one line per finished phase."""

    def __init__(self, config: BenchConfig, *, progress: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.progress = progress or (lambda _msg: None)

    def _resolve_tasks(self) -> list[RemoteTask]:
        with PolicyClient(self.config.channel, timeout=self.config.request_timeout_s * 2) as client:
            catalog = client.list_tasks()
            if self.config.tasks:
                return [catalog[t] for t in self.config.tasks]
            return sorted(catalog, key=lambda t: t.task_id)

    def _payload_bytes(self, tasks: Sequence[RemoteTask]) -> int:
        rng = np.random.default_rng(0)
        req = policy_pb2.ActRequest(
            task_id=tasks[0].task_id,
            observations=_observation_pool(tasks[0].observation_space, self.config.batch, rng, 1)[0],
        )
        return req.ByteSize()

    def _measure(
        self,
        pool: _Pool,
        *,
        workers: int,
        kind: Kind,
        concurrency: int,
        tasks: Sequence[RemoteTask],
        payload: int,
    ) -> tuple[Stats, _Window, int, bool]:
        cfg = self.config
        used = min(workers, concurrency)
        shares = _split(concurrency, used)
        start_at = time.time() + 0.2 + cfg.warmup_s
        for i, (conn, callers) in enumerate(zip(pool.conns[:used], shares, strict=True)):
            conn.send(
                _Level(
                    kind=kind,
                    mode=cfg.mode,
                    callers=callers,
                    batch=cfg.batch,
                    tasks=tuple(t.task_id for t in tasks),
                    spaces=tuple(t.observation_space for t in tasks),
                    start_at=start_at,
                    window_s=cfg.window_s,
                    timeout_s=cfg.request_timeout_s,
                    seed=cfg.seed * 7919 + i,
                    payload_bytes=payload,
                )
            )
        windows: list[_Window] = []
        stats: list[Stats] = []
        batch = cfg.batch if cfg.mode == "unary" or kind == "echo" else 1
        while True:
            parts = [conn.recv() for conn in pool.conns[:used]]
            merged = _Window.merge([p[2] for p in parts])
            windows.append(merged)
            stats.append(Stats.of(merged, cfg.window_s, batch))
            stable = _stable(stats, cfg.stable_windows, cfg.stability)
            if stable or len(windows) >= cfg.max_windows:
                break
        for conn in pool.conns[:used]:
            conn.send("stop")
        for conn in pool.conns[:used]:
            # Drain windows cut while the stop was in flight, up to the worker's "stopped".
            while conn.recv()[0] != "stopped":
                pass
        n = min(cfg.stable_windows, len(windows))
        final = _Window.merge(windows[-n:])
        return Stats.of(final, cfg.window_s * n, batch), final, len(windows), stable

    def _swap_versions(self, admin: AdminClient, task: str) -> tuple[int, int]:
        versions, active = admin.versions(task)
        if len(versions) < 2:
            raise ValueError(
                f"--swap-every needs two loaded versions of task {task!r}; loaded: {versions}. "
                "Load a second one first (HeadAdmin.LoadHead with activate=false)."
            )
        other = max(v for v in versions if v != active)
        return active, other

    def run(self) -> BenchReport:
        cfg = self.config
        tasks = self._resolve_tasks()
        payload = self._payload_bytes(tasks)
        workers = cfg.workers or max(1, min(os.cpu_count() or 1, max(cfg.concurrency)))
        notes = [
            f"{workers} worker processes on a {os.cpu_count()}-CPU host; when the server runs on the same "
            "host the load generator competes with it for the CPUs."
        ]
        admin: AdminClient | None = None
        swap_task = cfg.swap_task or tasks[0].task_id
        swap_versions: tuple[int, int] | None = None
        if cfg.swap_every_ms is not None:
            assert cfg.admin_channel is not None
            admin = AdminClient(cfg.admin_channel, timeout=cfg.request_timeout_s)
            swap_versions = self._swap_versions(admin, swap_task)
        started = time.perf_counter()
        pool = _Pool(cfg.channel, workers)
        rows: list[BenchRow] = []
        try:
            for c in cfg.concurrency:
                stats, window, n_windows, stable = self._measure(
                    pool, workers=workers, kind="act", concurrency=c, tasks=tasks, payload=payload
                )
                self.progress(
                    f"C={c}: {stats.rps:.0f} req/s, p50 {stats.p50_ms:.2f} ms, p99 {stats.p99_ms:.2f} ms, "
                    f"{stats.errors} errors ({n_windows} windows{'' if stable else ', not stable'})"
                )
                row = BenchRow(
                    c, cfg.batch, stats, n_windows, stable, cfg.mode, tuple(t.task_id for t in tasks)
                )
                if cfg.echo_floor:
                    echo, _, _, _ = self._measure(
                        pool, workers=workers, kind="echo", concurrency=c, tasks=tasks, payload=payload
                    )
                    row.echo = echo
                    self.progress(f"C={c} echo floor: {echo.rps:.0f} req/s, p50 {echo.p50_ms:.2f} ms")
                if admin is not None and swap_versions is not None and cfg.swap_every_ms is not None:
                    row.swap = self._swap_phase(
                        pool,
                        workers=workers,
                        c=c,
                        tasks=tasks,
                        payload=payload,
                        admin=admin,
                        swap_task=swap_task,
                        versions=swap_versions,
                    )
                    row.swap["steady_p99_ms"] = stats.p99_ms
                    steady_swapped, steady_other = _task_p99(window, tasks, swap_task)
                    row.swap["steady_swapped_task_p99_ms"] = steady_swapped
                    row.swap["steady_other_tasks_p99_ms"] = steady_other
                    self.progress(
                        f"C={c} swapping every {cfg.swap_every_ms:.0f} ms: {row.swap['swaps']} swaps, "
                        f"{row.swap['errors_during_swaps']} errors, p99 {row.swap['p99_ms']:.2f} ms"
                    )
                rows.append(row)
        finally:
            pool.close()
            if admin is not None:
                if swap_versions is not None:
                    with contextlib.suppress(PolicyClientError):
                        admin.set_active_version(swap_task, swap_versions[0])
                admin.close()
        return BenchReport(rows, workers, cfg.channel.target, time.perf_counter() - started, notes)

    def _swap_phase(
        self,
        pool: _Pool,
        *,
        workers: int,
        c: int,
        tasks: Sequence[RemoteTask],
        payload: int,
        admin: AdminClient,
        swap_task: str,
        versions: tuple[int, int],
    ) -> dict[str, Any]:
        assert self.config.swap_every_ms is not None
        swapper = _Swapper(admin, swap_task, versions, self.config.swap_every_ms / 1e3)
        swapper.start()
        try:
            stats, window, n_windows, stable = self._measure(
                pool, workers=workers, kind="act", concurrency=c, tasks=tasks, payload=payload
            )
        finally:
            swapper.stop_event.set()
            swapper.join()
            with contextlib.suppress(PolicyClientError):
                admin.set_active_version(swap_task, versions[0])
        swapped, other = _task_p99(window, tasks, swap_task)
        return {
            "task": swap_task,
            "versions": list(versions),
            "interval_ms": self.config.swap_every_ms,
            "swaps": swapper.swaps,
            "swap_failures": swapper.errors,
            "swap_seconds_p50": float(np.median(swapper.swap_seconds)) if swapper.swap_seconds else math.nan,
            "errors_during_swaps": stats.errors,
            "errors_by_code": stats.errors_by_code,
            "rps": stats.rps,
            "p50_ms": stats.p50_ms,
            "p99_ms": stats.p99_ms,
            "swapped_task_p99_ms": swapped,
            "other_tasks_p99_ms": other,
            "versions_seen": window.versions.get(swap_task, []),
            "windows": n_windows,
            "stable": stable,
        }


def _task_p99(window: _Window, tasks: Sequence[RemoteTask], swap_task: str) -> tuple[float, float]:
    idx = next(i for i, t in enumerate(tasks) if t.task_id == swap_task)
    mine = window.latencies_ms[window.task_index == idx]
    other = window.latencies_ms[window.task_index != idx]
    return (
        float(np.percentile(mine, 99)) if mine.size else math.nan,
        float(np.percentile(other, 99)) if other.size else math.nan,
    )


def run_bench(config: BenchConfig, *, progress: Callable[[str], None] | None = None) -> BenchReport:
    """Run a sweep and return its report (see :class:`Bench`)."""
    return Bench(config, progress=progress).run()


def config_dict(config: BenchConfig) -> dict[str, Any]:
    """The config as plain data (for the JSON report), without credentials."""
    data = asdict(replace(config, channel=replace(config.channel, token=None)))
    data.pop("admin_channel", None)
    data["channel"] = {"target": config.channel.target, "tls": config.channel.tls}
    return data
