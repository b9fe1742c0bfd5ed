"""Soak: minutes of mixed-task load with a head swap every second; RSS growth, errors and p99 drift.

    .venv/bin/python benchmarks/soak.py                   # 10 minutes (the documented run)
    .venv/bin/python benchmarks/soak.py --minutes 2       # a shorter run

One ``polyhead serve`` process (benchmarks.server_common.serve) on a random classic-mixed bundle;
``--clients`` separate client processes each run a closed loop of ``Act`` calls on a random task
(cartpole, acrobot, cartpole-continuous) with 1 to 8 observations, raw gRPC stubs without retries, so
every non-OK status counts as an error. Every second the main process swaps a head: it uploads a new
version of one task (``LoadHead``, activated: validate, warm up, one-reference swap) and unloads that
task's previous version, rotating over the tasks, so each swap exercises load, swap and unload while the
clients keep acting.

Reported (printed, and as JSON with ``--json-out``): calls and errors (by code), swaps and swap errors, RSS
of the server sampled every second, its growth after the warm-up (median of the 10 samples after the
warm-up vs the last 10), p50/p99 of the call latency per minute, and p99 drift (the last minute's p99 vs
the first minute after the warm-up). Targets (issue 7): zero errors, RSS growth < 5 %, p99 drift < 20 %.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.server_common import build_bundle, obs_for, serve

TASKS = ("cartpole", "acrobot", "cartpole-continuous")


def client_process(target: str, seconds: float, seed: int, queue: Any) -> None:
    """Closed-loop Act calls until ``seconds`` pass; puts (end times, latencies, error codes) on ``queue``."""
    import grpc

    from polyhead.tensors import to_proto
    from polyhead.v1 import policy_pb2, policy_pb2_grpc

    rng = np.random.default_rng(seed)
    requests = [
        policy_pb2.ActRequest(
            task_id=task, observations=to_proto(obs_for(task, rows, rng)), deterministic=bool(rows % 2)
        )
        for task in TASKS
        for rows in range(1, 9)
    ]
    ends: list[float] = []
    latencies: list[float] = []
    errors: dict[str, int] = {}
    with grpc.insecure_channel(target) as channel:
        stub = policy_pb2_grpc.PolicyServiceStub(channel)  # type: ignore[no-untyped-call]
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            request = requests[int(rng.integers(len(requests)))]
            t0 = time.perf_counter()
            try:
                stub.Act(request, timeout=10.0)
            except grpc.RpcError as exc:
                errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
                continue
            latencies.append(time.perf_counter() - t0)
            ends.append(time.time())
    queue.put((ends, latencies, errors))


def swap_loop(admin_target: str, bundle: Path, seconds: float, rss: Any) -> dict[str, Any]:
    """One head swap per second (LoadHead of a new version, activated; UnloadHead of the previous one);
    samples the server's RSS every second through ``rss()``."""
    import grpc

    from polyhead.bundle import Bundle
    from polyhead.v1 import admin_pb2, admin_pb2_grpc

    opened = Bundle.open(bundle)
    heads = {}
    for task in TASKS:
        head = opened.head(task)
        heads[task] = (head.read_onnx(), json.dumps(head.meta.with_(version=0, head_sha256="").to_json()))
    active = {task: opened.head(task).version for task in TASKS}
    swaps = 0
    swap_errors: dict[str, int] = {}
    samples: list[tuple[float, int]] = []
    with grpc.insecure_channel(admin_target) as channel:
        admin = admin_pb2_grpc.HeadAdminStub(channel)  # type: ignore[no-untyped-call]
        start = time.monotonic()
        tick = 0
        while time.monotonic() - start < seconds:
            tick += 1
            task = TASKS[tick % len(TASKS)]
            onnx, head_json = heads[task]
            try:
                resp = admin.LoadHead(
                    admin_pb2.LoadHeadRequest(task_id=task, onnx=onnx, head_json=head_json, activate=True),
                    timeout=30,
                )
                previous, active[task] = active[task], resp.active_version
                admin.UnloadHead(admin_pb2.UnloadHeadRequest(task_id=task, version=previous), timeout=30)
                swaps += 1
            except grpc.RpcError as exc:
                swap_errors[exc.code().name] = swap_errors.get(exc.code().name, 0) + 1
            samples.append((time.time(), rss()))
            time.sleep(max(0.0, start + tick - time.monotonic()))
    return {"swaps": swaps, "swap_errors": swap_errors, "rss": samples}


def percentile_ms(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if values else math.nan


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the run (default 10)")
    parser.add_argument("--warmup-minutes", type=float, default=1.0, help="excluded from growth/drift (1)")
    parser.add_argument("--clients", type=int, default=4, help="client processes (default 4)")
    parser.add_argument("--bundle", type=Path, help="bundle to serve (default: a random classic-mixed one)")
    parser.add_argument("--json-out", type=Path, help="write the summary (with per-minute figures) here")
    args = parser.parse_args()
    seconds = args.minutes * 60.0
    if seconds <= args.warmup_minutes * 60.0 + 60.0:
        parser.error("--minutes must exceed --warmup-minutes by at least one minute")

    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or build_bundle(Path(tmp) / "bundle")
        with serve(bundle, "--no-watch") as server:
            ctx = mp.get_context("spawn")
            queue = ctx.Queue()
            procs = [
                ctx.Process(target=client_process, args=(server.target, seconds, seed, queue))
                for seed in range(args.clients)
            ]
            started = time.time()
            for proc in procs:
                proc.start()
            swaps = swap_loop(server.admin_target, bundle, seconds, server.rss_bytes)
            results = [queue.get(timeout=300) for _ in procs]
            for proc in procs:
                proc.join(timeout=60)

    ends = np.concatenate([np.asarray(r[0]) for r in results]) - started
    latencies = np.concatenate([np.asarray(r[1]) for r in results])
    errors: dict[str, int] = {}
    for r in results:
        for code, n in r[2].items():
            errors[code] = errors.get(code, 0) + n
    minutes = int(seconds // 60)
    per_minute = []
    for m in range(minutes):
        sel = latencies[(ends >= m * 60) & (ends < (m + 1) * 60)].tolist()
        per_minute.append(
            {
                "minute": m + 1,
                "calls": len(sel),
                "p50_ms": percentile_ms(sel, 50),
                "p99_ms": percentile_ms(sel, 99),
            }
        )
    warm = math.ceil(args.warmup_minutes)
    first, last = per_minute[warm], per_minute[-1]
    rss = [(t - started, b) for t, b in swaps["rss"]]
    after_warmup = [b for t, b in rss if t >= args.warmup_minutes * 60][:10]
    final = [b for _, b in rss][-10:]
    rss_start, rss_end = float(np.median(after_warmup)), float(np.median(final))
    summary = {
        "minutes": args.minutes,
        "clients": args.clients,
        "calls": len(latencies),
        "errors": sum(errors.values()),
        "errors_by_code": errors,
        "swaps": swaps["swaps"],
        "swap_errors": sum(swaps["swap_errors"].values()),
        "swap_errors_by_code": swaps["swap_errors"],
        "rss_mib_after_warmup": rss_start / 2**20,
        "rss_mib_end": rss_end / 2**20,
        "rss_mib_max": max(b for _, b in rss) / 2**20,
        "rss_growth_pct": 100.0 * (rss_end - rss_start) / rss_start,
        "p99_ms_first_minute_after_warmup": first["p99_ms"],
        "p99_ms_last_minute": last["p99_ms"],
        "p99_drift_pct": 100.0 * (last["p99_ms"] - first["p99_ms"]) / first["p99_ms"],
        "p50_ms_overall": percentile_ms(latencies.tolist(), 50),
        "p99_ms_overall": percentile_ms(latencies.tolist(), 99),
        "per_minute": per_minute,
        "rss_mib_per_minute": [
            round(float(np.median([b for t, b in rss if m * 60 <= t < (m + 1) * 60])) / 2**20, 1)
            for m in range(minutes)
        ],
    }
    for row in per_minute:
        print(
            f"minute {row['minute']:>3}: {row['calls']:>7} calls, "
            f"p50 {row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms"
        )
    print(f"RSS MiB per minute (median): {summary['rss_mib_per_minute']}")
    print(
        f"calls {summary['calls']}, errors {summary['errors']} {errors}, swaps {summary['swaps']} "
        f"(errors {summary['swap_errors']}), RSS {summary['rss_mib_after_warmup']:.1f} -> "
        f"{summary['rss_mib_end']:.1f} MiB ({summary['rss_growth_pct']:+.2f} %), p99 "
        f"{summary['p99_ms_first_minute_after_warmup']:.2f} -> {summary['p99_ms_last_minute']:.2f} ms "
        f"(drift {summary['p99_drift_pct']:+.1f} %)"
    )
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("per_minute", "rss_mib_per_minute")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
