"""What bounds issue 15's per-call targets: the server process's CPU, thread by thread, during echo and Act
windows, with the load on the server's cores (``shared``) or on the other core (``pinned``).

    .venv/bin/python benchmarks/server_bounds.py [--bundle DIR] [--rounds 2] [--seconds 3] \\
        [--modes shared,pinned] [--levels c1,c64,b64x16] [--arm NAME=POLYHEAD_VAR=VALUE,...] \\
        [--profile DIR] [--out FILE.json]

Every Act window runs right after an echo window on the same server (``Diagnostics.Echo`` with a payload
as large as that window's Act request, so the floor carries the same bytes in). Windows: 1 client, 64
clients (one observation per call, the three classic-mixed tasks), and 16 clients with 64 observations
per call. The load comes from ``benchmarks/peers/load.py``'s persistent processes; CPU times are read from
``/proc`` at the window's edges, per thread of the server and for the load processes, so utilisation is
CPU seconds over the window's wall seconds. ``pinned`` runs every thread of the server on CPU 0 and the
load processes (and this driver) on CPU 1, re-applied before every window because gRPC and onnxruntime
start threads lazily. Requests per trunk pass come from the server's own metrics.

``--profile DIR`` adds, after the rounds, one 64-client echo window and one 64-client Act window per mode
under ``py-spy record --native --threads --format raw`` (100 samples/s; native stacks need py-spy to
pause the process per sample, so that window's throughput is lower; py-spy runs on the load's core when
pinned) and writes the raw stacks and a per-function summary: each function's share of the
main thread's samples times the main thread's CPU per call in that window, in µs per call.

Prints one JSON line (also written to ``--out``); progress and a summary go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
from load import LoadPool
from server_common import ServerProcess, _request_bytes, build_bundle, emit_report, machine_note, serve

TASKS = ("cartpole", "acrobot", "cartpole-continuous")
ECHO = "/polyhead.v1.Diagnostics/Echo"
ACT = "/polyhead.v1.PolicyService/Act"
SERVER_CPUS = {0}
LOAD_CPUS = {1}


@dataclass(frozen=True)
class Level:
    name: str
    clients: int
    rows: int | None  # observations per call; None: one, unbatched


LEVELS = (Level("c1", 1, None), Level("c64", 64, None), Level("b64x16", 16, 64))


# --- /proc ---------------------------------------------------------------------------------------------
def _tids(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return []


def _thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """tid -> (thread name, user + system CPU seconds) for every thread of ``pid``."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[str, float]] = {}
    for tid in _tids(pid):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat.rpartition(")")[2].split()
            out[tid] = (comm, (int(fields[11]) + int(fields[12])) / tick)
    return out


def _proc_cpu(pids: Sequence[int]) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot."""
    parts = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = parts[3] + parts[4]
    return sum(parts) - idle, sum(parts)


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of ``pid`` onto ``cpus`` (threads started later inherit their creator's mask)."""
    for tid in _tids(pid):
        with contextlib.suppress(ProcessLookupError, OSError):
            os.sched_setaffinity(tid, cpus)


# --- one window ----------------------------------------------------------------------------------------
def _pass_counts(server: ServerProcess) -> tuple[float, float]:
    m = server.scrape()
    requests = sum(v for k, v in m.items() if k.startswith('polyhead_requests_total{code="OK",method="Act"'))
    return m.get("polyhead_trunk_seconds_count", 0.0), requests


class Served(Protocol):
    """A server in a child process: what :func:`window` needs of it."""

    proc: subprocess.Popen[bytes]

    @property
    def target(self) -> str: ...


def window(
    pool: LoadPool,
    server: Served,
    *,
    method: str,
    payloads: Sequence[bytes],
    clients: int,
    seconds: float,
    warmup_s: float,
) -> dict[str, Any]:
    edges: list[tuple[float, dict[int, tuple[str, float]], float, tuple[int, int]]] = []
    pid = server.proc.pid

    def at_edge() -> None:
        edges.append((time.time(), _thread_cpu(pid), _proc_cpu(pool.pids), _machine_ticks()))

    # Requests per trunk pass from polyhead's metrics (another server has none).
    counted = method == ACT and isinstance(server, ServerProcess)
    passes0, req0 = _pass_counts(server) if counted else (0.0, 0.0)
    result = pool.run(
        target=server.target,
        method=method,
        payloads=payloads,
        concurrency=clients,
        warmup_s=warmup_s,
        window_s=seconds,
        at_edges=at_edge,
    )
    (t0, th0, load0, m0), (t1, th1, load1, m1) = edges
    wall = t1 - t0
    n = int(result.latencies_ms.size)
    threads = {
        f"{th1[tid][0]}#{'main' if tid == pid else tid}": (th1[tid][1] - th0.get(tid, ("", 0.0))[1]) / wall
        for tid in th1
    }
    server_cpu = sum(v for v in threads.values()) * wall
    main_cpu = next((v for k, v in threads.items() if k.endswith("#main")), 0.0) * wall
    out: dict[str, Any] = {
        "requests": n,
        "errors": sum(result.errors.values()),
        "rps": n / wall,
        "p50_us": float(np.percentile(result.latencies_ms, 50)) * 1e3 if n else float("nan"),
        "p99_us": float(np.percentile(result.latencies_ms, 99)) * 1e3 if n else float("nan"),
        "server_util": server_cpu / wall,  # CPUs' worth the whole server process used
        "server_main_util": main_cpu / wall,  # the event loop's thread: Python under the GIL
        "server_threads_util": {
            k: round(v, 3) for k, v in sorted(threads.items(), key=lambda kv: -kv[1]) if v >= 0.01
        },
        "server_cpu_us_per_request": server_cpu / max(1, n) * 1e6,
        "server_main_cpu_us_per_request": main_cpu / max(1, n) * 1e6,
        "load_util": (load1 - load0) / wall,
        "load_cpu_us_per_request": (load1 - load0) / max(1, n) * 1e6,
        "machine_busy": (m1[0] - m0[0]) / max(1, m1[1] - m0[1]),
    }
    if counted:
        assert isinstance(server, ServerProcess)
        passes1, req1 = _pass_counts(server)
        out["requests_per_trunk_pass"] = (req1 - req0) / max(1.0, passes1 - passes0)
    return out


def payloads_for(level: Level) -> tuple[list[bytes], list[bytes]]:
    """(Act requests, echo requests of the same size) for ``level``."""
    from polyhead.v1 import policy_pb2

    act = _request_bytes("act", TASKS, level.rows, seed=0)
    size = max(len(p) for p in act)
    # An EchoRequest whose serialised size matches the largest Act request (2-3 bytes of framing).
    echo = policy_pb2.EchoRequest(payload=b"x" * (size - 3)).SerializeToString()
    return act, [echo]


@contextlib.contextmanager
def mode_server(
    bundle: Path, mode: str, pool: LoadPool, env: dict[str, str] | None = None
) -> Iterator[ServerProcess]:
    everything = set(range(os.cpu_count() or 1))
    driver = os.sched_getaffinity(0)
    try:
        if mode == "pinned":
            os.sched_setaffinity(0, LOAD_CPUS)
        with serve(bundle, env=env) as server:
            yield server
    finally:
        os.sched_setaffinity(0, driver)
        for p in pool.pids:
            pin(p, everything)


def apply_mode(mode: str, server: Served, pool: LoadPool) -> None:
    everything = set(range(os.cpu_count() or 1))
    pin(server.proc.pid, SERVER_CPUS if mode == "pinned" else everything)
    for p in pool.pids:
        pin(p, LOAD_CPUS if mode == "pinned" else everything)


def measure_mode(
    pool: LoadPool,
    server: ServerProcess,
    mode: str,
    *,
    seconds: float,
    warmup_s: float,
    levels: Sequence[Level] = LEVELS,
    label: str = "",
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for level in levels:
        act, echo = payloads_for(level)
        kw: dict[str, Any] = {"clients": level.clients, "seconds": seconds, "warmup_s": warmup_s}
        apply_mode(mode, server, pool)
        e = window(pool, server, method=ECHO, payloads=echo, **kw)
        apply_mode(mode, server, pool)
        a = window(pool, server, method=ACT, payloads=act, **kw)
        rows = level.rows or 1
        out[level.name] = {"echo": e, "act": a}
        _log(
            f"{label or mode} {level.name}: act {a['rps']:.0f}/s ({a['rps'] * rows:.0f} actions/s) / echo "
            f"{e['rps']:.0f}/s = {a['rps'] / e['rps']:.2f}; p50 {a['p50_us']:.0f}/{e['p50_us']:.0f} us = "
            f"{a['p50_us'] / e['p50_us']:.2f}; server CPU/call {a['server_cpu_us_per_request']:.0f}/"
            f"{e['server_cpu_us_per_request']:.0f} us = "
            f"{a['server_cpu_us_per_request'] / e['server_cpu_us_per_request']:.2f} (main thread "
            f"{a['server_main_cpu_us_per_request']:.0f}/{e['server_main_cpu_us_per_request']:.0f}); server "
            f"util {a['server_util']:.2f}/{e['server_util']:.2f} (main {a['server_main_util']:.2f}/"
            f"{e['server_main_util']:.2f}); load util {a['load_util']:.2f}/{e['load_util']:.2f}; req/pass "
            f"{a['requests_per_trunk_pass']:.2f}; errors {a['errors'] + e['errors']}"
        )
    return out


# --- profile -------------------------------------------------------------------------------------------
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]*)(?::\d+)?\)$")


def _category(frames: Sequence[str]) -> str:
    """Where one main-thread sample was: the innermost polyhead function (and whether onnxruntime, numpy
    or gRPC ran beneath it), else what the event loop was doing (gRPC's Cython/C-core layer, select)."""
    outer = ("(polyhead/__main__", "(polyhead/cli", "(polyhead/server/commands")
    ours = [i for i, f in enumerate(frames) if "(polyhead/" in f and not any(o in f for o in outer)]
    if ours:
        name = frames[ours[-1]].split(" (", 1)[0]
        below = " ".join(frames[ours[-1] + 1 :])
        for marker, label in (
            ("onnxruntime", "onnxruntime under {}"),
            ("numpy", "{} (numpy)"),
            ("_multiarray", "{} (numpy)"),
            ("cygrpc", "gRPC under {}"),
        ):
            if marker in below:
                return label.format(name)
        return name
    stack = " ".join(frames)
    if "epoll_wait" in stack or "EpollSelector.select" in stack:
        return "event loop: epoll/select"
    return "gRPC Cython/C-core (no polyhead frame)" if "cygrpc" in stack else "asyncio / other Python"


def summarise_raw(raw: Path, main_tid: int, top: int = 40) -> dict[str, Any]:
    """Main-thread samples from py-spy's raw format: per category (:func:`_category`), per function
    inclusive and self."""
    inclusive: Counter[str] = Counter()
    self_: Counter[str] = Counter()
    categories: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        # With --threads the first frame names the thread: "thread (TID): NAME".
        head, frames = frames[0], frames[1:]
        if f"({main_tid})" not in head:
            continue
        count = int(count_s)
        total += count
        categories[_category(frames)] += count
        names = []
        for f in frames:
            m = _FRAME.match(f)
            names.append(f"{m['func']} ({Path(m['file']).name})" if m else f)
        for name in set(names):
            inclusive[name] += count
        if names:
            self_[names[-1]] += count
    return {
        "samples": total,
        "categories": categories.most_common(),
        "inclusive": inclusive.most_common(top),
        "self": self_.most_common(top),
    }


def profile_window(
    pool: LoadPool,
    server: ServerProcess,
    mode: str,
    *,
    method: str,
    out_dir: Path,
    seconds: float,
    warmup_s: float,
) -> dict[str, Any]:
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    level = LEVELS[1]
    act, echo = payloads_for(level)
    name = f"{mode}-{'act' if method == ACT else 'echo'}-c64"
    raw = out_dir / f"{name}.raw"
    apply_mode(mode, server, pool)
    # py-spy samples for the whole warm-up + window + margin; only the window's CPU figures are used.
    cmd = [
        pyspy, "record", "--pid", str(server.proc.pid), "--native", "--threads",
        "--rate", "100", "--format", "raw", "--duration", str(int(seconds + warmup_s + 1)), "-o", str(raw),
    ]  # fmt: skip
    spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if mode == "pinned":
        pin(spy.pid, LOAD_CPUS)
    time.sleep(0.5)
    w = window(
        pool,
        server,
        method=method,
        payloads=act if method == ACT else echo,
        clients=level.clients,
        seconds=seconds,
        warmup_s=warmup_s,
    )
    _, err = spy.communicate(timeout=120)
    summary: dict[str, Any] = (
        summarise_raw(raw, server.proc.pid) if raw.is_file() else {"error": err.decode()[-2000:]}
    )
    per_call = w["server_main_cpu_us_per_request"]
    if summary.get("samples"):
        summary["inclusive_us_per_call"] = [
            (fn, round(n / summary["samples"] * per_call, 1)) for fn, n in summary["inclusive"]
        ]
        summary["categories_us_per_call"] = [
            (fn, round(n / summary["samples"] * per_call, 1)) for fn, n in summary["categories"]
        ]
        summary["self_us_per_call"] = [
            (fn, round(n / summary["samples"] * per_call, 1)) for fn, n in summary["self"]
        ]
    (out_dir / f"{name}.summary.json").write_text(json.dumps({"window": w, **summary}, indent=1))
    _log(
        f"profile {name}: {w['rps']:.0f}/s, main CPU/call {per_call:.0f} us, {summary.get('samples')} samples"
    )
    return {"window": w, **summary}


def _log(msg: str) -> None:
    print(f"[bounds {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, default=Path("/tmp/polyhead-bench-bundle"))
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--modes", default="shared,pinned")
    parser.add_argument("--profile", type=Path, help="also profile 64-client windows with py-spy into DIR")
    parser.add_argument(
        "--arm",
        action="append",
        default=[],
        help="NAME=VAR=VALUE[,VAR=VALUE]: also serve with these environment settings (POLYHEAD_...), "
        "side by side with the defaults in every round and mode",
    )
    parser.add_argument("--levels", default=",".join(lv.name for lv in LEVELS))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    levels = [lv for lv in LEVELS if lv.name in args.levels.split(",")]
    arms: list[tuple[str, dict[str, str] | None]] = [("default", None)]
    for spec in args.arm:
        name, _, assignments = spec.partition("=")
        arms.append((name, dict(a.split("=", 1) for a in assignments.split(","))))
    if (os.cpu_count() or 1) < 2:
        parser.error("pinning needs at least 2 CPUs")
    bundle = build_bundle(args.bundle)
    modes = args.modes.split(",")
    report: dict[str, Any] = {"benchmark": "server_bounds", **machine_note(), "rounds": []}
    pool = LoadPool(2)
    try:
        for r in range(args.rounds):
            out: dict[str, Any] = {"loadavg": os.getloadavg()}
            # Alternate which mode goes first, so a burst of other work does not always hit the same one.
            for mode in modes if r % 2 == 0 else modes[::-1]:
                for arm, env in arms if r % 2 == 0 else arms[::-1]:
                    key = mode if arm == "default" else f"{mode}/{arm}"
                    with mode_server(bundle, mode, pool, env) as server:
                        out[key] = measure_mode(
                            pool,
                            server,
                            mode,
                            seconds=args.seconds,
                            warmup_s=args.warmup,
                            levels=levels,
                            label=key,
                        )
            report["rounds"].append(out)
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
            report["profiles"] = {}
            for mode in modes:
                with mode_server(bundle, mode, pool) as server:
                    for method in (ECHO, ACT):
                        key = f"{mode}-{'act' if method == ACT else 'echo'}"
                        report["profiles"][key] = profile_window(
                            pool,
                            server,
                            mode,
                            method=method,
                            out_dir=args.profile,
                            seconds=args.seconds,
                            warmup_s=args.warmup,
                        )
    finally:
        pool.close()
    report["loadavg_end"] = os.getloadavg()
    emit_report(report, args.out)


if __name__ == "__main__":
    main()
