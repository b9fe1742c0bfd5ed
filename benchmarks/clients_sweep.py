"""The client-side benchmark: ``polyhead bench`` sweeps against a real ``polyhead serve`` process.

    .venv/bin/python benchmarks/clients_sweep.py [--bundle DIR] [--out runs/clients_sweep.json] [--quick]

Builds an untrained classic-mixed bundle (unless ``--bundle``), starts ``python -m polyhead serve`` in its
own process, stages a second version of the cartpole head for the swap run, and measures:

1. unary Act, batch 1, concurrency 1/4/16/64, each level beside the Diagnostics.Echo floor;
2. unary Act, batch 32, concurrency 1/16 (actions/s with batched simulators);
3. ActStream, concurrency 1/16 (one step in flight per session);
4. unary Act at concurrency 16 while the cartpole head flips between two versions every 100 ms.

Prints a markdown table per run and writes every row as JSON to ``--out``. The load generator and the
server share the host's CPUs; the figures say so.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from polyhead.clients import AdminClient
from polyhead.clients.bench import BenchConfig, run_bench
from polyhead.clients.channel import ChannelConfig


@contextlib.contextmanager
def served(bundle: Path) -> Iterator[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        ready = Path(tmp) / "ready.json"
        proc = subprocess.Popen(
            [sys.executable, "-m", "polyhead", "serve", "--bundle", str(bundle), "--port", "0",
             "--admin-port", "0", "--no-metrics", "--no-watch", "--ready-file", str(ready)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while not ready.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("polyhead serve did not become ready")
                time.sleep(0.2)
            yield json.loads(ready.read_text())
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def table(title: str, rows: list[dict[str, Any]]) -> str:
    lines = [
        f"**{title}**",
        "",
        "| mode | C | batch | req/s | actions/s | p50 ms | p99 ms | errors | stable | echo req/s | "
        "echo p50 ms | p50 / echo p50 | swaps | p99 swapped / others / steady ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        e, s = r.get("echo"), r.get("swap")
        lines.append(
            f"| {r['mode']} | {r['concurrency']} | {r['batch']} | {r['rps']:.0f} | "
            f"{r['actions_per_s']:.0f} | "
            f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['errors']} | {'yes' if r['stable'] else 'no'} | "
            + (f"{e['rps']:.0f} | {e['p50_ms']:.2f} | {r['p50_vs_echo']:.2f} | " if e else "- | - | - | ")
            + (
                f"{s['swaps']} | {s['swapped_task_p99_ms']:.2f} / {s['other_tasks_p99_ms']:.2f} / "
                f"{s['steady_p99_ms']:.2f} |"
                if s
                else "- | - |"
            )
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, help="bundle to serve (default: build an untrained one)")
    parser.add_argument("--out", type=Path, default=Path("runs/clients_sweep.json"))
    parser.add_argument("--quick", action="store_true", help="short windows and fewer levels (smoke run)")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        bundle = args.bundle
        if bundle is None:
            from polyhead.trainer.export import build_random_bundle

            bundle = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "bundle"
            build_random_bundle(bundle, suite="classic-mixed", seed=0)
        ports = stack.enter_context(served(bundle))
        target, admin_target = f"127.0.0.1:{ports['port']}", f"127.0.0.1:{ports['admin_port']}"
        with AdminClient(admin_target) as admin:
            versions, _ = admin.versions("cartpole")
            if len(versions) < 2:
                admin.load_head_dir("cartpole", bundle / "heads" / "cartpole" / str(versions[0]),
                                    version=max(versions) + 1, activate=False)  # fmt: skip
        base = BenchConfig(
            channel=ChannelConfig(target),
            window_s=0.5 if args.quick else 1.0,
            max_windows=4 if args.quick else 10,
        )
        runs = {
            "unary, batch 1, with the echo floor": BenchConfig(
                **{
                    **base.__dict__,
                    "concurrency": (1, 4) if args.quick else (1, 4, 16, 64),
                    "echo_floor": True,
                }
            ),
            "unary, batch 32": BenchConfig(**{**base.__dict__, "concurrency": (1, 16), "batch": 32}),
            "stream (ActStream), batch 1": BenchConfig(
                **{**base.__dict__, "concurrency": (1, 16), "mode": "stream"}
            ),
            "unary, batch 1, cartpole head swapped every 100 ms": BenchConfig(
                **{
                    **base.__dict__,
                    "concurrency": (16,),
                    "swap_every_ms": 100.0,
                    "swap_task": "cartpole",
                    "admin_channel": ChannelConfig(admin_target),
                }
            ),
        }
        results: dict[str, Any] = {"host_cpus": os.cpu_count(), "target": target, "runs": {}}
        for title, config in runs.items():
            report = run_bench(config, progress=lambda m: print(m, file=sys.stderr))
            rows = report.to_json()["rows"]
            results["runs"][title] = rows
            print(table(title, rows) + "\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
