"""What tracing costs: Act p50 and server CPU per call with tracing absent, off, and on (ratio 1.0, 0.01).

    nice -n 5 .venv/bin/python benchmarks/server_tracing.py [--rounds 3] [--calls 2000] [--duration 5]

Four ``polyhead serve`` processes run side by side on the same bundle:

* ``absent``: the code before the tracing hooks existed (``--baseline-rev``, by default the parent of the
  commit that added ``server/tracing.py``), exported with ``git archive`` and put first on PYTHONPATH;
* ``off``: this tree, tracing off (the default);
* ``on_1``: tracing on, every call sampled; ``on_0.01``: tracing on, sample ratio 0.01.

The traced servers export over OTLP/gRPC through the real ``BatchSpanProcessor`` to a minimal collector in
its own process, which counts the spans it receives. Configurations alternate inside each round, so drift on
a shared machine hits all of them; each round measures, per server, a lone client's Act latency (one call
at a time, raw bytes, in a spawned process) with the server's CPU over those calls, then ``--concurrency``
clients for ``--duration`` seconds (requests/s, server CPU per call). Ratios are against ``absent`` of the
same round; the medians over rounds are printed as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_common import REPO, build_bundle, load, machine_note, sequential_latency_proc, serve


def _collector_main(port_queue: Any, stop: Any, counts: Any) -> None:
    """An OTLP/gRPC TraceService that counts received spans per service.name, until ``stop`` is set."""
    from concurrent import futures

    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    received: dict[str, int] = {}

    class Collector(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request: Any, context: Any) -> Any:  # noqa: N802, ARG002 (the OTLP signature)
            for resource_spans in request.resource_spans:
                service = next(
                    (
                        a.value.string_value
                        for a in resource_spans.resource.attributes
                        if a.key == "service.name"
                    ),
                    "?",
                )
                n = sum(len(scope.spans) for scope in resource_spans.scope_spans)
                received[service] = received.get(service, 0) + n
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Collector(), server)
    port_queue.put(server.add_insecure_port("127.0.0.1:0"))
    server.start()
    stop.wait()
    server.stop(None)
    counts.put(dict(received))


def _baseline_tree(rev: str | None, into: Path) -> tuple[str, Path]:
    """The source tree of ``rev`` (default: before server/tracing.py existed) under ``into``."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True, text=True).stdout

    if rev is None:
        added = git("log", "--diff-filter=A", "--format=%H", "--", "server/tracing.py").split()
        if not added:
            raise SystemExit("server/tracing.py has no adding commit; pass --baseline-rev")
        rev = added[-1] + "^"
    sha = git("rev-parse", rev).strip()
    archive = subprocess.run(["git", "archive", sha], cwd=REPO, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return sha, into


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, default=Path("/tmp/polyhead-bench-bundle"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=2000, help="sequential Act calls per server and round")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of concurrent load per server")
    parser.add_argument("--baseline-rev", default=None, help="git revision of the 'absent' server")
    args = parser.parse_args()
    bundle = build_bundle(args.bundle)

    ctx = mp.get_context("spawn")
    port_queue, counts_queue, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    collector = ctx.Process(target=_collector_main, args=(port_queue, stop, counts_queue), daemon=True)
    collector.start()
    otlp = f"127.0.0.1:{port_queue.get(timeout=60)}"

    with tempfile.TemporaryDirectory(prefix="polyhead-absent-") as tmp, ExitStack() as stack:
        sha, tree = _baseline_tree(args.baseline_rev, Path(tmp))
        absent_env = {"PYTHONPATH": str(tree) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        traced = ("--tracing", "--tracing-endpoint", otlp)
        servers = {
            "absent": stack.enter_context(serve(bundle, "--no-watch", env=absent_env)),
            "off": stack.enter_context(serve(bundle, "--no-watch")),
            "on_1": stack.enter_context(
                serve(
                    bundle,
                    "--no-watch",
                    *traced,
                    "--tracing-service-name",
                    "on_1",
                    "--tracing-sample-ratio",
                    "1",
                )
            ),
            "on_0.01": stack.enter_context(
                serve(
                    bundle,
                    "--no-watch",
                    *traced,
                    "--tracing-service-name",
                    "on_0.01",
                    "--tracing-sample-ratio",
                    "0.01",
                )
            ),
        }
        calls: dict[str, int] = dict.fromkeys(servers, 0)
        rounds: list[dict[str, dict[str, float]]] = []
        for r in range(args.rounds):
            row: dict[str, dict[str, float]] = {}
            order = list(servers) if r % 2 == 0 else list(reversed(servers))
            for name in order:
                server = servers[name]
                cpu0 = server.cpu_seconds()
                lat = sequential_latency_proc(server.target, "act", args.calls)
                cpu1 = server.cpu_seconds()
                result = load(server.target, "act", concurrency=args.concurrency, duration=args.duration)
                cpu2 = server.cpu_seconds()
                # The sequential run also serves 200 warm-up calls; the CPU covers them too.
                calls[name] += args.calls + 200 + result.requests + 1
                row[name] = {
                    "act_p50_us": float(np.percentile(lat, 50) * 1e6),
                    "act_p99_us": float(np.percentile(lat, 99) * 1e6),
                    "lone_cpu_us_per_call": (cpu1 - cpu0) / (args.calls + 200) * 1e6,
                    "load_rps": result.rps,
                    "load_cpu_us_per_call": (cpu2 - cpu1) / max(result.requests + 1, 1) * 1e6,
                }
            for name in servers:
                for key in ("act_p50_us", "lone_cpu_us_per_call", "load_rps", "load_cpu_us_per_call"):
                    row[name][key.replace("_us", "") + "_ratio"] = row[name][key] / row["absent"][key]
            rounds.append(row)
            print(
                f"round {r}: "
                + "; ".join(
                    f"{n}: p50 {v['act_p50_us']:.0f} us ({v['act_p50_ratio']:.3f}x), lone cpu "
                    f"{v['lone_cpu_us_per_call']:.0f} us ({v['lone_cpu_per_call_ratio']:.3f}x), "
                    f"load {v['load_rps']:.0f}/s cpu {v['load_cpu_us_per_call']:.0f} us "
                    f"({v['load_cpu_per_call_ratio']:.3f}x)"
                    for n, v in row.items()
                ),
                file=sys.stderr,
            )
    # The servers stopped (their span processors flushed): every exported span is at the collector.
    stop.set()
    received = counts_queue.get(timeout=60)
    collector.join(timeout=30)
    median = {
        name: {key: statistics.median(rnd[name][key] for rnd in rounds) for key in rounds[0][name]}
        for name in rounds[0]
    }
    spans = {name: received.get(name, 0) / calls[name] for name in ("on_1", "on_0.01")}
    print(
        json.dumps(
            {
                "benchmark": "server_tracing",
                **machine_note(),
                "baseline_rev": sha,
                "calls": args.calls,
                "concurrency": args.concurrency,
                "duration_s": args.duration,
                "spans_exported_per_call": spans,
                "median": median,
                "rounds": rounds,
                "time": time.time(),
            }
        )
    )


if __name__ == "__main__":
    main()
