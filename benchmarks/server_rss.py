"""Memory under swaps and traffic: does the server's RSS or its Python object count grow per swap?

    .venv/bin/python benchmarks/server_rss.py [--seconds 180] [--swap-interval 0.05] [--no-swaps]

The server runs in this process (``BackgroundServer``) so its RSS and the number of live Python objects
can be read directly; two client processes keep calling ``Act`` (one call at a time each, the soak's
request mix: three tasks, 1-8 observations); a thread uploads a new version of one task every
``--swap-interval`` seconds (``LoadHead``, activated) and unloads that task's previous version, rotating
over the tasks. Every sixth of the run it prints RSS, RSS after ``malloc_trim`` and the object count
(after a full garbage collection), then one JSON summary line.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_common import build_bundle, head_variant, machine_note

TASKS = ("cartpole", "acrobot", "cartpole-continuous")

CLIENT = r"""
import sys, time, numpy as np, grpc
sys.path.insert(0, sys.argv[3])
from server_common import obs_for
from polyhead.tensors import to_proto
from polyhead.v1 import policy_pb2, policy_pb2_grpc
rng = np.random.default_rng(int(sys.argv[4]))
tasks = ("cartpole", "acrobot", "cartpole-continuous")
reqs = [policy_pb2.ActRequest(task_id=t, observations=to_proto(obs_for(t, r, rng)), deterministic=bool(r % 2))
        for t in tasks for r in range(1, 9)]
end, n = time.time() + float(sys.argv[2]), 0
with grpc.insecure_channel(sys.argv[1]) as ch:
    stub = policy_pb2_grpc.PolicyServiceStub(ch)
    while time.time() < end:
        stub.Act(reqs[n % len(reqs)], timeout=10)
        n += 1
print(n)
"""


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _swapper(
    admin_target: str, bundle: Path, interval: float, stop: threading.Event, count: list[int]
) -> None:
    import grpc

    from polyhead.v1 import admin_pb2, admin_pb2_grpc

    variants = {t: [head_variant(bundle, t, seed=s) for s in (1, 2)] for t in TASKS}
    previous = dict.fromkeys(TASKS, 1)
    with grpc.insecure_channel(admin_target) as channel:
        admin = admin_pb2_grpc.HeadAdminStub(channel)  # type: ignore[no-untyped-call]
        while not stop.is_set():
            task = TASKS[count[0] % len(TASKS)]
            onnx, head_json = variants[task][count[0] % 2]
            loaded = admin.LoadHead(
                admin_pb2.LoadHeadRequest(task_id=task, onnx=onnx, head_json=head_json, activate=True)
            )
            admin.UnloadHead(admin_pb2.UnloadHeadRequest(task_id=task, version=previous[task]))
            previous[task] = loaded.head.version
            count[0] += 1
            stop.wait(interval)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=180.0, help="length of the run")
    parser.add_argument("--swap-interval", type=float, default=0.05, help="seconds between swap cycles")
    parser.add_argument("--no-swaps", action="store_true", help="traffic only")
    args = parser.parse_args()

    from polyhead.server.app import BackgroundServer
    from polyhead.server.settings import ServerSettings

    bundle = build_bundle(Path(tempfile.gettempdir()) / "polyhead-bench-bundle")
    settings = ServerSettings(
        bundle=bundle, host="127.0.0.1", port=0, admin_port=0, metrics_port=None, watch_bundle=False
    )
    libc = ctypes.CDLL("libc.so.6")
    samples: list[dict[str, Any]] = []
    with BackgroundServer(settings) as srv:
        stop, cycles = threading.Event(), [0]
        swapper = None
        if not args.no_swaps:
            swapper = threading.Thread(
                target=_swapper,
                args=(srv.admin_target, bundle, args.swap_interval, stop, cycles),
                daemon=True,
            )
            swapper.start()
        here = str(Path(__file__).resolve().parent)
        clients = [
            subprocess.Popen(
                [sys.executable, "-c", CLIENT, srv.target, str(args.seconds), here, str(i)],
                stdout=subprocess.PIPE,
                text=True,
            )
            for i in range(2)
        ]
        started = time.monotonic()
        while any(c.poll() is None for c in clients):
            time.sleep(args.seconds / 6)
            gc.collect()
            rss = _rss_mib()
            libc.malloc_trim(0)
            sample = {
                "t_s": round(time.monotonic() - started),
                "rss_mib": round(rss, 1),
                "rss_trimmed_mib": round(_rss_mib(), 1),
                "objects": len(gc.get_objects()),
                "swap_cycles": cycles[0],
            }
            samples.append(sample)
            print(json.dumps(sample), flush=True)
        stop.set()
        if swapper is not None:
            swapper.join(timeout=30)
        calls = sum(int(c.communicate()[0].strip() or 0) for c in clients)
    first, last = samples[0], samples[-1]
    growth_cycles = last["swap_cycles"] - first["swap_cycles"]
    summary = {
        "calls": calls,
        "swap_cycles": last["swap_cycles"],
        "rss_first_mib": first["rss_mib"],
        "rss_last_mib": last["rss_mib"],
        "rss_growth_pct": round(100 * (last["rss_mib"] / first["rss_mib"] - 1), 3),
        "kib_per_swap_cycle": round(1024 * (last["rss_mib"] - first["rss_mib"]) / growth_cycles, 3)
        if growth_cycles
        else None,
        "objects_first_last": [first["objects"], last["objects"]],
        "machine": machine_note(),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
