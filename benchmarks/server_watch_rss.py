"""Memory over many publishes through the bundle watch: does a replica's RSS stay flat?

    nice -n 10 .venv/bin/python benchmarks/server_watch_rss.py [--publishes 500] [--max-loaded-versions 3]

A real ``polyhead serve`` process watches a bundle (poll interval 0.05 s) while this script publishes one
task's head ``--publishes`` times the way the online updater does (``Bundle.write_head``: an atomic
version directory plus the ``active.json`` pointer), waiting after each publish until the server serves
the new version (``ListHeads``). A client keeps calling ``Act`` on the task throughout. The server's RSS is
read from ``/proc`` after the first 10 % of publishes (warm: allocator pools and caches filled) and at the
end; the summary gives both, the growth in percent and the number of versions the server holds loaded.

Run it once with the default bound and once with ``--max-loaded-versions 100000`` (no bound: every
published version stays loaded, the behaviour before the bound) to see the difference side by side.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_common import build_bundle, head_variant, machine_note, serve

TASK = "cartpole"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--publishes", type=int, default=500, help="versions to publish (default 500)")
    parser.add_argument(
        "--max-loaded-versions", type=int, default=3, help="the server's bound on loaded versions (default 3)"
    )
    parser.add_argument("--json", action="store_true", help="only the JSON summary on stdout")
    args = parser.parse_args()

    import grpc
    import numpy as np

    from polyhead.bundle import Bundle, HeadMeta
    from polyhead.tensors import to_proto
    from polyhead.v1 import admin_pb2, admin_pb2_grpc, policy_pb2, policy_pb2_grpc

    work = Path(tempfile.mkdtemp(prefix="polyhead-watch-rss-"))
    bundle_dir = build_bundle(work / "bundle")
    variants = [head_variant(bundle_dir, TASK, seed=s) for s in (1, 2)]
    bundle = Bundle.open(bundle_dir)
    encoder = bundle.head(TASK).read_encoder()  # None in a format-1 bundle
    warm_at = max(1, args.publishes // 10)
    samples: dict[str, float] = {}
    with serve(
        bundle_dir, "--watch-interval", "0.05", "--max-loaded-versions", str(args.max_loaded_versions)
    ) as server:
        stop = threading.Event()
        calls = [0]

        def traffic() -> None:
            obs = to_proto(np.zeros((4, 4), np.float32))
            with grpc.insecure_channel(server.target) as ch:
                stub = policy_pb2_grpc.PolicyServiceStub(ch)
                while not stop.is_set():
                    stub.Act(policy_pb2.ActRequest(task_id=TASK, observations=obs), timeout=10)
                    calls[0] += 1

        client = threading.Thread(target=traffic, daemon=True)
        client.start()
        admin = admin_pb2_grpc.HeadAdminStub(grpc.insecure_channel(server.admin_target))
        started = time.monotonic()
        loaded: list[int] = []
        for i in range(args.publishes):
            onnx, head_json = variants[i % 2]
            meta = HeadMeta.from_json_text(head_json, where="variant")
            record = bundle.write_head(meta, onnx, encoder=encoder, activate=True)
            deadline = time.monotonic() + 30
            while True:
                heads = admin.ListHeads(admin_pb2.ListHeadsRequest(task_id=TASK), timeout=10).heads
                if any(h.active and h.version == record.version for h in heads):
                    loaded = sorted(h.version for h in heads)
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not pick up version {record.version} in 30 s")
                time.sleep(0.01)
            if i + 1 == warm_at:
                samples["rss_warm_mib"] = server.rss_bytes() / 2**20
            if not args.json and (i + 1) % max(1, args.publishes // 10) == 0:
                print(
                    f"{i + 1:4d} publishes  rss {server.rss_bytes() / 2**20:7.1f} MiB  loaded {len(loaded)}",
                    file=sys.stderr,
                    flush=True,
                )
        samples["rss_end_mib"] = server.rss_bytes() / 2**20
        stop.set()
        client.join(timeout=10)
    summary = {
        "publishes": args.publishes,
        "max_loaded_versions": args.max_loaded_versions,
        "rss_warm_mib": round(samples["rss_warm_mib"], 1),
        "rss_end_mib": round(samples["rss_end_mib"], 1),
        "rss_growth_pct": round(100 * (samples["rss_end_mib"] / samples["rss_warm_mib"] - 1), 2),
        "loaded_versions_at_end": len(loaded),
        "versions_on_disk": len(bundle.versions(TASK)),
        "act_calls": calls[0],
        "seconds": round(time.monotonic() - started, 1),
        "machine": machine_note(),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
