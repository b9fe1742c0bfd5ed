"""Multi-task PPO on 1 and 2 ranks (torchrun, gloo on CPU): environment steps/s, wall time, and final
returns at equal samples over seeds.

Each run is a fresh `polyhead train --nproc N` process (torchrun's agent plus N workers) on the same
suite, seed and budget; the runs alternate (1 rank, 2 ranks, 1 rank, ...) so the shared machine's load
hits both alike. Early stopping is off (--solved-evals 0), so every run takes exactly the budget.
Reported per run: wall time of the whole command (start-up, training, evaluations, export), the
training steps/s from rank 0's metrics.csv (steps from the end of the first iteration to the end of the
last, over the wall time between them: evaluations included, start-up and export not), the CPU seconds
of rank 0's process, the load average, and the final evaluation return per task of the exported
(best) checkpoint.

    nice -n 10 .venv/bin/python benchmarks/trainer_distributed.py [--suite cartpole-family]
        [--total-steps 60000] [--seeds 1,2,3] [--nprocs 1,2] [--out docs/trainer_distributed.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from trainer_common import machine, mean_std

ROOT = Path(__file__).resolve().parent.parent


def run_once(
    suite: str, total_steps: int, *, seed: int, nproc: int, work: Path, extra: list[str]
) -> dict[str, Any]:
    out = work / f"n{nproc}-s{seed}"
    command = [
        sys.executable, "-m", "polyhead", "train", "--suite", suite, "--out", str(out),
        "--total-steps", str(total_steps), "--seed", str(seed), "--nproc", str(nproc),
        "--solved-evals", "0", "--exporter", "torchscript", "--no-progress", "--json", *extra,
    ]  # fmt: skip
    load = os.getloadavg()[0]
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    with (out / "logs" / "metrics.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    first, last = rows[0], rows[-1]
    span = float(last["wall_seconds"]) - float(first["wall_seconds"])
    return {
        "nproc": nproc,
        "seed": seed,
        "steps": summary["steps"],
        "command_wall_seconds": round(wall, 1),
        "train_steps_per_second": round((int(last["step"]) - int(first["step"])) / span, 1),
        "rank0_cpu_seconds": float(last["cpu_seconds"]),
        "load_average_1m_at_start": round(load, 1),
        "eval_returns": {t: round(v["eval_return"], 1) for t, v in summary["tasks"].items()},
        "mean_eval_return": round(statistics.mean(v["eval_return"] for v in summary["tasks"].values()), 1),
        "solved": summary["solved"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suite", default="cartpole-family", help="suite name or TOML file")
    parser.add_argument("--total-steps", type=int, default=60_000, help="budget of every run (all tasks)")
    parser.add_argument("--seeds", default="1,2,3", help="comma-separated seeds")
    parser.add_argument("--nprocs", default="1,2", help="comma-separated rank counts")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument(
        "--extra",
        default="",
        help="more `polyhead train` options, space-separated (e.g. '--eval-interval 20000')",
    )
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    nprocs = [int(n) for n in args.nprocs.split(",")]
    print(f"machine: {machine()}", file=sys.stderr)
    results = []
    with tempfile.TemporaryDirectory(prefix="polyhead-ddp-") as tmp:
        for seed in seeds:
            for nproc in nprocs:
                result = run_once(
                    args.suite,
                    args.total_steps,
                    seed=seed,
                    nproc=nproc,
                    work=Path(tmp),
                    extra=args.extra.split(),
                )
                print(json.dumps(result), file=sys.stderr)
                results.append(result)
    lines = [
        "| ranks | wall s (command) | train steps/s | rank-0 CPU s | mean final return | tasks solved |",
        "|---|---|---|---|---|---|",
    ]
    for nproc in nprocs:
        mine = [r for r in results if r["nproc"] == nproc]
        lines.append(
            f"| {nproc} | {mean_std([r['command_wall_seconds'] for r in mine])} "
            f"| {mean_std([r['train_steps_per_second'] for r in mine])} "
            f"| {mean_std([r['rank0_cpu_seconds'] for r in mine])} "
            f"| {mean_std([r['mean_eval_return'] for r in mine])} "
            f"| {' / '.join(str(len(r['solved'])) for r in mine)} |"
        )
    print("\n".join(lines), file=sys.stderr)
    report = {"machine": machine(), "suite": args.suite, "total_steps": args.total_steps, "runs": results}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
