"""Hot swaps: p99 of the tasks not being swapped during 100 swaps vs steady state, and RSS after 1,000
load-activate-unload cycles vs after 10.

    .venv/bin/python benchmarks/server_swap.py [--bundle DIR] [--seconds 6] [--cycles 1000]

Load: 8 concurrent clients in a spawned process calling Act on `cartpole` and `acrobot`; meanwhile the
driver swaps `cartpole-continuous` between two loaded versions 100 times (SetActiveVersion), spread over
the window. Steady and swapping windows alternate. A cycle is LoadHead (new version from bytes,
activate) then UnloadHead of the previous version. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_common import admin_stub, build_bundle, head_variant, load, machine_note, serve

from polyhead.v1 import admin_pb2

SWAPPED = "cartpole-continuous"
OTHERS = ("cartpole", "acrobot")


def _window(target: str, seconds: float, swap: Any | None) -> float:
    result: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: result.update(r=load(target, "act", concurrency=8, duration=seconds, tasks=OTHERS))
    )
    thread.start()
    if swap is not None:
        time.sleep(1.5)  # the client process starts (spawn) before its timed window
        for i in range(100):
            swap(2 if i % 2 == 0 else 1)
            time.sleep(max(0.0, (seconds - 2.0) / 100))
    thread.join()
    return float(result["r"].pct(99) * 1e6)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, default=Path("/tmp/polyhead-bench-bundle"))
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cycles", type=int, default=1000)
    args = parser.parse_args()
    bundle = build_bundle(args.bundle)
    variants = [head_variant(bundle, SWAPPED, seed=s) for s in (1, 2)]
    report: dict[str, Any] = {"benchmark": "server_swap", **machine_note()}
    with serve(bundle, "--no-watch") as server:
        admin = admin_stub(server)
        onnx, head_json = variants[0]
        admin.LoadHead(
            admin_pb2.LoadHeadRequest(task_id=SWAPPED, onnx=onnx, head_json=head_json, activate=False)
        )

        def swap(version: int) -> None:
            admin.SetActiveVersion(admin_pb2.SetActiveVersionRequest(task_id=SWAPPED, version=version))

        rounds = []
        for _ in range(args.rounds):
            steady = _window(server.target, args.seconds, None)
            swapping = _window(server.target, args.seconds, swap)
            rounds.append({"steady_p99_us": steady, "swapping_p99_us": swapping, "ratio": swapping / steady})
            print(
                f"p99 unswapped tasks: steady {steady:.0f} us, during 100 swaps {swapping:.0f} us "
                f"(x{swapping / steady:.2f})",
                file=sys.stderr,
            )
        report["p99_during_swaps"] = {
            "rounds": rounds,
            "median_ratio": statistics.median(r["ratio"] for r in rounds),
        }

        swap(1)
        previous = 2
        rss: dict[int, int] = {}
        t0 = time.perf_counter()
        for cycle in range(1, args.cycles + 1):
            onnx, head_json = variants[cycle % 2]
            loaded = admin.LoadHead(
                admin_pb2.LoadHeadRequest(task_id=SWAPPED, onnx=onnx, head_json=head_json, activate=True)
            )
            admin.UnloadHead(admin_pb2.UnloadHeadRequest(task_id=SWAPPED, version=previous))
            previous = loaded.head.version
            if cycle in (10, 100, args.cycles):
                rss[cycle] = server.rss_bytes()
                print(f"after {cycle} cycles: RSS {rss[cycle] / 2**20:.1f} MiB", file=sys.stderr)
        seconds = time.perf_counter() - t0
        report["rss_cycles"] = {
            "rss_mib": {str(k): v / 2**20 for k, v in rss.items()},
            "ratio_last_vs_10": rss[args.cycles] / rss[10],
            "cycles_per_s": args.cycles / seconds,
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
