"""Inline vs executor passes: the same server with every pass on the event-loop thread (up to 1,000,000
rows inline) and with every pass in the inference thread (``inline_max_rows`` 0), and the default,
at 1 and 64 clients, each beside the echo floor in the same server.

    .venv/bin/python benchmarks/server_executor_hop.py [--seconds 3] [--processes 2] [--rounds 2]

Prints one JSON line: per arm and concurrency, Act req/s, p50, server CPU per call and trunk passes per
request, with the echo figures measured just before.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_common import build_bundle, machine_note, serve
from server_throughput import _measure

ARMS = {"default": None, "all_inline": "1000000", "all_executor": "0"}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, default=Path("/tmp/polyhead-bench-bundle"))
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", default="1,64")
    args = parser.parse_args()
    bundle = build_bundle(args.bundle)
    report: dict[str, Any] = {"benchmark": "server_executor_hop", **machine_note(), "rounds": []}
    for r in range(args.rounds):
        out: dict[str, Any] = {}
        for arm, rows in ARMS.items():
            env = None if rows is None else {"POLYHEAD_INLINE_MAX_ROWS": rows}
            with serve(bundle, env=env) as server:
                for c in (int(x) for x in args.concurrency.split(",")):
                    kw = {"concurrency": c, "seconds": args.seconds, "processes": args.processes}
                    echo = _measure(server, "echo", **kw)
                    act = _measure(server, "act", **kw)
                    out[f"{arm}@{c}"] = {"echo": echo, "act": act}
                    cpu = act["server_cpu_us_per_request"], echo["server_cpu_us_per_request"]
                    print(
                        f"round {r} {arm} c={c}: act {act['rps']:.0f}/s (echo {echo['rps']:.0f}/s), "
                        f"p50 {act['p50_us']:.0f} us (echo {echo['p50_us']:.0f}), CPU/call "
                        f"{cpu[0]:.0f} us (echo {cpu[1]:.0f}), "
                        f"passes/request {act['trunk_passes_per_request']:.2f}",
                        file=sys.stderr,
                    )
        report["rounds"].append(out)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
