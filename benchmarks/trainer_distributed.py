"""Multi-task PPO on 1 and 2 ranks (torchrun, gloo on CPU): environment steps/s, wall time, and final
returns at equal samples over seeds.

Each run is a fresh `polyhead train --nproc N` process (torchrun's agent plus N workers) on the same
suite, seed and budget; the runs alternate (1 rank, 2 ranks, 1 rank, ...) so the shared machine's load
hits both alike. Early stopping is off (--solved-evals 0), so every run takes exactly the budget.
Reported per run: wall time of the whole command (start-up, training, evaluations, export), the
training steps/s from rank 0's metrics.csv (steps from the end of the first iteration to the end of the
last, over the wall time between them: evaluations included, start-up and export not), the CPU seconds
of rank 0's process, the load average, and the final evaluation return per task of the exported
(best) checkpoint. The comparison line gives the difference of the mean final returns with a two-sided
permutation p-value; `--merge A.json B.json` reports earlier runs together without running anything.

    nice -n 10 .venv/bin/python benchmarks/trainer_distributed.py [--suite cartpole-family]
        [--total-steps 60000] [--seeds 1,2,3] [--nprocs 1,2] [--out docs/trainer_distributed.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from trainer_common import machine, mean_std, run_polyhead, train_steps_per_second, write_report


def run_once(
    suite: str, total_steps: int, *, seed: int, nproc: int, work: Path, extra: list[str]
) -> dict[str, Any]:
    out = work / f"n{nproc}-s{seed}"
    command = [
        sys.executable, "-m", "polyhead", "train", "--suite", suite, "--out", str(out),
        "--total-steps", str(total_steps), "--seed", str(seed), "--nproc", str(nproc),
        "--solved-evals", "0", "--exporter", "torchscript", "--no-progress", "--json", *extra,
    ]  # fmt: skip
    summary, wall, load = run_polyhead(command)
    with (out / "logs" / "metrics.csv").open(newline="") as fh:
        last = list(csv.DictReader(fh))[-1]
    return {
        "nproc": nproc,
        "seed": seed,
        "steps": summary["steps"],
        "command_wall_seconds": round(wall, 1),
        "train_steps_per_second": train_steps_per_second(out),
        "rank0_cpu_seconds": float(last["cpu_seconds"]),
        "load_average_1m_at_start": round(load, 1),
        "eval_returns": {t: round(v["eval_return"], 1) for t, v in summary["tasks"].items()},
        "mean_eval_return": round(statistics.mean(v["eval_return"] for v in summary["tasks"].values()), 1),
        "solved": summary["solved"],
    }


def permutation_p(a: list[float], b: list[float], *, rounds: int = 200_000, seed: int = 0) -> float:
    """Two-sided p-value of the difference of means under random relabelling of the pooled runs (no
    distributional assumption: final returns are bounded at 500 and far from normal)."""
    pooled = np.asarray(a + b, dtype=np.float64)
    observed = abs(np.mean(a) - np.mean(b))
    rng = np.random.default_rng(seed)
    perms = rng.permuted(np.tile(pooled, (rounds, 1)), axis=1)
    diffs = np.abs(perms[:, : len(a)].mean(axis=1) - perms[:, len(a) :].mean(axis=1))
    return float((np.sum(diffs >= observed - 1e-9) + 1) / (rounds + 1))


def compare(results: list[dict[str, Any]], nprocs: list[int], bar: float) -> list[str]:
    """The table per rank count, then each other rank count against the first one."""
    lines = [
        "| ranks | runs | wall s (command) | train steps/s | rank-0 CPU s | mean final return | median "
        f"| runs below {bar:g} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by = {n: [r for r in results if r["nproc"] == n] for n in nprocs}
    for nproc, mine in by.items():
        returns = [r["mean_eval_return"] for r in mine]
        lines.append(
            f"| {nproc} | {len(mine)} | {mean_std([r['command_wall_seconds'] for r in mine])} "
            f"| {mean_std([r['train_steps_per_second'] for r in mine])} "
            f"| {mean_std([r['rank0_cpu_seconds'] for r in mine])} "
            f"| {mean_std(returns)} | {statistics.median(returns):.1f} "
            f"| {sum(x < bar for x in returns)} |"
        )
    base = nprocs[0]
    for nproc in nprocs[1:]:
        a = [r["mean_eval_return"] for r in by[base]]
        b = [r["mean_eval_return"] for r in by[nproc]]
        if len(a) > 1 and len(b) > 1:
            delta = statistics.mean(b) - statistics.mean(a)
            lines.append(
                f"{nproc} vs {base} rank(s): mean final return {delta:+.1f}, "
                f"two-sided permutation p = {permutation_p(a, b):.3f} ({len(a)} and {len(b)} runs)"
            )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suite", default="cartpole-family", help="suite name or TOML file")
    parser.add_argument("--total-steps", type=int, default=60_000, help="budget of every run (all tasks)")
    parser.add_argument("--seeds", default="1,2,3", help="comma-separated seeds or ranges (1-21)")
    parser.add_argument("--nprocs", default="1,2", help="comma-separated rank counts")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument(
        "--extra",
        default="",
        help="more `polyhead train` options, space-separated (e.g. '--eval-interval 20000')",
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        default=None,
        help="no runs: report the runs of these earlier --out files together (same suite and budget)",
    )
    parser.add_argument(
        "--bar", type=float, default=475.0, help="count the runs whose mean final return is below this"
    )
    args = parser.parse_args()
    seeds = [
        s
        for part in args.seeds.split(",")
        for s in (range(int(part.split("-")[0]), int(part.split("-")[1]) + 1) if "-" in part else [int(part)])
    ]
    nprocs = [int(n) for n in args.nprocs.split(",")]
    if args.merge:
        reports = [json.loads(Path(f).read_text()) for f in args.merge]
        keys = {(r["suite"], r["total_steps"]) for r in reports}
        if len(keys) != 1:
            raise SystemExit(f"--merge: the files hold different suites or budgets: {sorted(keys)}")
        results = [run for r in reports for run in r["runs"]]
        print("\n".join(compare(results, sorted({r["nproc"] for r in results}), args.bar)))
        return 0
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
    print("\n".join(compare(results, nprocs, args.bar)), file=sys.stderr)
    report = {"machine": machine(), "suite": args.suite, "total_steps": args.total_steps, "runs": results}
    write_report(report, Path(args.out) if args.out else None)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
