"""The demo's report directory: ``summary.md``, ``summary.json`` and the PNG plots a person looks at.

* ``training_curves.png``: deterministic evaluation return per task against training steps (and the
  sampled training-episode returns, lighter), from the trainer's ``eval.csv`` / ``metrics.csv``;
* ``adaptation.png``: the new task's live episode returns while its head is trained, one point per
  simulator batch coloured by the head version that played it, version changes marked;
* ``latency_histogram.png``: client-measured latency of every request the demo made;
* ``drift_timeline.png`` (``--scenario drift``): the drifting task's live returns by version, the canary's
  share, and the change, detection, promotions and recovery marked.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from polyhead.cli import jsonable
from polyhead.trainer.demo import DemoState, summary
from polyhead.trainer.demo_drift import DriftState, drift_summary, rolling_mean


def _fmt(value: Any, spec: str = ".1f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float | int):
        return format(value, spec)
    return str(value)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training(run_dir: Path, out: Path) -> bool:
    eval_csv = run_dir / "eval.csv"
    if not eval_csv.is_file():
        return False
    curves: dict[str, list[tuple[float, float]]] = {}
    with eval_csv.open() as fh:
        for row in csv.DictReader(fh):
            curves.setdefault(row["task"], []).append((float(row["step"]), float(row["eval_return_mean"])))
    train_curves: dict[str, list[tuple[float, float]]] = {}
    metrics_csv = run_dir / "metrics.csv"
    if metrics_csv.is_file():
        with metrics_csv.open() as fh:
            for row in csv.DictReader(fh):
                for key, value in row.items():
                    if key.endswith("/episode_return") and value not in ("", "nan"):
                        train_curves.setdefault(key.split("/")[0], []).append(
                            (float(row["step"]), float(value))
                        )
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (task, points) in enumerate(sorted(curves.items())):
        color = f"C{i}"
        if task in train_curves:
            xs, ys = zip(*train_curves[task], strict=True)
            ax.plot(xs, ys, color=color, alpha=0.25, linewidth=1)
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, color=color, marker="o", markersize=3, label=task)
    ax.set_xlabel("environment steps (all tasks)")
    ax.set_ylabel("episode return")
    ax.set_title("Multi-task PPO: deterministic evaluation (bold) and training episodes (light)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def plot_adaptation(state: DemoState, out: Path) -> bool:
    if not state.adapt_batches:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    versions = sorted({v for row in state.adapt_batches for v in row.head_versions})
    # A sequential colour map: later versions darker, however many there are (tab10 would repeat).
    cmap = plt.get_cmap("viridis")
    colors = {v: cmap(i / max(1, len(versions) - 1) * 0.9) for i, v in enumerate(versions)}
    seen: set[int] = set()
    for row in state.adapt_batches:
        version = max(row.head_versions) if row.head_versions else 0
        label = None
        if version not in seen:
            seen.add(version)
            label = f"v{version}"
            ax.axvline(row.started_s, color=colors.get(version, "grey"), alpha=0.4, linestyle=":")
        ax.scatter(row.started_s, row.mean_return, color=colors.get(version, "grey"), label=label, s=22)
    best = (state.adapt.get("zero_shot_best") or {}).get("return")
    if isinstance(best, float | int):
        ax.axhline(best, color="black", linestyle="--", linewidth=1, label="best old head, zero-shot")
    ax.set_xlabel("seconds since the new task arrived")
    ax.set_ylabel("live episode return (sampled actions)")
    ax.set_title(f"Online head adaptation of {state.config.new_task!r}: versions swapped in live")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def plot_latency(state: DemoState, out: Path) -> bool:
    lat = np.asarray(state.latencies_ms, dtype=np.float64)
    lat = lat[lat > 0]
    if lat.size == 0:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4))
    bins = np.logspace(np.log10(lat.min()), np.log10(lat.max() * 1.01), 50)
    ax.hist(lat, bins=bins, color="C0")
    ax.set_xscale("log")
    for q, style in ((50, "-"), (99, "--")):
        value = float(np.percentile(lat, q))
        ax.axvline(value, color="black", linestyle=style, linewidth=1, label=f"p{q} {value:.2f} ms")
    ax.set_xlabel("request latency seen by the simulator clients (ms, log scale)")
    ax.set_ylabel("requests")
    ax.set_title(f"{lat.size:,} requests (Act and ActStream) during the demo")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def _yes_no(value: object) -> str:
    return "n/a" if value is None else ("**yes**" if value else "**NO**")


def markdown(state: DemoState, data: dict[str, Any], plots: list[str]) -> str:
    lines = [
        "# polyhead demo report",
        "",
        f"Suite `{state.config.suite}`, new task `{state.config.new_task}`, seed {state.config.seed}. "
        f"Wall time {data['wall_seconds']:.0f} s "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in data['steps_wall_seconds'].items())}).",
        "",
        "## 1. Training",
        "",
        f"{_fmt(data['train']['steps'], ',')} environment steps in {_fmt(data['train']['wall_seconds'])} s.",
        "",
        "## 2. Served old tasks (deterministic, same seeds before and after adaptation)",
        "",
        "| task | trained eval | served before | served after | identical | head sha256 | p50 ms | p99 ms |",
        "|---|---:|---:|---:|:-:|:-:|---:|---:|",
    ]
    for task, row in data["old_tasks"].items():
        lines.append(
            f"| {task} | {_fmt(data['train']['tasks'].get(task))} | {_fmt(row['return_before'])} | "
            f"{_fmt(row['return_after'])} | {'yes' if row['returns_identical'] else 'NO'} | "
            f"{'unchanged' if row['head_sha256_unchanged'] else 'CHANGED'} | {_fmt(row['p50_ms'], '.2f')} | "
            f"{_fmt(row['p99_ms'], '.2f')} |"
        )
    new = data["new_task"]
    best = new.get("zero_shot_best") or {}
    lines += [
        "",
        f"Trunk sha256 unchanged: **{'yes' if data['trunk_sha256_unchanged'] else 'NO'}**.",
        "",
        f"## 3. New task `{new['id']}`: head adapted online from remote experience",
        "",
        f"Best old head zero-shot: `{best.get('head')}` with return {_fmt(best.get('return'))}. "
        f"{_fmt(new['adapt_steps'], ',')} samples, {new['versions_published']} versions published, "
        f"served by `{new['served_by']}`, rolled back: {new['rolled_back']}.",
        "",
        "| updater eval (deterministic, same episodes) | return |",
        "|---|---:|",
        f"| start: the head training began from, 0 samples | {_fmt(new.get('start_eval_return'))} |",
        f"| final: the served version | {_fmt(new.get('final_eval_return'))} |",
        f"| trained (final beats start) | {_yes_no(new.get('beat_start'))} |",
        "",
        "| version | samples trained | updater eval return | live return (sampled) | live episodes "
        "| rolled back |",
        "|---:|---:|---:|---:|---:|:-:|",
    ]
    for v in new["versions"]:
        lines.append(
            f"| {v['version']} | {_fmt(v['samples'], ',')} | {_fmt(v['eval_return'])} | "
            f"{_fmt(v['live_mean_return'])} | {v['live_episodes']} | {'yes' if v['rolled_back'] else ''} |"
        )
    lines += [
        "",
        f"Final served version {new['final_version']}: deterministic return {_fmt(new['final_return'])}.",
        "",
        "## 4. Service",
        "",
        f"- failed requests: **{data['failed_requests']}** of {data['requests_measured']:,} measured",
        f"- latency seen by clients: p50 {_fmt(data['latency_ms']['p50'], '.2f')} ms, "
        f"p99 {_fmt(data['latency_ms']['p99'], '.2f')} ms",
        f"- head swaps done by the server: {_fmt(data['swaps'], '.0f')}; "
        f"head loads: {_fmt(data['head_loads'], '.0f')}",
        f"- metrics were at {data['metrics_url']} "
        f"(the server has stopped; exit code {data['server_exit_code']})",
        "",
    ]
    lines += [f"![{p}]({p})" for p in plots]
    lines.append("")
    return "\n".join(lines)


def write_report(state: DemoState) -> dict[str, Any]:
    """Write summary.json, summary.md and the plots; return the summary."""
    out = state.config.out
    out.mkdir(parents=True, exist_ok=True)
    data = summary(state)
    plots = []
    if plot_training(out / "train-logs", out / "training_curves.png"):
        plots.append("training_curves.png")
    if plot_adaptation(state, out / "adaptation.png"):
        plots.append("adaptation.png")
    if plot_latency(state, out / "latency_histogram.png"):
        plots.append("latency_histogram.png")
    # The task-relationship heatmaps training wrote (transfer, gradient cosines, embedding similarity).
    for heatmap in sorted((out / "train-logs").glob("relations_*.png")):
        shutil.copyfile(heatmap, out / heatmap.name)
        plots.append(heatmap.name)
    data["plots"] = [str(out / p) for p in plots]
    (out / "summary.json").write_text(json.dumps(jsonable(data), indent=2) + "\n")
    (out / "summary.md").write_text(markdown(state, data, plots))
    return data


# ============================================================================================================
# The drift scenario (polyhead demo --scenario drift)
# ============================================================================================================
def plot_drift(state: DriftState, data: dict[str, Any], out: Path) -> bool:
    """``drift_timeline.png``: the drifting task's live returns (coloured by the version that played
    them, 20-episode mean in black, the other tasks' means lighter) above the canary's share, with the
    change, the detection, the promotions and the rollbacks marked."""
    before = state.returns.get(state.drift_task, [])
    after = state.returns.get(f"{state.drift_task} (changed)", [])
    rows = sorted(before + after, key=lambda row: row[0])
    if not rows:
        return False
    plt = _plt()
    fig, (ax, share_ax) = plt.subplots(
        2, 1, figsize=(9, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    single = [(t, v[0], r) for t, v, r in rows if len(v) == 1]
    versions = sorted({v for _, v, _ in single})
    cmap = plt.get_cmap("viridis")
    colors = {v: cmap(i / max(1, len(versions) - 1) * 0.9) for i, v in enumerate(versions)}
    for v in versions:
        pts = [(t, r) for t, vv, r in single if vv == v]
        ax.scatter(*zip(*pts, strict=True), s=7, color=colors[v], alpha=0.55, label=f"v{v} episodes")
    ts = [t for t, _, _ in rows]
    pre = [r for _, _, r in before]
    post = [(t, r) for t, _, r in after]
    if pre:
        ax.plot([t for t, _, _ in before], rolling_mean(pre, 20), color="black", linewidth=1.5)
    if post:
        ax.plot(
            [t for t, _ in post], rolling_mean([r for _, r in post], 20), color="black", linewidth=1.5,
            label=f"{state.drift_task}: 20-episode mean",
        )  # fmt: skip
    for i, task in enumerate(t for t in state.tasks if t != state.drift_task):
        other = state.returns.get(task, [])
        if len(other) >= 5:
            ax.plot(
                [t for t, _, _ in other], rolling_mean([r for _, _, r in other], 10), linewidth=0.8,
                alpha=0.35, color=f"C{i + 1}", label=f"{task} (untouched)",
            )  # fmt: skip
    pre_mean = data["pre_change_mean_return"]
    if isinstance(pre_mean, float) and math.isfinite(pre_mean):
        ax.axhline(
            data["recovered_fraction"] * pre_mean, color="grey", linestyle="--", linewidth=1,
            label=f"{data['recovered_fraction']:.0%} of the pre-change mean ({pre_mean:.0f})",
        )  # fmt: skip
    marks = [(0.0, "red", "-", "environment changed")]
    if data["detection"]:
        marks.append((data["detection"]["t_s"], "orange", "-", "regression detected"))
    for d in data["decisions"]:
        if d["decision"] == "promote":
            marks.append((d["t_s"], "green", "--", f"v{d['version']} promoted"))
        elif d["decision"] == "rollback":
            marks.append((d["t_s"], "grey", ":", f"v{d['version']} rolled back"))
    if data["recovered"]:
        marks.append((data["recovered"]["t_s"], "blue", "-.", "recovered"))
    for t, color, style, label in marks:
        for axis in (ax, share_ax):
            axis.axvline(t, color=color, linestyle=style, linewidth=1.2, alpha=0.8)
        ax.text(t, ax.get_ylim()[1], f" {label}", rotation=90, va="top", fontsize=7, color=color)
    ax.set_ylabel("live episode return (sampled)")
    ax.set_title(
        f"{state.drift_task}: actuator reversed at t=0; polyhead operate re-adapts it through canaries"
    )
    ax.legend(fontsize=7, loc="center right")
    ax.grid(alpha=0.3)
    tl = state.timeline
    if tl:
        share_ax.step([p["t_s"] for p in tl], [p["share"] for p in tl], where="post", color="C3")
        last = 0
        for p in tl:
            if p["canary"] and p["canary"] != last:
                share_ax.annotate(f"v{p['canary']}", (p["t_s"], p["share"]), fontsize=7, color="C3")
            last = p["canary"]
    share_ax.set_ylabel("canary share %")
    share_ax.set_ylim(0, 100)
    share_ax.set_xlabel("seconds since the environment changed")
    share_ax.set_xlim(min(ts), max(ts))
    share_ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def drift_markdown(state: DriftState, data: dict[str, Any], plots: list[str]) -> str:
    det, rec = data["detection"], data["recovered"]
    frac = data["recovered_fraction"]
    lines = [
        "# polyhead demo report: drift",
        "",
        f"Suite `{state.config.suite}`, seed {state.config.seed}. Wall time {data['wall_seconds']:.0f} s "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in data['steps_wall_seconds'].items())}).",
        "",
        f"## 1. `{data['drift_task']}`: {data['change']}",
        "",
        "| | seconds after the change | task samples after the change | return |",
        "|---|---:|---:|---:|",
        f"| before the change ({data['pre_change_episodes']} episodes, last 60 averaged) | | | "
        f"{_fmt(data['pre_change_mean_return'])} |",
        f"| first 20 episodes after the change | | | {_fmt(data['drifted_first_20_mean'])} |",
        f"| regression detected by the server | {_fmt(det and det['t_s'])} | "
        f"{_fmt(det and det['samples'], ',')} | |",
    ]
    for p in data["promotions"]:
        lines.append(f"| v{p['version']} promoted | {_fmt(p['t_s'])} | | |")
    lines += [
        f"| first 20-episode mean >= {frac:.0%} of before | "
        + (f"{_fmt(rec['t_s'])} | {_fmt(rec['samples'], ',')} |" if rec else "**not reached** | |")
        + " |",
        f"| last 20 episodes (at +{data['drift_seconds']:.0f} s) | | | "
        f"{_fmt(data['drifted_last_20_mean'])} |",
        "",
        f"The changed environment could run {data['drift_limit_seconds']:.0f} s (`--drift-s`, or less to end "
        f"inside `--budget-s` {data['budget_seconds']:.0f} s); it ran {data['drift_seconds']:.0f} s.",
        "",
        "### The controller's decisions (`polyhead operate`, decisions.jsonl)",
        "",
        "| t (s) | samples | decision | version | numbers |",
        "|---:|---:|---|---:|---|",
    ]
    for d in data["decisions"]:
        lines.append(
            f"| {d['t_s']:.1f} | {d['samples']:,} | {d['decision']} | {d['version']} | "
            f"{d['detail'].replace('|', '/')} |"
        )
    lines += [
        "",
        "## 2. The other tasks (same observations before and after; head files by sha256)",
        "",
        "| task | live episodes | mean return (sampled) | actions identical | head sha256 |",
        "|---|---:|---:|:-:|:-:|",
    ]
    for task, row in data["untouched_tasks"].items():
        lines.append(
            f"| {task} | {row['episodes']} | {_fmt(row['mean_return'])} | "
            f"{'yes' if row['actions_identical'] else 'NO'} | "
            f"{'unchanged' if row['head_sha256_unchanged'] else 'CHANGED'} |"
        )
    lines += [
        "",
        f"False alarms on the other tasks: {data['false_alarms_untouched'] or 'none'}.",
        "",
        "## 3. Service",
        "",
        f"- failed requests: **{data['failed_requests']}** of {data['requests']:,} "
        + (f"(errors {data['fleet_errors']})" if data.get("fleet_errors") else ""),
        f"- exit codes: server {data['server_exit_code']}, operate {data['operate_exit_code']}",
        "",
    ]
    lines += [f"![{p}]({p})" for p in plots]
    lines.append("")
    return "\n".join(lines)


def write_drift_report(state: DriftState) -> dict[str, Any]:
    """Write summary.json, summary.md and drift_timeline.png (and the training curves); return the
    summary."""
    out = state.config.out
    out.mkdir(parents=True, exist_ok=True)
    data = drift_summary(state)
    data["fleet_errors"] = state.fleet_errors
    plots = []
    if plot_drift(state, data, out / "drift_timeline.png"):
        plots.append("drift_timeline.png")
    if plot_training(out / "train-logs", out / "training_curves.png"):
        plots.append("training_curves.png")
    data["plots"] = [str(out / p) for p in plots]
    (out / "summary.json").write_text(json.dumps(jsonable(data), indent=2) + "\n")
    (out / "summary.md").write_text(drift_markdown(state, data, plots))
    return data
