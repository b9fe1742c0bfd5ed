"""Padded single encoder vs the suite's encoders (per task or per named group) at equal samples: final
return per task, wall time and the evaluation curve, over seeds.

Each run is a fresh `polyhead train --suite S --encoders ARM` process with the same seed and budget;
the arms alternate within each seed (padded, suite, padded, ...) so the shared machine's load hits both
alike. Early stopping is off (--solved-evals 0), so every run takes exactly the budget. Reported per run:
the final evaluation return per task of the exported (best) checkpoint (`--final-eval-episodes` fresh
episodes), the last periodic evaluation, the wall time of the whole command, the training steps/s from
metrics.csv, the parameter count and the load average at its start; the curve is the run's eval.csv
(deterministic evaluations every `--eval-interval` total steps).

    nice -n 5 .venv/bin/python benchmarks/encoders_compare.py --suite classic-mixed --total-steps 60000 \
        --seeds 1,2,3 --out docs/encoders_classic_mixed.json --plot docs/encoders_classic_mixed.png
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from trainer_common import ROOT, machine, mean_std, run_polyhead, train_steps_per_second, write_report

from polyhead.taskspec import load_suite

COLORS = {
    "padded": "tab:red",
    "suite": "tab:blue",
    "per-task": "tab:green",
    "before": "tab:grey",
    "after": "tab:purple",
}


def run_once(
    suite: str,
    total_steps: int,
    *,
    seed: int,
    arm: str,
    work: Path,
    extra: list[str],
    checkouts: dict[str, Path] | None = None,
) -> dict[str, Any]:
    """One `polyhead train` run. An arm named in ``checkouts`` runs that source tree (e.g. the code from
    before per-task encoders, which has no --encoders option: its default layout) with the same
    interpreter and the tree's sources first on the path; any other arm is an --encoders value."""
    out = work / f"{arm}-s{seed}"
    checkout = (checkouts or {}).get(arm)
    layout = [] if checkout is not None else ["--encoders", arm]
    command = [
        sys.executable, "-m", "polyhead", "train", "--suite", suite, "--out", str(out),
        "--total-steps", str(total_steps), "--seed", str(seed), *layout,
        "--solved-evals", "0", "--exporter", "torchscript", "--no-progress", "--json", *extra,
    ]  # fmt: skip
    cwd, env = ROOT, None
    if checkout is not None:
        cwd, env = checkout, {**os.environ, "PYTHONPATH": str(checkout)}
    summary, wall, load = run_polyhead(command, cwd=cwd, env=env)
    curves: dict[str, list[list[float]]] = {}
    with (out / "logs" / "eval.csv").open(newline="") as fh:
        for row in csv.DictReader(fh):
            curves.setdefault(row["task"], []).append([int(row["step"]), float(row["eval_return_mean"])])
    # The last row per task is the final evaluation of the exported (best) checkpoint, not a curve point.
    curves = {t: c[:-1] for t, c in curves.items()}
    return {
        "arm": arm,
        "seed": seed,
        "steps": summary["steps"],
        "command_wall_seconds": round(wall, 1),
        "train_steps_per_second": train_steps_per_second(out),
        "load_average_1m_at_start": round(load, 1),
        "policy_parameters": summary["policy_parameters"],
        "best_step": summary["best_step"],
        "final_returns": {t: round(v["eval_return"], 3) for t, v in summary["tasks"].items()},
        "last_periodic_eval_returns": {t: c[-1][1] for t, c in curves.items()},
        "solved": summary["solved"],
        "curves": curves,
    }


def first_at_target(curve: list[list[float]], target: float) -> int | None:
    """Total samples at the first periodic evaluation at or above ``target`` (None: never)."""
    return next((int(step) for step, value in curve if value >= target), None)


def table(report: dict[str, Any]) -> str:
    results, arms = report["runs"], report["arms"]
    targets = {t.id: t.target_return for t in load_suite(report["suite"]).train_tasks}
    tasks = list(results[0]["final_returns"])
    lines = [
        "| encoders | " + " | ".join(tasks) + " | tasks solved per seed | wall s | train steps/s | params |",
        "|---|" + "---:|" * (len(tasks) + 4),
    ]
    for arm in arms:
        mine = [r for r in results if r["arm"] == arm]
        # MiniGrid's returns lie in [0, 1]; one decimal would hide every difference.
        digits = 3 if max(abs(v) for v in targets.values()) < 10 else 1
        cells = [mean_std([r["final_returns"][t] for r in mine], digits) for t in tasks]
        lines.append(
            f"| {arm} | " + " | ".join(cells)
            + f" | {' / '.join(str(len(r['solved'])) for r in mine)}"
            f" | {mean_std([r['command_wall_seconds'] for r in mine])}"
            f" | {mean_std([r['train_steps_per_second'] for r in mine])}"
            f" | {mine[0]['policy_parameters']:,} |"
        )  # fmt: skip
    lines += [
        "",
        "Total samples at the first evaluation at the task's target, per seed (-: not reached):",
        "",
    ]
    lines += ["| encoders | " + " | ".join(f"{t} ({targets[t]:g})" for t in tasks) + " |"]
    lines += ["|---|" + "---|" * len(tasks)]
    for arm in arms:
        mine = sorted((r for r in results if r["arm"] == arm), key=lambda r: r["seed"])
        cells = [
            " / ".join(
                "-" if (n := first_at_target(r["curves"][t], targets[t])) is None else f"{n:,}" for r in mine
            )
            for t in tasks
        ]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "Per seed, final return of the exported checkpoint (same seed, both arms):", ""]
    lines += ["| seed | encoders | " + " | ".join(tasks) + " | wall s | load at start |"]
    lines += ["|---|---|" + "---:|" * (len(tasks) + 2)]
    for r in sorted(results, key=lambda r: (r["seed"], arms.index(r["arm"]))):
        cells = [f"{r['final_returns'][t]:g}" for t in tasks]
        lines.append(
            f"| {r['seed']} | {r['arm']} | " + " | ".join(cells)
            + f" | {r['command_wall_seconds']:.0f} | {r['load_average_1m_at_start']:.1f} |"
        )  # fmt: skip
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    runs = report["runs"]
    tasks = list(runs[0]["curves"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for arm in report["arms"]:
            curves = [r["curves"][task] for r in runs if r["arm"] == arm]
            # Same budget and eval interval in every run, so the evaluation steps line up.
            n = min(len(c) for c in curves)
            xs = np.array([p[0] for p in curves[0][:n]])
            ys = np.array([[p[1] for p in c[:n]] for c in curves])
            mean, std = ys.mean(axis=0), ys.std(axis=0)
            ax.plot(xs, mean, label=f"{arm} (n={len(curves)})", color=COLORS.get(arm))
            ax.fill_between(xs, mean - std, mean + std, alpha=0.15, color=COLORS.get(arm))
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("total samples (all tasks)")
        ax.set_ylabel("deterministic eval return")
        ax.legend(fontsize=7)
    fig.suptitle(
        f"{report['suite']}: {' vs '.join(report['arms'])} encoders, mean ± std over seeds (shared CPU)",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suite", default="classic-mixed", help="suite name or TOML file")
    parser.add_argument("--total-steps", type=int, default=60_000, help="budget of every run (all tasks)")
    parser.add_argument("--seeds", default="1,2,3", help="comma-separated seeds")
    parser.add_argument("--arms", default="padded,suite", help="comma-separated --encoders values")
    parser.add_argument("--eval-interval", type=int, default=10_000, help="total steps between evaluations")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--plot", type=Path, default=None, help="write the return-vs-samples PNG here")
    parser.add_argument(
        "--extra",
        default="",
        help="more `polyhead train` options, space-separated (e.g. '--envs-per-task 4')",
    )
    parser.add_argument(
        "--checkouts",
        default="",
        help="NAME=DIR,...: arms that run another source tree (`git archive COMMIT | tar -x -C DIR`) with "
        "its default encoder layout, e.g. before=/tmp/pre-encoders",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="re-read --out, print the tables and redraw --plot"
    )
    args = parser.parse_args()
    if args.report_only:
        saved = json.loads(args.out.read_text())
        print(table(saved))
        if args.plot:
            plot(saved, args.plot)
        return 0
    seeds = [int(s) for s in args.seeds.split(",")]
    arms = args.arms.split(",")
    extra = ["--eval-interval", str(args.eval_interval), *args.extra.split()]
    checkouts = {
        name: Path(path) for name, path in (item.split("=", 1) for item in args.checkouts.split(",") if item)
    }
    start_machine = machine()
    print(f"machine: {start_machine}", file=sys.stderr)
    results = []
    with tempfile.TemporaryDirectory(prefix="polyhead-encoders-") as tmp:
        for seed in seeds:
            # Alternate which arm goes first so neither always meets the same part of the load.
            order = arms if seed % 2 else arms[::-1]
            for arm in order:
                result = run_once(
                    args.suite, args.total_steps, seed=seed, arm=arm, work=Path(tmp), extra=extra,
                    checkouts=checkouts,
                )  # fmt: skip
                brief = {k: v for k, v in result.items() if k != "curves"}
                print(json.dumps(brief), file=sys.stderr, flush=True)
                results.append(result)
    report = {
        "machine": start_machine,
        "load_average_at_end": [round(v, 1) for v in os.getloadavg()],
        "suite": args.suite,
        "total_steps": args.total_steps,
        "arms": arms,
        "extra": extra,
        "runs": results,
    }
    print(table(report), file=sys.stderr)
    write_report(report, args.out)
    if args.plot:
        plot(report, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
