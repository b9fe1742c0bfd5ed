"""Many heads: memory per loaded head and single-client Act p50 with 1,000 extra heads loaded vs the
bundle's own three.

    .venv/bin/python benchmarks/server_heads.py [--bundle DIR] [--heads 1000] [--calls 2000]

The extra heads are 1,000 tasks (`extra-0000` ...) uploaded with LoadHead (cartpole's head bytes under new
task ids), each with its own onnxruntime session, health entry and metrics series. Memory per head is the
server's RSS growth divided by the head count. Latency: one client in a spawned process calling Act on
`cartpole`, one observation, before and after. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_common import admin_stub, build_bundle, machine_note, sequential_latency_proc, serve

from polyhead.bundle import Bundle
from polyhead.v1 import admin_pb2


def _p50(target: str, calls: int, rounds: int) -> float:
    return statistics.median(
        float(np.percentile(sequential_latency_proc(target, "act", calls), 50) * 1e6) for _ in range(rounds)
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, default=Path("/tmp/polyhead-bench-bundle"))
    parser.add_argument("--heads", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    bundle_dir = build_bundle(args.bundle)
    record = Bundle.open(bundle_dir).head("cartpole")
    onnx = record.read_onnx()
    meta = record.meta.to_json()
    with serve(bundle_dir, "--no-watch") as server:
        admin = admin_stub(server)
        base_p50 = _p50(server.target, args.calls, args.rounds)
        base_rss = server.rss_bytes()
        t0 = time.perf_counter()
        for i in range(args.heads):
            task = f"extra-{i:04d}"
            head_json = json.dumps({**meta, "task": {**meta["task"], "id": task}, "version": 0})
            admin.LoadHead(
                admin_pb2.LoadHeadRequest(task_id=task, onnx=onnx, head_json=head_json, activate=True)
            )
        load_seconds = time.perf_counter() - t0
        time.sleep(1.0)
        many_rss = server.rss_bytes()
        many_p50 = _p50(server.target, args.calls, args.rounds)
    report = {
        "benchmark": "server_heads",
        **machine_note(),
        "heads_added": args.heads,
        "rss_mib_before": base_rss / 2**20,
        "rss_mib_after": many_rss / 2**20,
        "kib_per_head": (many_rss - base_rss) / args.heads / 1024,
        "load_ms_per_head": load_seconds / args.heads * 1e3,
        "p50_us_before": base_p50,
        "p50_us_after": many_p50,
        "p50_ratio": many_p50 / base_p50,
    }
    print(
        f"{args.heads} heads: {report['kib_per_head']:.0f} KiB/head, p50 {base_p50:.0f} -> {many_p50:.0f} us "
        f"(x{report['p50_ratio']:.2f}), {report['load_ms_per_head']:.1f} ms per load",
        file=sys.stderr,
    )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
