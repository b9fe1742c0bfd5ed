"""False alarms of the server's live-return monitor over a long stationary run: nothing changes; does
``polyhead_task_regressed`` ever fire?

    nice -n 10 .venv/bin/python benchmarks/livewatch_stationary.py --bundle demo-report/bundle \
        --minutes 30 --out docs/livewatch_stationary.json

A real ``polyhead serve`` (subprocess, default monitor: blocks of 20 episodes, alpha 1e-3, margins 0.2
live / 0.8 against the evaluation return) serves the bundle; stream simulators with sampled actions play
every task as the drift demo does (three clients on the first task, one on each other) for ``--minutes``
of wall clock. Every 10 s the server's metrics are read: regression events per task (the false alarms),
and each task's episode count under its stable version (``polyhead_version_episode_return_count``), from
which the number of test blocks follows (episodes / window).
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from polyhead.bundle import Bundle
from polyhead.server.process import ServeProcess
from polyhead.trainer.updater.fleet import SimulatorFleet


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, required=True, help="a trained bundle (every task is played)")
    parser.add_argument("--minutes", type=float, default=30.0, help="wall-clock minutes of traffic")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    tasks = list(Bundle.open(args.bundle).manifest.tasks)
    started = time.monotonic()
    samples: list[dict[str, Any]] = []
    with ServeProcess(args.bundle, log_path=Path(f"/tmp/livewatch-stationary-{args.seed}.log")) as server:
        fleets = [
            SimulatorFleet(
                server.target, task, clients=3 if i == 0 else 1, episodes_per_round=2, mode="stream",
                seed=args.seed * 1_000 + 10 * i,
            ).start()
            for i, task in enumerate(tasks)
        ]  # fmt: skip
        try:
            while time.monotonic() - started < args.minutes * 60.0:
                time.sleep(10.0)
                m = scrape(server.metrics_url)
                row: dict[str, Any] = {"t_s": round(time.monotonic() - started, 1), "tasks": {}}
                for task in tasks:
                    row["tasks"][task] = {
                        "episodes": m.get(
                            ("polyhead_version_episode_return_count", (("task", task), ("version", "1"))), 0.0
                        ),
                        "regressed_events": m.get(
                            ("polyhead_regression_events_total", (("kind", "regressed"), ("task", task))), 0.0
                        ),
                        "regressed_now": m.get(("polyhead_task_regressed", (("task", task),)), 0.0),
                    }
                samples.append(row)
                total = sum(v["episodes"] for v in row["tasks"].values())
                alarms = sum(v["regressed_events"] for v in row["tasks"].values())
                print(f"{row['t_s']:7.0f} s  {total:6.0f} episodes  {alarms:.0f} false alarms", flush=True)
        finally:
            stats = [f.stop() for f in fleets]
    last = samples[-1]["tasks"] if samples else {}
    window = 20  # ServerSettings.regression_window
    result = {
        "bundle": str(args.bundle),
        "minutes": args.minutes,
        "wall_seconds": round(time.monotonic() - started, 1),
        "tasks": {
            t: {
                "episodes": int(v["episodes"]),
                # Every block is tested: against the evaluation return (sign test) until the reference
                # exists, then against it (Mann-Whitney).
                "blocks_tested": int(v["episodes"]) // window,
                "false_alarms": int(v["regressed_events"]),
                "mean_return": round(sum(r for _, _, r in s.returns) / max(1, len(s.returns)), 1),
            }
            for (t, v), s in zip(last.items(), stats, strict=True)
        },
        "failed_requests": sum(s.failed_requests for s in stats),
        "timeline": samples,
    }
    result["episodes"] = sum(v["episodes"] for v in result["tasks"].values())
    result["false_alarms"] = sum(v["false_alarms"] for v in result["tasks"].values())
    result["blocks_tested"] = sum(v["blocks_tested"] for v in result["tasks"].values())
    result["expected_at_most"] = round(result["blocks_tested"] * 1e-3, 3)
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in result.items() if k != "timeline"}, indent=1))


if __name__ == "__main__":
    main()
