"""Slow and abandoned clients, and overload: expired episodes are freed without further traffic, the
experience buffer is bounded and counts what it drops, and at 4x overload the server sheds with
RESOURCE_EXHAUSTED while its memory and the latency of admitted calls stay bounded.

"4x overload" here: four times ``max_queue_size`` calls kept in flight at once (closed loop, no retries),
from two client processes, against a subprocess server with ``max_inflight_calls`` at half of them: the
excess is refused on arrival instead of waiting in the transport. Timing bounds are generous (the real
figures are in docs/reliability.md, measured on a shared 2-core machine).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from reliability_helpers import Replica, metric_value, rss_kib, scrape, start_serve, started, stop, wait_until

from polyhead.server.app import BackgroundServer
from polyhead.tensors import to_proto
from polyhead.v1 import policy_pb2, policy_pb2_grpc

TTL_S = 3.0


def open_episodes(stub: Any, task: str, count: int, prefix: str) -> None:
    """``count`` episodes that each get one served action and are then abandoned (no reward ever)."""
    obs = to_proto(np.zeros((count, 4), np.float32))
    ids = [f"{prefix}-{i}" for i in range(count)]
    stub.Act(policy_pb2.ActRequest(task_id=task, observations=obs, episode_ids=ids), timeout=10)


def test_abandoned_episodes_expire_without_further_traffic(server_settings: Callable[..., Any]) -> None:
    settings = server_settings(episode_ttl_s=TTL_S, watch_bundle=False)
    with BackgroundServer(settings) as srv, grpc.insecure_channel(srv.target) as ch:
        stub = policy_pb2_grpc.PolicyServiceStub(ch)
        open_episodes(stub, "cartpole", 40, "abandoned")
        text = scrape(srv.metrics_port)
        assert metric_value(text, "polyhead_open_episodes") == 40
        # No call of any kind from now on: the server must still free them after the TTL.
        assert wait_until(
            lambda: metric_value(scrape(srv.metrics_port), "polyhead_open_episodes") == 0, 10 * TTL_S
        )
        text = scrape(srv.metrics_port)
        expired = metric_value(
            text, "polyhead_experience_dropped_total", {"task": "cartpole", "reason": "expired"}
        )
        assert expired == 40
        assert srv.running.hub.open_episodes == 0


def test_experience_buffer_is_bounded_and_counts_what_it_drops(server_settings: Callable[..., Any]) -> None:
    settings = server_settings(max_open_episodes=50, watch_bundle=False)
    with BackgroundServer(settings) as srv, grpc.insecure_channel(srv.target) as ch:
        stub = policy_pb2_grpc.PolicyServiceStub(ch)
        for round_ in range(10):
            open_episodes(stub, "cartpole", 30, f"r{round_}")
            assert srv.running.hub.open_episodes <= 50
        text = scrape(srv.metrics_port)
        assert metric_value(text, "polyhead_open_episodes") == 50
        evicted = metric_value(text, "polyhead_experience_dropped_total", {"reason": "evicted"})
        assert evicted == 300 - 50
        # Rewards for evicted episodes are counted as unknown, not an error.
        reports = [policy_pb2.ExperienceReport(task_id="cartpole", episode_id="r0-0", reward=1.0)]
        response = stub.ReportExperience(iter(reports), timeout=10)
        assert (response.accepted, response.dropped) == (0, 1)
        text = scrape(srv.metrics_port)
        assert metric_value(text, "polyhead_experience_dropped_total", {"reason": "unknown_episode"}) == 1


LOAD_SCRIPT = r"""
import asyncio, json, sys, time
import grpc, numpy as np
from polyhead.tensors import to_proto
from polyhead.v1 import policy_pb2, policy_pb2_grpc

target, concurrency, seconds, rows = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])

async def main():
    obs = to_proto(np.zeros((rows, 4), np.float32))
    request = policy_pb2.ActRequest(task_id="cartpole", observations=obs)
    codes, admitted, messages = {}, [], set()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        end = time.monotonic() + seconds
        async def worker():
            while time.monotonic() < end:
                t0 = time.perf_counter()
                try:
                    await stub.Act(request, timeout=30.0)
                    admitted.append(time.perf_counter() - t0)
                    code = "OK"
                except grpc.aio.AioRpcError as exc:
                    code = exc.code().name
                    if code == "RESOURCE_EXHAUSTED":
                        messages.add(exc.details())
                        await asyncio.sleep(0.001)
                codes[code] = codes.get(code, 0) + 1
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    print(json.dumps({"codes": codes, "admitted": admitted, "messages": sorted(messages)}))

asyncio.run(main())
"""


def run_load(
    target: str, *, processes: int, concurrency: int, seconds: float, rows: int
) -> list[dict[str, Any]]:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", LOAD_SCRIPT, target, str(concurrency), str(seconds), str(rows)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=seconds + 120)
        assert proc.returncode == 0, stderr[-3000:]
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


ROWS = 64


@pytest.mark.slow
def test_four_times_overload_sheds_with_bounded_memory_and_latency(tiny_bundle: Path, tmp_path: Path) -> None:
    queue_size, inflight_limit = 16, 32
    server: Replica = started(
        start_serve(
            tiny_bundle,
            tmp_path,
            "overload",
            "--no-watch",
            "--max-queue-size",
            str(queue_size),
            "--max-inflight-calls",
            str(inflight_limit),
        )
    )
    try:
        pid = server.process.pid
        # Warm-up at the queue's size (no shedding expected), then 4x the queue in flight. Calls of 64 rows:
        # passes of more than inline_max_rows run in the inference thread while the loop keeps accepting
        # calls, so requests pile up inside the server (with small calls run inline on the loop thread, the
        # excess waits in the transport instead and a fast, quiet machine sheds nothing).
        run_load(server.target, processes=1, concurrency=queue_size // 2, seconds=3, rows=ROWS)
        rss_before = rss_kib(pid)
        results = run_load(server.target, processes=2, concurrency=2 * queue_size, seconds=8, rows=ROWS)
        rss_after = rss_kib(pid)
        codes: dict[str, int] = {}
        for result in results:
            for code, n in result["codes"].items():
                codes[code] = codes.get(code, 0) + n
        admitted = np.array([s for result in results for s in result["admitted"]])
        messages = sorted({m for result in results for m in result["messages"]})
        p50, p99 = (float(np.percentile(admitted, q)) * 1000 for q in (50, 99))
        text = scrape(server.metrics_port)  # type: ignore[attr-defined]
        rejected = metric_value(text, "polyhead_rejected_requests_total")
        print(
            f"\n4x overload (queue {queue_size}, max_inflight_calls {inflight_limit}, {4 * queue_size} in "
            f"flight, {ROWS} rows per call): codes {codes}; admitted p50 {p50:.1f} ms, p99 {p99:.1f} ms; "
            f"server RSS {rss_before / 1024:.1f} -> {rss_after / 1024:.1f} MiB; "
            f"polyhead_rejected_requests_total {rejected:.0f}; messages {messages!r}"
        )
        assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
        assert codes.get("RESOURCE_EXHAUSTED", 0) > 0 and codes.get("OK", 0) > 0, codes
        # Every refusal says which limit it hit and its value.
        for message in messages:
            assert (
                f"{queue_size} requests waiting" in message
                or f"max_inflight_calls ({inflight_limit})" in message
            ), message
        assert rejected == codes["RESOURCE_EXHAUSTED"]
        assert p99 < 1000.0, f"admitted p99 {p99:.1f} ms"
        assert rss_after - rss_before < 64 * 1024, (rss_before, rss_after)
        # And it still serves normally afterwards.
        with grpc.insecure_channel(server.target) as ch:
            obs = to_proto(np.zeros(4, np.float32))
            stub = policy_pb2_grpc.PolicyServiceStub(ch)
            assert (
                stub.Act(policy_pb2.ActRequest(task_id="cartpole", observations=obs), timeout=10).head_version
                == 1
            )
    finally:
        assert stop(server) == 0
