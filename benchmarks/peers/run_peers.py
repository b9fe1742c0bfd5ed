"""polyhead side by side with Seldon MLServer and Ray Serve, serving the same policy on the same machine.

    .venv/bin/python benchmarks/peers/run_peers.py [--quick] [--rounds 5] [--out runs/peers/peers.json]

1. Builds (once) a venv per server under ``benchmarks/peers/.venvs/``: polyhead (``-e .[serve]``: the
   serving set, no torch), MLServer 1.7.1 (``requirements-mlserver.txt``), Ray Serve
   (``requirements-ray.txt``); never the project's ``.venv``.
2. Builds an untrained classic-mixed bundle (or takes ``--bundle``) and fuses the task's trunk and active
   head into one ONNX model (``fuse.py``) for the peers.
3. Starts the three servers on 127.0.0.1 (start time: process start to the first successful inference)
   and checks that each one's actions equal the fused model's on 256 observations (deterministic).
4. Measures, interleaved: in every round, for each measurement point, each server in turn (the order
   rotates per round), one closed-loop window driven by the same multi-process load generator
   (``load.py``): C = 1, 16, 64 with one observation per request, and C = 16 with 64 observations per
   request. Beside them: polyhead's ``Diagnostics.Echo`` (the gRPC floor) at C = 1, 16, 64 and
   onnxruntime ``run`` on the fused model in this process (the compute floor).
5. For every window: requests/s, latency percentiles, errors, CPU seconds of the server's whole process
   tree (from /proc, before and after the window) per request, and how busy the machine's CPUs were.

Headline figures are medians over the rounds (requests/s, and each round's p50 and p99); CPU per request
is the sum over all rounds. Prints a markdown table and writes all figures as JSON to ``--out``. The load
generator, the servers and anything else running share the machine's CPUs; the report records the CPU
count and the load average.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fuse import check_parity, fuse, run_fused
from load import LoadPool, default_processes
from servers import (
    RAY_TUNED_APP,
    REPO,
    VENVS,
    Echo,
    PolicyAct,
    Protocol,
    RunningServer,
    Venv,
    VenvError,
    call,
    cpu_seconds,
    du_bytes,
    ensure_venv,
    machine_busy,
    mlserver_spec,
    polyhead_spec,
    ray_spec,
    start,
    venv_specs,
)

SERVERS = ("polyhead", "mlserver", "mlserver-inproc", "ray")
# server -> the venv it runs from
VENV_OF = {"polyhead": "polyhead", "mlserver": "mlserver", "mlserver-inproc": "mlserver", "ray": "ray"}
LABELS = {
    "polyhead": "polyhead",
    "mlserver": "MLServer",
    "mlserver-inproc": "MLServer, parallel_workers 0",
    "ray": "Ray Serve",
    "ray-tuned": "Ray Serve, max_ongoing_requests {n}",
    "echo": "echo floor",
}


@dataclass(frozen=True)
class Point:
    """One measurement point: C callers, ``batch`` observations per request."""

    name: str
    concurrency: int
    batch: int
    echo: bool  # also measure polyhead's Diagnostics.Echo here


POINTS = (
    Point("c1", 1, 1, True),
    Point("c16", 16, 1, True),
    Point("c64", 64, 1, True),
    Point("b64", 16, 64, False),
)


@dataclass
class Cell:
    """All windows of one server at one point, merged over rounds."""

    latencies: list[npt.NDArray[np.float64]] = field(default_factory=list)
    rps: list[float] = field(default_factory=list)
    seconds: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)
    server_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    busy: list[float] = field(default_factory=list)

    def summary(self, batch: int) -> dict[str, Any]:
        """Headline figures are medians over the rounds (robust to another job's burst during one window);
        ``pooled_*`` merge every window's latencies."""
        lat = np.concatenate(self.latencies) if self.latencies else np.zeros(0)
        n = int(lat.size)

        def pct(values: npt.NDArray[np.float64], q: float) -> float:
            return float(np.percentile(values, q)) if values.size else math.nan

        def median(values: Sequence[float]) -> float:
            return float(np.median(values)) if len(values) else math.nan

        return {
            "requests": n,
            "rps": median(self.rps),
            "rps_per_round": self.rps,
            "actions_per_s": median(self.rps) * batch,
            "p50_ms": median([pct(w, 50) for w in self.latencies if w.size]),
            "p99_ms": median([pct(w, 99) for w in self.latencies if w.size]),
            "pooled_p50_ms": pct(lat, 50),
            "pooled_p90_ms": pct(lat, 90),
            "pooled_p99_ms": pct(lat, 99),
            "mean_ms": float(lat.mean()) if n else math.nan,
            "errors": sum(self.errors.values()),
            "errors_by_code": self.errors,
            "server_cpu_ms_per_request": 1e3 * self.server_cpu_s / n if n else math.nan,
            "client_cpu_ms_per_request": 1e3 * self.client_cpu_s / n if n else math.nan,
            "machine_busy": float(np.mean(self.busy)) if self.busy else math.nan,
        }


def _log(msg: str) -> None:
    print(f"[peers {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def in_process_floor(model: bytes, width: int, seconds: float) -> dict[str, Any]:
    """onnxruntime ``run`` on the fused model in this process (one intra-op thread), batch 1 and 64."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    out: dict[str, Any] = {}
    for batch in (1, 64):
        obs = rng.standard_normal((batch, width)).astype(np.float32)
        for _ in range(50):
            session.run(["action", "value"], {"obs": obs})
        times: list[float] = []
        stop = time.perf_counter() + seconds
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            session.run(["action", "value"], {"obs": obs})
            times.append(time.perf_counter() - t0)
        lat = np.asarray(times) * 1e3
        out[f"b{batch}"] = {
            "runs": len(times),
            "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)),
            "runs_per_s": len(times) / float(np.sum(lat) / 1e3),
            "actions_per_s": batch * len(times) / float(np.sum(lat) / 1e3),
        }
    return out


def measure(
    pool: LoadPool,
    server: RunningServer,
    *,
    protocol: Any,
    payloads: Sequence[bytes],
    point: Point,
    warmup_s: float,
    window_s: float,
    cell: Cell,
) -> float:
    """One window on ``server``; merges it into ``cell``; returns its requests/s."""
    edges: list[tuple[float, tuple[int, int], float]] = []
    tree = server.tree()
    clients = pool.pids

    def at_edge() -> None:
        edges.append((cpu_seconds(tree), machine_busy(), cpu_seconds(clients)))

    result = pool.run(
        target=server.target,
        method=protocol.method,
        payloads=payloads,
        metadata=protocol.metadata,
        concurrency=point.concurrency,
        warmup_s=warmup_s,
        window_s=window_s,
        at_edges=at_edge,
    )
    (cpu0, busy0, client0), (cpu1, busy1, client1) = edges
    cell.latencies.append(result.latencies_ms)
    cell.seconds += window_s
    cell.rps.append(result.latencies_ms.size / window_s)
    for code, n in result.errors.items():
        cell.errors[code] = cell.errors.get(code, 0) + n
    cell.server_cpu_s += cpu1 - cpu0
    cell.client_cpu_s += client1 - client0
    total = busy1[1] - busy0[1]
    cell.busy.append((busy1[0] - busy0[0]) / total if total else math.nan)
    return cell.rps[-1]


def _fmt(v: float, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    names = list(report["measured"])
    tuned = report["config"]["ray_tuned_max_ongoing"]
    cols = [LABELS[s].format(n=tuned) for s in names]
    res = report["results"]
    echo = report["echo"]
    floor = report["in_process_floor"]

    def row(label: str, values: Sequence[str], extra: Sequence[str] = ("", "")) -> str:
        return "| " + " | ".join([label, *values, *extra]) + " |"

    lines = [
        "| | " + " | ".join(cols) + " | echo floor (polyhead `Diagnostics.Echo`) | in-process onnxruntime |",
        "|---|" + "---|" * (len(cols) + 2),
    ]

    def get(s: str, p: str, k: str) -> float:
        return float(res[s][p][k]) if p in res[s] else math.nan

    def echo_get(p: str, k: str) -> str:
        return _fmt(echo[p][k]) if p in echo else "n/a"

    lines.append(
        row(
            "single client p50 ms",
            [_fmt(get(s, "c1", "p50_ms")) for s in names],
            (echo_get("c1", "p50_ms"), _fmt(floor["b1"]["p50_ms"], 3)),
        )
    )
    lines.append(
        row(
            "single client p99 ms",
            [_fmt(get(s, "c1", "p99_ms")) for s in names],
            (echo_get("c1", "p99_ms"), _fmt(floor["b1"]["p99_ms"], 3)),
        )
    )
    for c in ("c1", "c16", "c64"):
        n = c[1:]
        lines.append(
            row(
                f"req/s, {n} client{'s' if n != '1' else ''}",
                [_fmt(get(s, c, "rps")) for s in names],
                (echo_get(c, "rps"), _fmt(floor["b1"]["runs_per_s"]) if c == "c1" else ""),
            )
        )
    lines.append(
        row(
            "p50 / p99 ms, 64 clients",
            [f"{_fmt(get(s, 'c64', 'p50_ms'))} / {_fmt(get(s, 'c64', 'p99_ms'))}" for s in names],
            (
                f"{echo_get('c64', 'p50_ms')} / {echo_get('c64', 'p99_ms')}",
                "",
            ),
        )
    )
    lines.append(
        row(
            "actions/s, 64 obs per request, 16 clients",
            [_fmt(get(s, "b64", "actions_per_s")) for s in names],
            ("", _fmt(floor["b64"]["actions_per_s"])),
        )
    )
    for c in ("c1", "c64", "b64"):
        label = {"c1": "1 client", "c64": "64 clients", "b64": "64 obs x 16 clients"}[c]
        lines.append(
            row(
                f"server CPU ms per request, {label}",
                [_fmt(get(s, c, "server_cpu_ms_per_request"), 3) for s in names],
                (echo_get(c, "server_cpu_ms_per_request") if c != "b64" else "", ""),
            )
        )
    lines.append(
        row(
            "load-generator CPU ms per request, 64 clients",
            [_fmt(get(s, "c64", "client_cpu_ms_per_request"), 3) for s in names],
            (echo_get("c64", "client_cpu_ms_per_request"), ""),
        )
    )
    lines.append(
        row("errors (all windows)", [str(sum(int(v["errors"]) for v in res[s].values())) for s in names])
    )
    srv = report["servers"]
    lines.append(row("start time s (to first inference)", [_fmt(srv[s]["start_s"], 1) for s in names]))
    lines.append(row("install size MB (venv)", [_fmt(srv[s]["install_bytes"] / 1e6, 0) for s in names]))
    lines.append(row("CPU % while idle (process tree)", [_fmt(srv[s]["idle_cpu_percent"], 1) for s in names]))
    lines.append(
        row("RSS MB after the run (process tree)", [_fmt(srv[s]["rss_bytes"] / 1e6, 0) for s in names])
    )
    c64 = {s: get(s, "c64", "rps") for s in names}
    ratios = []
    for peer in ("mlserver", "mlserver-inproc", "ray", "ray-tuned"):
        if peer in c64 and "polyhead" in c64 and c64[peer] > 0:
            ratios.append(f"{LABELS[peer].format(n=tuned)} {c64['polyhead'] / c64[peer]:.1f}x")
    text = "\n".join(lines)
    if ratios:
        text += "\n\npolyhead req/s at 64 clients vs " + ", ".join(ratios) + "."
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round, 1 s windows")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--window", type=float, default=2.0, help="seconds per measurement window (2)")
    parser.add_argument(
        "--warmup", type=float, default=0.5, help="seconds of warm-up before each window (0.5)"
    )
    parser.add_argument(
        "--load-procs", type=int, default=default_processes(), help="load-generator processes"
    )
    parser.add_argument("--servers", default=",".join(SERVERS), help="comma list of " + ",".join(SERVERS))
    parser.add_argument("--task", default="cartpole", help="task served (categorical; default cartpole)")
    parser.add_argument(
        "--bundle", type=Path, help="bundle to serve (default: an untrained classic-mixed one)"
    )
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "peers", help="scratch folder")
    parser.add_argument("--out", type=Path, help="JSON report (default WORK/peers.json)")
    parser.add_argument(
        "--mlserver-parallel-workers",
        type=int,
        default=None,
        help="parallel_workers of the 'mlserver' server (default: MLServer's own, 1 inference worker "
        "process); 'mlserver-inproc' always runs with 0 (inference in the server process)",
    )
    parser.add_argument(
        "--ray-tuned-max-ongoing",
        type=int,
        default=64,
        help="also measure a second Ray app with this max_ongoing_requests (64; 0: only the default, 5)",
    )
    parser.add_argument("--rebuild-venvs", action="store_true", help="rebuild the venvs even if up to date")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.window, args.warmup = 1, 1.0, 0.3
    names = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = set(names) - set(SERVERS)
    if unknown or "polyhead" not in names:
        parser.error(f"--servers: choose from {SERVERS}, polyhead included (got {names})")
    work: Path = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    out_path: Path = args.out or work / "peers.json"
    began = time.monotonic()
    load_before = _loadavg()
    _log(f"load average {load_before} on {os.cpu_count()} CPUs")

    specs = venv_specs()
    try:
        venvs: dict[str, Venv] = {
            venv: ensure_venv(venv, specs[venv], rebuild=args.rebuild_venvs, log=_log)
            for venv in dict.fromkeys(VENV_OF[name] for name in names)
        }
    except VenvError as exc:
        print(f"run_peers: {exc}", file=sys.stderr)
        return 2

    bundle = args.bundle
    if bundle is None:
        bundle = work / "bundle"
        if not (bundle / "manifest.json").is_file():
            _log(f"building an untrained classic-mixed bundle in {bundle}")
            from polyhead.trainer.export import build_random_bundle

            build_random_bundle(bundle, suite="classic-mixed", seed=0)
    model_bytes, width = fuse(bundle, args.task)
    model = work / f"fused-{args.task}.onnx"
    model.write_bytes(model_bytes)
    _log(f"fused {args.task}: {model} ({len(model_bytes)} bytes), observation width {width}")

    rng = np.random.default_rng(0)
    probe = rng.standard_normal((1, width)).astype(np.float32)
    parity_obs = rng.standard_normal((256, width)).astype(np.float32)
    expected = run_fused(model_bytes, parity_obs)
    payload_obs = {
        b: [rng.standard_normal((b, width)).astype(np.float32) for _ in range(32)] for b in (1, 64)
    }

    builders: dict[str, Callable[[], Any]] = {
        "polyhead": lambda: polyhead_spec(venvs["polyhead"], bundle.resolve(), args.task, probe),
        "mlserver": lambda: mlserver_spec(
            venvs["mlserver"], model, args.task, work, probe, parallel_workers=args.mlserver_parallel_workers
        ),
        "mlserver-inproc": lambda: mlserver_spec(
            venvs["mlserver"], model, args.task, work, probe, parallel_workers=0, name="mlserver-inproc"
        ),
        "ray": lambda: ray_spec(
            venvs["ray"], model, args.task, work, probe, tuned_max_ongoing=args.ray_tuned_max_ongoing
        ),
    }
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "loadavg_before": load_before},
        "config": {
            "rounds": args.rounds,
            "window_s": args.window,
            "warmup_s": args.warmup,
            "load_processes": args.load_procs,
            "task": args.task,
            "points": [p.__dict__ for p in POINTS],
            "mlserver_parallel_workers": args.mlserver_parallel_workers,
            "ray_tuned_max_ongoing": args.ray_tuned_max_ongoing,
        },
        "servers": {},
    }
    with contextlib.ExitStack() as stack:
        running: dict[str, RunningServer] = {}
        for name in names:
            _log(f"starting {name}")
            server = stack.enter_context(start(builders[name](), work / "logs"))
            running[name] = server
            actions = server.protocol.actions(
                call(server.target, server.protocol, server.protocol.request(parity_obs))
            )
            check_parity(expected, actions, f"{name} served actions")
            extra = [venvs[VENV_OF[name]].path]
            if name == "polyhead":
                extra += [REPO / p for p in ("polyhead", "server")]  # editable install: the code lives here
            report["servers"][name] = {
                "start_s": server.start_s,
                "install_bytes": du_bytes(*extra),
                "venv_build_s": venvs[VENV_OF[name]].build_s,
                "notes": server.notes,
                "parity": f"{len(expected)} deterministic actions equal to the fused model's",
            }
            _log(
                f"{name}: first inference after {server.start_s:.1f} s; "
                f"parity OK on {len(expected)} observations"
            )
        measured = list(names)
        protocols: dict[str, Protocol] = {n: s.protocol for n, s in running.items()}
        server_of = dict(running)
        if "ray" in running and args.ray_tuned_max_ongoing > 0:
            ray = running["ray"]
            protocols["ray-tuned"] = PolicyAct(args.task, metadata=(("application", RAY_TUNED_APP),))
            actions = protocols["ray-tuned"].actions(
                call(ray.target, protocols["ray-tuned"], protocols["ray-tuned"].request(parity_obs))
            )
            check_parity(expected, actions, "ray (tuned app) served actions")
            server_of["ray-tuned"] = ray
            measured.insert(measured.index("ray") + 1, "ray-tuned")
            report["servers"]["ray-tuned"] = {
                **report["servers"]["ray"],
                "notes": [f"the same Ray cluster and proxy, app {RAY_TUNED_APP!r}: "
                          f"max_ongoing_requests={args.ray_tuned_max_ongoing}"],
            }  # fmt: skip
        report["measured"] = measured
        # Idle CPU: after 5 s to settle (Ray keeps deploying for a moment after serve.run returns).
        time.sleep(5.0)
        idle0 = {n: s.cpu_seconds() for n, s in running.items()}
        time.sleep(5.0)
        for n, s in running.items():
            report["servers"][n]["idle_cpu_percent"] = 100 * (s.cpu_seconds() - idle0[n]) / 5.0
        protocols["echo"] = Echo(running["polyhead"].protocol)
        server_of["echo"] = running["polyhead"]
        pool = stack.enter_context(contextlib.closing(LoadPool(args.load_procs)))
        cells: dict[str, dict[str, Cell]] = {s: {p.name: Cell() for p in POINTS} for s in [*measured, "echo"]}
        floors: list[dict[str, Any]] = []
        for r in range(args.rounds):
            floors.append(in_process_floor(model_bytes, width, seconds=min(1.0, args.window)))
            for point in POINTS:
                order = measured[r % len(measured) :] + measured[: r % len(measured)]
                if point.echo:
                    order = [*order, "echo"] if r % 2 == 0 else ["echo", *order]
                for name in order:
                    server, protocol = server_of[name], protocols[name]
                    payloads = [protocol.request(o) for o in payload_obs[point.batch]]
                    rps = measure(
                        pool,
                        server,
                        protocol=protocol,
                        payloads=payloads,
                        point=point,
                        warmup_s=args.warmup,
                        window_s=args.window,
                        cell=cells[name][point.name],
                    )
                    _log(f"round {r + 1}/{args.rounds} {point.name} {name}: {rps:.0f} req/s")
        for name in measured:
            report["servers"][name]["rss_bytes"] = server_of[name].rss_bytes()
        if "ray-tuned" in measured:
            report["servers"]["ray-tuned"]["idle_cpu_percent"] = report["servers"]["ray"]["idle_cpu_percent"]
    report["results"] = {s: {p.name: cells[s][p.name].summary(p.batch) for p in POINTS} for s in measured}
    report["echo"] = {p.name: cells["echo"][p.name].summary(p.batch) for p in POINTS if p.echo}
    report["in_process_floor"] = {
        b: {k: float(np.median([f[b][k] for f in floors])) for k in floors[0][b]} for b in ("b1", "b64")
    }
    report["machine"]["loadavg_after"] = _loadavg()
    report["duration_s"] = time.monotonic() - began
    report["venvs_dir"] = str(VENVS)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2))
    table = markdown(report)
    print(table)
    print(
        f"\n{os.cpu_count()} CPUs shared by the servers and {args.load_procs} load processes; "
        f"load average before {load_before}, after {report['machine']['loadavg_after']}; "
        f"{args.rounds} round(s) of {args.window:.0f} s windows; {report['duration_s']:.0f} s in all. "
        f"JSON: {out_path}"
    )
    return 0


def _main() -> int:
    try:
        return main()
    except (RuntimeError, TimeoutError, AssertionError) as exc:
        # A server that failed to start or serve (its log's tail is in the message), a parity failure.
        # The servers started so far have been stopped by then (their context managers).
        print(f"run_peers: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(_main())
