"""Shared parts of the server benchmarks: a bundle, a server in its own process, load in other processes.

The server runs as ``python -m polyhead serve`` (its own process and GIL); load comes from separate
client processes (``multiprocessing`` spawn), so client and server never share an interpreter lock.
Every figure is measured beside the echo floor (``Diagnostics.Echo`` on the same server and stack).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from polyhead.server.process import ServeProcess

REPO = Path(__file__).resolve().parents[1]


def build_bundle(out: Path, *, suite: str = "classic-mixed", seed: int = 0) -> Path:
    """A small random (untrained) bundle: the serving cost does not depend on the weights' values."""
    from polyhead.trainer.export import build_random_bundle

    if not (out / "manifest.json").is_file():
        build_random_bundle(out, suite=suite, seed=seed)
    return out


class ServerProcess(ServeProcess):
    """``polyhead.server.process.ServeProcess`` plus what the benchmarks read off the server process."""

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def cpu_seconds(self) -> float:
        """User + system CPU time the server process has used so far."""
        with open(f"/proc/{self.proc.pid}/stat") as fh:
            fields = fh.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def scrape(self) -> dict[str, float]:
        """Unlabelled sums of every sample in the metrics endpoint, keyed by the full sample line name."""
        text = (
            urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10)
            .read()
            .decode()
        )
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out


@contextlib.contextmanager
def serve(bundle: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    """Run ``polyhead serve`` on free ports until the block ends (SIGTERM, then wait)."""
    with ServerProcess(
        bundle,
        args=("--log-level", "WARNING", *args),
        env={**os.environ, **env} if env else None,
        ready_timeout_s=120,
    ) as server:
        yield server


# --- clients ----------------------------------------------------------------------------------------------
def obs_for(task: str, rows: int | None, rng: np.random.Generator) -> np.ndarray[Any, Any]:
    size = {"acrobot": 6, "acrobot-heavy": 6}.get(task, 4)
    shape = (size,) if rows is None else (rows, size)
    return rng.standard_normal(shape).astype(np.float32) * 0.1


def _request_bytes(kind: str, tasks: Sequence[str], rows: int | None, seed: int) -> list[bytes]:
    from polyhead.tensors import to_proto
    from polyhead.v1 import policy_pb2

    rng = np.random.default_rng(seed)
    if kind == "echo":
        return [policy_pb2.EchoRequest(payload=b"x" * 16).SerializeToString()]
    return [
        policy_pb2.ActRequest(
            task_id=task, observations=to_proto(obs_for(task, rows, rng)), deterministic=True
        ).SerializeToString()
        for task in tasks
        for _ in range(4)
    ]


def _method(kind: str) -> str:
    return "/polyhead.v1.Diagnostics/Echo" if kind == "echo" else "/polyhead.v1.PolicyService/Act"


async def _load(  # noqa: PLR0917 - positional: called with a pickled argument tuple
    target: str,
    kind: str,
    concurrency: int,
    duration: float,
    tasks: Sequence[str],
    rows: int | None,
    seed: int,
) -> tuple[int, list[float]]:
    import grpc

    payloads = _request_bytes(kind, tasks, rows, seed)
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(_method(kind))  # raw bytes in and out: no client-side protobuf cost
        await call(payloads[0])
        latencies: list[float] = []
        stop_at = time.perf_counter() + duration

        async def worker(i: int) -> None:
            n = i
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                await call(payloads[n % len(payloads)])
                latencies.append(time.perf_counter() - t0)
                n += 1

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return len(latencies), latencies


def _load_proc(args: tuple[Any, ...], queue: Any) -> None:
    count, lat = asyncio.run(_load(*args))
    queue.put((count, lat))


@dataclass
class LoadResult:
    requests: int
    seconds: float
    latencies: np.ndarray[Any, Any]

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies, q))


def load(
    target: str,
    kind: str,
    *,
    concurrency: int,
    duration: float,
    tasks: Sequence[str] = ("cartpole",),
    rows: int | None = None,
    processes: int = 1,
) -> LoadResult:
    """``concurrency`` in-flight calls in total, spread over ``processes`` client processes (spawned)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    per = [concurrency // processes + (1 if i < concurrency % processes else 0) for i in range(processes)]
    procs = [
        ctx.Process(target=_load_proc, args=((target, kind, c, duration, list(tasks), rows, i), queue))
        for i, c in enumerate(per)
        if c
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=duration + 120) for _ in procs]
    for p in procs:
        p.join()
    lat = np.concatenate([np.asarray(r[1]) for r in results])
    return LoadResult(sum(r[0] for r in results), duration, lat)


def sequential_latency(target: str, kind: str, *, n: int, task: str = "cartpole") -> np.ndarray[Any, Any]:
    """One client, one call at a time (sync stub, raw bytes), ``n`` timed calls after a warm-up."""
    import grpc

    payload = _request_bytes(kind, [task], None, 0)[0]
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(_method(kind))
        for _ in range(200):
            call(payload)
        out = np.empty(n)
        for i in range(n):
            t0 = time.perf_counter()
            call(payload)
            out[i] = time.perf_counter() - t0
    return out


def sequential_latency_proc(target: str, kind: str, n: int, task: str = "cartpole") -> np.ndarray[Any, Any]:
    """:func:`sequential_latency` in a separate spawned process (keeps the benchmark driver's GIL out)."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return np.asarray(pool.apply(sequential_latency, (target, kind), {"n": n, "task": task}))


def record(path: Path, name: str, data: dict[str, Any]) -> None:
    """Append one JSON line of results (benchmarks/results/*.jsonl) for docs/benchmarks.md."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(json.dumps({"benchmark": name, "time": time.time(), **data}) + "\n")


async def _pingpong(target: str, n: int, mode: str, task: str = "cartpole") -> float:
    """Messages per second of one client doing ``n`` sequential steps, by unary Act or one ActStream."""
    import grpc

    from polyhead.tensors import to_proto
    from polyhead.v1 import policy_pb2, policy_pb2_grpc

    obs = to_proto(obs_for(task, None, np.random.default_rng(0)))
    async with grpc.aio.insecure_channel(target) as channel:
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        if mode == "unary":
            request = policy_pb2.ActRequest(task_id=task, observations=obs, deterministic=True)
            for _ in range(200):
                await stub.Act(request)
            t0 = time.perf_counter()
            for _ in range(n):
                await stub.Act(request)
            return n / (time.perf_counter() - t0)
        call = stub.ActStream()
        first = policy_pb2.StepRequest(task_id=task, episode_id="bench", observation=obs, deterministic=True)
        step = policy_pb2.StepRequest(
            task_id=task,
            episode_id="bench",
            observation=obs,
            deterministic=True,
            feedback=policy_pb2.Feedback(reward=1.0),
        )
        await call.write(first)
        await call.read()
        for _ in range(200):
            await call.write(step)
            await call.read()
        t0 = time.perf_counter()
        for _ in range(n):
            await call.write(step)
            await call.read()
        rate = n / (time.perf_counter() - t0)
        await call.done_writing()
        return rate


def _pingpong_proc(target: str, n: int, mode: str, task: str = "cartpole") -> float:
    return asyncio.run(_pingpong(target, n, mode, task))


def pingpong_proc(target: str, n: int, mode: str, task: str = "cartpole") -> float:
    """:func:`_pingpong` in a spawned process."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return float(pool.apply(_pingpong_proc, (target, n, mode, task)))


def emit_report(report: dict[str, Any], out: Path | None) -> None:
    """The report as one JSON line on stdout, and at ``out`` too when given."""
    text = json.dumps(report)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    print(text)


def machine_note() -> dict[str, Any]:
    """Load average and core count at measurement time (the machine is shared)."""
    return {"cpus": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2)}


def head_variant(bundle_dir: Path, task: str, *, seed: int) -> tuple[bytes, str]:
    """Another head for ``task`` on the bundle's trunk (perturbed weights): (head.onnx, head.json)."""
    import torch

    from polyhead.bundle import Bundle
    from polyhead.trainer.export import export_head
    from polyhead.trainer.policy import load_policy

    bundle = Bundle.open(bundle_dir)
    policy = load_policy(bundle)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in policy.head(task).actor.parameters():
            p.add_(torch.randn_like(p))
    meta = bundle.head(task).meta.with_(version=0, head_sha256="")
    return export_head(policy, task), json.dumps(meta.to_json())


def admin_stub(server: ServerProcess) -> Any:
    import grpc

    from polyhead.v1 import admin_pb2_grpc

    return admin_pb2_grpc.HeadAdminStub(grpc.insecure_channel(server.admin_target))
