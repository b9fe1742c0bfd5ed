"""Overload: more calls in flight than the server's bounds, with ``max_inflight_calls`` off and on, A/B.

    .venv/bin/python benchmarks/server_overload.py [--bundle DIR] [--in-flight 64] [--queue 16]
        [--limit 32] [--seconds 8] [--rounds 2] [--json]

Each round starts a fresh server per arm (``--max-queue-size QUEUE``, ``--max-inflight-calls 0`` then
``LIMIT``), warms it up, then keeps ``--in-flight`` Act calls of 8 observations in flight from two
client processes (closed loop, no retries, 1 ms pause after a refusal). Reports calls served per second,
refusals (``RESOURCE_EXHAUSTED``, by the limit named in the message) and admitted-call latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_common import build_bundle, machine_note, serve

ROWS = 8


async def _closed_loop(target: str, concurrency: int, seconds: float) -> dict[str, Any]:
    import grpc

    from polyhead.tensors import to_proto
    from polyhead.v1 import policy_pb2, policy_pb2_grpc

    request = policy_pb2.ActRequest(
        task_id="cartpole", observations=to_proto(np.zeros((ROWS, 4), np.float32)), deterministic=True
    )
    ok: list[float] = []
    refused = {"max_queue_size": 0, "max_inflight_calls": 0}
    other: dict[str, int] = {}
    async with grpc.aio.insecure_channel(target) as channel:
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        end = time.monotonic() + seconds

        async def worker() -> None:
            while time.monotonic() < end:
                t0 = time.perf_counter()
                try:
                    await stub.Act(request, timeout=5.0)
                    ok.append(time.perf_counter() - t0)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        limit = (
                            "max_inflight_calls"
                            if "max_inflight_calls" in exc.details()
                            else "max_queue_size"
                        )
                        refused[limit] += 1
                        await asyncio.sleep(0.001)
                    else:
                        other[exc.code().name] = other.get(exc.code().name, 0) + 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"ok": ok, "refused": refused, "other": other}


def _client(args: tuple[str, int, float], queue: Any) -> None:
    queue.put(asyncio.run(_closed_loop(*args)))


def _load(target: str, in_flight: int, seconds: float) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_client, args=((target, in_flight // 2, seconds), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    parts = [queue.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join()
    latencies = np.concatenate([np.asarray(p["ok"]) for p in parts]) * 1e3
    refused = {k: sum(p["refused"][k] for p in parts) for k in parts[0]["refused"]}
    other: dict[str, int] = {}
    for p in parts:
        for code, n in p["other"].items():
            other[code] = other.get(code, 0) + n
    return {
        "ok_per_s": round(len(latencies) / seconds, 1),
        "refused": refused,
        "other_errors": other,
        "admitted_p50_ms": round(float(np.percentile(latencies, 50)), 2),
        "admitted_p99_ms": round(float(np.percentile(latencies, 99)), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, help="bundle to serve (default: a random classic-mixed one)")
    parser.add_argument(
        "--in-flight", type=int, default=64, help="calls kept in flight (two client processes)"
    )
    parser.add_argument("--queue", type=int, default=16, help="the server's --max-queue-size")
    parser.add_argument("--limit", type=int, default=32, help="--max-inflight-calls of the second arm")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per arm")
    parser.add_argument("--rounds", type=int, default=2, help="off/on pairs")
    parser.add_argument("--json", action="store_true", help="print one JSON line only")
    args = parser.parse_args()
    bundle = args.bundle or build_bundle(Path(tempfile.gettempdir()) / "polyhead-bench-bundle")
    rows = []
    for round_ in range(args.rounds):
        for limit in (0, args.limit):
            flags = ("--no-watch", "--max-queue-size", str(args.queue), "--max-inflight-calls", str(limit))
            with serve(bundle, *flags) as server:
                _load(server.target, args.queue // 2, 2.0)  # warm-up below the bounds
                row = {
                    "round": round_,
                    "max_inflight_calls": limit,
                    **_load(server.target, args.in_flight, args.seconds),
                }
            rows.append(row)
            if not args.json:
                print(json.dumps(row), flush=True)
    summary = {
        "in_flight": args.in_flight,
        "max_queue_size": args.queue,
        "rows": rows,
        "machine": machine_note(),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
