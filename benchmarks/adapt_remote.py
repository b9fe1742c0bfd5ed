"""The online updater in remote mode: a real server, >= 4 real simulator clients acting with sampled
actions, the updater learning from the server's experience feed and publishing versions live.

    .venv/bin/python benchmarks/adapt_remote.py --bundle /tmp/cpf-bundle --clients 4 --samples 30000 \
        --tasks cartpole-reversed cartpole-short-heavy --out docs/adapt_remote.json

Per task: final eval return of the served version, versions published, rollbacks, samples trained on and
dropped, client requests and failed requests (target zero), head versions the clients saw, wall time.
The bundle is copied first, so the source bundle is left as it is.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from trainer_common import machine

from polyhead.server.app import BackgroundServer
from polyhead.server.settings import ServerSettings
from polyhead.taskspec import load_suite
from polyhead.trainer.adapt import adapt, default_config
from polyhead.trainer.updater.fleet import SimulatorFleet
from polyhead.trainer.updater.metrics import UpdaterMetrics


def run_task(args: argparse.Namespace, task_id: str, seed: int) -> dict[str, Any]:
    task = load_suite("cartpole-family").task(task_id)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "bundle"
        shutil.copytree(args.bundle, bundle)
        settings = ServerSettings(
            bundle=bundle, host="127.0.0.1", port=0, admin_port=0, metrics_port=None, watch_interval_s=1.0
        )
        with BackgroundServer(settings) as srv:
            fleet = SimulatorFleet(
                srv.target, task.id, clients=args.clients, episodes_per_round=2, seed=seed, mode=args.mode
            ).start()
            started = time.perf_counter()
            result = adapt(
                default_config(
                    bundle=bundle,
                    task=task,
                    source="remote",
                    server=srv.target,
                    admin_target=srv.admin_target,
                    init=args.init,
                    publish_every=args.publish_every,
                    exporter=args.exporter,
                    guard_timeout_s=60.0,
                    ppo={"total_steps": args.samples, "seed": seed},
                ),
                metrics=UpdaterMetrics(),
            )
            stats = fleet.stop()
            wall = time.perf_counter() - started
    last = [r for _, versions, r in stats.returns if versions == (result.active_version,)]
    return {
        "task": task_id,
        "seed": seed,
        "clients": args.clients,
        "mode": args.mode,
        "summary": result.summary(),
        "wall_seconds": wall,
        "client_episodes": stats.episodes,
        "client_steps": stats.steps,
        "client_requests": stats.requests,
        "failed_requests": stats.failed_requests,
        "client_errors": stats.errors,
        "versions_seen_by_clients": sorted(stats.versions_seen),
        "live_return_final_version": float(np.mean(last)) if last else None,
        "live_episodes_final_version": len(last),
        "client_failures": [repr(e) for e in fleet.failures],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, default=Path("/tmp/cpf-bundle"))
    parser.add_argument("--tasks", nargs="+", default=["cartpole-reversed", "cartpole-short-heavy"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--mode", choices=("unary", "stream"), default="unary")
    parser.add_argument("--samples", type=int, default=30_000)
    parser.add_argument("--publish-every", type=int, default=4)
    parser.add_argument("--init", default="both")
    parser.add_argument("--exporter", default="dynamo")
    parser.add_argument("--out", type=Path, default=Path("docs/adapt_remote.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("server", "clients"):
        logging.getLogger(name).setLevel(logging.WARNING)
    report: dict[str, Any] = {"machine": machine(), "runs": []}
    for task_id in args.tasks:
        for seed in args.seeds:
            r = run_task(args, task_id, seed)
            s = r["summary"]
            print(
                f"{task_id} seed {seed}: final eval {s['final_eval_return']:.1f}, "
                f"{s['versions_published']} versions, {s['rollbacks']} rollbacks, {s['steps']} samples, "
                f"{r['failed_requests']}/{r['client_requests']} failed requests, "
                f"clients saw {r['versions_seen_by_clients']}, {r['wall_seconds']:.0f} s",
                flush=True,
            )
            report["runs"].append(r)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
