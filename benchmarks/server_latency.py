"""Single-client latency: unary Act (one observation) vs the echo floor, and ActStream vs unary Act.

    .venv/bin/python benchmarks/server_latency.py [--bundle DIR] [--rounds 3] [--calls 2000]

Server: ``polyhead serve`` in its own process; client: one spawned process, one call at a time, raw
request bytes (no client-side protobuf work). Echo and Act alternate in rounds so drift on a shared machine
hits both; every figure is also given as a ratio to the echo floor of its own round. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_common import build_bundle, machine_note, pingpong_proc, sequential_latency_proc, serve


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, default=Path("/tmp/polyhead-bench-bundle"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument(
        "--task", default=None, help="the task to act on (default: cartpole, or else the bundle's first task)"
    )
    args = parser.parse_args()
    bundle = build_bundle(args.bundle)
    tasks = json.loads((bundle / "manifest.json").read_text())["tasks"]
    task = args.task or ("cartpole" if "cartpole" in tasks else tasks[0])
    rounds = []
    with serve(bundle) as server:
        for r in range(args.rounds):
            echo = sequential_latency_proc(server.target, "echo", args.calls)
            act = sequential_latency_proc(server.target, "act", args.calls, task)
            unary = pingpong_proc(server.target, args.calls, "unary", task)
            stream = pingpong_proc(server.target, args.calls, "stream", task)
            row = {
                "echo_p50_us": float(np.percentile(echo, 50) * 1e6),
                "echo_p99_us": float(np.percentile(echo, 99) * 1e6),
                "act_p50_us": float(np.percentile(act, 50) * 1e6),
                "act_p99_us": float(np.percentile(act, 99) * 1e6),
                "unary_msgs_per_s": unary,
                "stream_msgs_per_s": stream,
            }
            row["act_p50_ratio"] = row["act_p50_us"] / row["echo_p50_us"]
            row["act_p99_ratio"] = row["act_p99_us"] / row["echo_p99_us"]
            row["stream_vs_unary"] = stream / unary
            rounds.append(row)
            print(f"round {r}: " + ", ".join(f"{k}={v:.2f}" for k, v in row.items()), file=sys.stderr)
    median = {k: statistics.median(row[k] for row in rounds) for k in rounds[0]}
    print(
        json.dumps(
            {
                "benchmark": "server_latency",
                **machine_note(),
                "task": task,
                "median": median,
                "rounds": rounds,
            }
        )
    )


if __name__ == "__main__":
    main()
