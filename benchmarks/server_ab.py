"""A/B of server builds or flags, side by side in one run: each arm serves the same bundle in turn, and
every window is measured beside the echo floor of the same server.

    .venv/bin/python benchmarks/server_ab.py --arm base=/path/to/old/checkout --arm new=. \\
        --arm "new-delay0=.:--max-queue-delay-ms 0" [--rounds 2] [--seconds 3] [--processes 2]

An arm is ``NAME=CHECKOUT[:SERVE FLAGS]``: the server process imports polyhead from ``CHECKOUT`` (its
``PYTHONPATH``), so an old commit can be measured beside this one (``git archive`` it to a directory).
Levels: 1 and 64 clients with one observation per call, 16 clients with 64 observations per call. Arms
alternate within each round. Prints one JSON line; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_common import build_bundle, machine_note, serve
from server_throughput import _measure

LEVELS = ((1, None), (64, None), (16, 64))  # (clients, observations per call; None: one, unbatched)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, default=Path("/tmp/polyhead-bench-bundle"))
    parser.add_argument("--arm", action="append", required=True, help="NAME=CHECKOUT[:SERVE FLAGS]")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    bundle = build_bundle(args.bundle)
    arms = []
    for spec in args.arm:
        name, _, rest = spec.partition("=")
        checkout, _, flags = rest.partition(":")
        arms.append((name, str(Path(checkout).resolve()), shlex.split(flags)))
    report: dict[str, Any] = {"benchmark": "server_ab", **machine_note(), "rounds": []}
    for r in range(args.rounds):
        out: dict[str, Any] = {}
        for name, checkout, flags in arms:
            env = {"PYTHONPATH": checkout + os.pathsep + os.environ.get("PYTHONPATH", "")}
            with serve(bundle, *flags, env=env) as server:
                for clients, rows in LEVELS:
                    kw: dict[str, Any] = {"concurrency": clients, "seconds": args.seconds}
                    kw["processes"] = args.processes
                    echo = _measure(server, "echo", **kw)
                    act = _measure(server, "act", rows=rows, **kw)
                    key = f"{clients}x{rows or 1}"
                    out[f"{name}@{key}"] = {"echo": echo, "act": act}
                    cpu, echo_cpu = act["server_cpu_us_per_request"], echo["server_cpu_us_per_request"]
                    print(
                        f"round {r} {name} {key}: act {act['rps']:.0f}/s ({act['rps'] * (rows or 1):.0f} "
                        f"actions/s) echo {echo['rps']:.0f}/s ratio {act['rps'] / echo['rps']:.2f}; p50 "
                        f"{act['p50_us']:.0f} / echo {echo['p50_us']:.0f} us = "
                        f"{act['p50_us'] / echo['p50_us']:.2f}; CPU/call {cpu:.0f} / echo {echo_cpu:.0f} "
                        f"us = {cpu / echo_cpu:.2f}; "
                        f"requests/pass {1 / max(act['trunk_passes_per_request'], 1e-9):.2f}",
                        file=sys.stderr,
                    )
        report["rounds"].append(out)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
