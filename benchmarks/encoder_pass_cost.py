"""What the per-task encoder adds to one inference pass: the batcher's single-request pass on a format-2
bundle (encoder, trunk, head) against a format-1 bundle (padded trunk, head), in one process, interleaved.

    .venv/bin/python benchmarks/encoder_pass_cost.py --v1 DIR --v2 DIR [--task cartpole] [--calls 5000]

Both bundles need the task (a format-1 bundle from an older polyhead, or tests/fixtures/bundle_v1 with
``--task cartpole-long-pole --v2-task ...``). Runs ``Batcher._infer`` on one queued request, the exact pass
a lone client gets, without gRPC; prints one JSON line with the median µs per pass of each and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry

from polyhead.bundle import Bundle
from polyhead.server.actions import Sampling
from polyhead.server.batcher import Batcher, _Work
from polyhead.server.metrics import ServerMetrics
from polyhead.server.registry import HeadRegistry
from polyhead.server.runtime import TrunkRuntime, session_options


def _setup(path: Path) -> tuple[Batcher, HeadRegistry]:
    bundle = Bundle.open(path)
    m = bundle.manifest
    opts = session_options(1)
    trunk = TrunkRuntime(
        bundle.trunk_path.read_bytes(),
        input_size=m.trunk_input_size,
        feature_size=m.feature_size,
        opts=opts,
        padded=not m.has_encoders,
    )
    metrics = ServerMetrics(CollectorRegistry())
    registry = HeadRegistry(bundle, trunk, session_options=opts, warmup_batch_sizes=(1,), metrics=metrics)
    registry.load_bundle_heads()
    batcher = Batcher(trunk, metrics=metrics, max_batch_size=64, max_queue_delay_s=0.001, max_queue_size=64)
    return batcher, registry


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--v1", type=Path, required=True, help="a format-1 bundle")
    parser.add_argument("--v2", type=Path, required=True, help="a format-2 bundle")
    parser.add_argument("--v1-task", default="cartpole")
    parser.add_argument("--v2-task", default="cartpole")
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    loop = asyncio.new_event_loop()
    setups = {"format1": (_setup(args.v1), args.v1_task), "format2": (_setup(args.v2), args.v2_task)}
    timings: dict[str, list[float]] = {k: [] for k in setups}
    for _ in range(args.rounds):
        for name, ((batcher, registry), task) in setups.items():
            head = registry.resolve(task)
            obs = np.zeros((1, 4), np.float32)
            work = _Work(head, obs, Sampling(1, True, None), None, time.perf_counter(), loop.create_future())
            t0 = time.perf_counter()
            for _ in range(args.calls):
                batcher._infer([work])
            timings[name].append((time.perf_counter() - t0) / args.calls * 1e6)
    med = {k: statistics.median(v) for k, v in timings.items()}
    print(
        json.dumps(
            {
                "benchmark": "encoder_pass_cost",
                "median_us": med,
                "ratio": med["format2"] / med["format1"],
                "rounds_us": timings,
            }
        )
    )


if __name__ == "__main__":
    main()
