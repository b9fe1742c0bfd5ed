"""Throughput: requests/s at 1/4/16/64 concurrent clients vs the echo floor, cross-task batching on vs
off at 64, trunk passes per request, and actions/s with 64-observation requests.

    .venv/bin/python benchmarks/server_throughput.py [--bundle DIR] [--seconds 4] [--processes 1]

Load comes from spawned client processes (``--processes``; grpc.aio, raw request bytes, the calls spread
over the three tasks of classic-mixed). Echo and Act run back to back at each concurrency on the same
server. Trunk passes per request come from the server's own metrics (``polyhead_trunk_seconds_count`` over
``polyhead_requests_total{method="Act"}``). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_common import ServerProcess, build_bundle, load, machine_note, serve

TASKS = ("cartpole", "acrobot", "cartpole-continuous")


def _act_counts(server: ServerProcess) -> tuple[float, float]:
    m = server.scrape()
    requests = sum(v for k, v in m.items() if k.startswith('polyhead_requests_total{code="OK",method="Act"'))
    return m.get("polyhead_trunk_seconds_count", 0.0), requests


def _measure(
    server: ServerProcess,
    kind: str,
    *,
    concurrency: int,
    seconds: float,
    processes: int,
    rows: int | None = None,
) -> dict[str, Any]:
    passes0, req0 = _act_counts(server)
    cpu0 = server.cpu_seconds()
    result = load(
        server.target,
        kind,
        concurrency=concurrency,
        duration=seconds,
        tasks=TASKS,
        rows=rows,
        processes=min(processes, concurrency),
    )
    cpu1 = server.cpu_seconds()
    passes1, req1 = _act_counts(server)
    out = {
        "rps": result.rps,
        "p50_us": result.pct(50) * 1e6,
        "p99_us": result.pct(99) * 1e6,
        # Server CPU per call: independent of whether the clients or the server were the bottleneck.
        "server_cpu_us_per_request": (cpu1 - cpu0) / max(1, result.requests) * 1e6,
    }
    if kind == "act":
        out["trunk_passes_per_request"] = (passes1 - passes0) / max(1.0, req1 - req0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, default=Path("/tmp/polyhead-bench-bundle"))
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--processes", type=int, default=1, help="client processes")
    parser.add_argument("--concurrency", default="1,4,16,64")
    args = parser.parse_args()
    bundle = build_bundle(args.bundle)
    levels = [int(c) for c in args.concurrency.split(",")]
    report: dict[str, Any] = {"benchmark": "server_throughput", **machine_note(), "levels": {}}
    with serve(bundle) as server:
        for c in levels:
            echo = _measure(server, "echo", concurrency=c, seconds=args.seconds, processes=args.processes)
            act = _measure(server, "act", concurrency=c, seconds=args.seconds, processes=args.processes)
            act["ratio_to_echo_rps"] = act["rps"] / echo["rps"]
            report["levels"][c] = {"echo": echo, "act": act}
            print(
                f"c={c}: echo {echo['rps']:.0f}/s, act {act['rps']:.0f}/s (x{act['ratio_to_echo_rps']:.2f}), "
                f"passes/request {act['trunk_passes_per_request']:.2f}, server CPU per call "
                f"echo {echo['server_cpu_us_per_request']:.0f} us, "
                f"act {act['server_cpu_us_per_request']:.0f} us",
                file=sys.stderr,
            )
        top = max(levels)
        echo = _measure(server, "echo", concurrency=16, seconds=args.seconds, processes=args.processes)
        batch64 = _measure(
            server, "act", concurrency=16, seconds=args.seconds, processes=args.processes, rows=64
        )
        batch64["actions_per_s"] = batch64["rps"] * 64
        batch64["actions_per_s_ratio_to_echo_rps"] = batch64["actions_per_s"] / echo["rps"]
        report["obs64_at_16_clients"] = {"echo": echo, "act": batch64}
        print(
            f"64-obs requests, 16 clients: {batch64['actions_per_s']:.0f} actions/s "
            f"({batch64['rps']:.0f} req/s; echo {echo['rps']:.0f}/s)",
            file=sys.stderr,
        )
    with serve(bundle, "--no-batching") as server:
        echo = _measure(server, "echo", concurrency=top, seconds=args.seconds, processes=args.processes)
        off = _measure(server, "act", concurrency=top, seconds=args.seconds, processes=args.processes)
        off["ratio_to_echo_rps"] = off["rps"] / echo["rps"]
        report["batching_off"] = {"concurrency": top, "echo": echo, "act": off}
        print(
            f"batching off, c={top}: echo {echo['rps']:.0f}/s, act {off['rps']:.0f}/s "
            f"(x{off['ratio_to_echo_rps']:.2f}), passes/request {off['trunk_passes_per_request']:.2f}, "
            f"server CPU per call echo {echo['server_cpu_us_per_request']:.0f} us, "
            f"act {off['server_cpu_us_per_request']:.0f} us",
            file=sys.stderr,
        )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
