"""``polyhead simulate`` and ``polyhead bench``: argument parsing and terminal output only.

The work is in :mod:`polyhead.clients.simulator` and :mod:`polyhead.clients.bench`; these handlers turn flags
into their
configs, show progress on stderr (rich), and print the ``--json`` summary as the last stdout line.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import sys
from pathlib import Path
from typing import Any

from polyhead.cli import add_common_flags, emit_summary
from polyhead.clients.channel import ChannelConfig
from polyhead.errors import UsageError

log = logging.getLogger("polyhead.clients")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _add_channel_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--target",
        required=True,
        help="server address HOST:PORT; several comma-separated replicas are balanced round robin",
    )
    group.add_argument("--tls-ca", metavar="PEM", help="CA certificate(s) to verify the server (enables TLS)")
    group.add_argument("--tls-cert", metavar="PEM", help="client certificate for mutual TLS")
    group.add_argument("--tls-key", metavar="PEM", help="client private key for mutual TLS")
    group.add_argument(
        "--tls-server-name", metavar="NAME", help="host name to check the server certificate against"
    )
    group.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help="deadline of each request in seconds, retries included (default: %(default)s)",
    )


def _readable(args: argparse.Namespace) -> None:
    """UsageError naming the flag when a TLS file given on the command line cannot be read."""
    for flag in ("--tls-ca", "--tls-cert", "--tls-key"):
        path = getattr(args, flag[2:].replace("-", "_"))
        if path is None:
            continue
        try:
            Path(path).read_bytes()
        except OSError as exc:
            raise UsageError(
                f"cannot read {flag} {path}: {exc.strerror or exc}; give a readable PEM file"
            ) from exc


def _unreachable(exc: Exception, target: str) -> UsageError:
    details = getattr(exc, "details", str(exc))
    return UsageError(
        f"no polyhead server answered at {target} ({details}); start `polyhead serve` there or fix "
        "--target (a TLS server also needs --tls-ca)"
    )


# How long a command waits for the first connection before it says no server answered: long enough for a
# loaded server's TLS handshake, short enough for a mistyped --target to fail promptly.
CONNECT_TIMEOUT_S = 5.0


def _require_reachable(channel: ChannelConfig, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """UsageError when no connection to the target is made within ``timeout_s``, before any RPC. A refused
    connection reaches the first call as UNAVAILABLE or, when it races the call, as UNKNOWN; a check at the
    connection level tells "nothing there" from a server error without reading status messages."""
    import grpc

    with channel.sync_channel() as ch:
        try:
            grpc.channel_ready_future(ch).result(timeout=timeout_s)
        except grpc.FutureTimeoutError as exc:
            raise _unreachable(TimeoutError(f"no connection within {timeout_s:g}s"), channel.target) from exc


def _channel(args: argparse.Namespace, target: str | None = None, token: str | None = None) -> ChannelConfig:
    _readable(args)
    return ChannelConfig(
        target=target or args.target,
        root_certs=args.tls_ca,
        client_cert=args.tls_cert,
        client_key=args.tls_key,
        server_name_override=args.tls_server_name,
        token=token,
    )


def _console() -> Any:
    from rich.console import Console

    # Wide enough for the bench table when stderr is a file or a pipe (rich would assume 80 columns).
    return Console(stderr=True, width=None if sys.stderr.isatty() else 200)


# --- simulate ---------------------------------------------------------------------------------------------
def register_simulate(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "simulate",
        help="run gymnasium environments of a task through a policy server",
        description=(
            "Run K gymnasium environments of a served task concurrently, acting through the server "
            "(one batched Act per vector step, or one ActStream per environment), report the rewards "
            "back, and print per-episode returns. Exit status 1 when any request failed."
        ),
    )
    _add_channel_flags(parser)
    parser.add_argument("--task", required=True, help="task id as served (see ListTasks)")
    parser.add_argument("--episodes", type=_positive_int, default=10, help="episodes to run (default: 10)")
    parser.add_argument("--envs", type=_positive_int, default=4, help="concurrent environments (default: 4)")
    parser.add_argument(
        "--deterministic",
        action="store_true",
        help="act with the mode of the policy instead of sampling (evaluation: such episodes count in the "
        "return metrics but never feed an online updater, which trains on sampled actions only)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="episode j resets its environment with SEED+j; also seeds sampling (default: 0)",
    )
    parser.add_argument(
        "--task-spec",
        metavar="FILE",
        help="build the environment from this task spec (TOML with one [[task]], or SUITE:TASK) instead of "
        "the served spec; its spaces must match the served task's",
    )
    parser.add_argument(
        "--mode",
        choices=["unary", "stream"],
        default="unary",
        help="unary: one batched Act per vector step + a ReportExperience stream; stream: one ActStream "
        "session per environment (default: %(default)s)",
    )
    parser.add_argument(
        "--no-report", action="store_true", help="unary mode: do not send rewards back to the server"
    )
    add_common_flags(parser)
    parser.set_defaults(func=simulate_command)


def simulate_command(args: argparse.Namespace) -> int:
    try:
        channel = _channel(args)
    except ValueError as exc:
        print(f"polyhead simulate: {exc}", file=sys.stderr)
        return 2
    return _simulate(args, channel)


def _simulate(args: argparse.Namespace, channel: ChannelConfig) -> int:
    from polyhead.clients.errors import PolicyClientError, Unavailable
    from polyhead.clients.simulator import EpisodeRecord, SimulationConfig, run_simulation

    spec = None
    if args.task_spec:
        from polyhead.envs import validate_task
        from polyhead.taskspec import load_task_spec

        spec = load_task_spec(args.task_spec)
        validate_task(spec)  # a bad spec fails here, before any call to the server
    config = SimulationConfig(
        task_id=args.task,
        episodes=args.episodes,
        envs=args.envs,
        deterministic=args.deterministic,
        seed=args.seed,
        mode=args.mode,
        task_spec=spec,
        report_rewards=not args.no_report,
        request_timeout_s=args.timeout,
    )
    _require_reachable(channel)
    console = _console()
    if config.deterministic:
        console.print(
            "deterministic actions: these episodes are recorded for the return metrics but do not feed "
            "training (an online updater trains on sampled actions only)"
        )
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[last]}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        bar_id = bar.add_task(f"simulate {args.task}", total=args.episodes, last="")

        def progress(record: EpisodeRecord, done: int, _total: int) -> None:
            bar.update(bar_id, completed=done, last=f"last return {record.episode_return:.1f}")
            console.print(
                f"episode {record.index:4d}  seed {record.seed:6d}  return {record.episode_return:9.2f}  "
                f"length {record.length:5d}  head v{','.join(map(str, record.head_versions))}",
                highlight=False,
            )

        try:
            result = run_simulation(channel, config, progress=progress)
        except Unavailable as exc:
            raise _unreachable(exc, args.target) from exc
        except PolicyClientError as exc:
            console.print(f"[red]simulate failed: {type(exc).__name__}: {exc}")
            emit_summary(
                {"task": args.task, "episodes": 0, "failed_requests": 1, "error": str(exc)}, as_json=args.json
            )
            return 1
    summary = result.summary()
    for message in result.error_messages:
        console.print(f"[red]request failed: {message}")
    human = (
        f"{args.task}: {summary['episodes']} episodes, mean return {summary['mean_return']:.2f} "
        f"± {summary['std_return']:.2f}, {summary['steps']} steps, "
        f"{summary['actions_per_second']:.0f} actions/s, p50 {summary['latency_ms']['p50']:.2f} ms, "
        f"p99 {summary['latency_ms']['p99']:.2f} ms, {summary['failed_requests']} failed requests, "
        f"head versions {summary['head_versions']}"
    )
    emit_summary(summary, as_json=args.json, human=human)
    return 1 if result.failed_requests or not result.completed else 0


# --- bench ------------------------------------------------------------------------------------------------
def register_bench(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="measure throughput and latency of a policy server (perf_analyzer style)",
        description=(
            "Closed-loop concurrency sweep against a policy server: for each concurrency level, "
            "measurement windows repeat until the last N agree within the stability bound (or a window "
            "limit), then report p50/p90/p95/p99 latency, requests/s, actions/s and errors by status code. "
            "Load comes from several worker processes, each with its own asyncio loop and channel."
        ),
    )
    _add_channel_flags(parser)
    parser.add_argument(
        "--concurrency",
        type=_int_list,
        default=(1, 4, 16, 64),
        help="requests kept in flight, one level per value (default: 1,4,16,64)",
    )
    parser.add_argument(
        "--batch", type=_positive_int, default=1, help="observations per Act request (default: 1)"
    )
    parser.add_argument(
        "--tasks", default="", help="comma-separated task ids to mix round robin (default: every served task)"
    )
    parser.add_argument(
        "--mode",
        choices=["unary", "stream"],
        default="unary",
        help="unary Act calls, or one ActStream step at a time per caller (default: %(default)s)",
    )
    parser.add_argument(
        "--window-s", type=float, default=1.0, help="length of a measurement window (default: 1.0)"
    )
    parser.add_argument(
        "--warmup-s", type=float, default=0.5, help="load before the first window, discarded (default: 0.5)"
    )
    parser.add_argument(
        "--stability",
        type=float,
        default=0.10,
        help="windows agree when within this fraction of their mean (default: 0.10)",
    )
    parser.add_argument(
        "--stable-windows", type=_positive_int, default=3, help="windows that must agree (default: 3)"
    )
    parser.add_argument(
        "--max-windows",
        type=_positive_int,
        default=10,
        help="give up on stability after this many (default: 10)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="load-generating processes (default 0: one per CPU, at most the concurrency)",
    )
    swap = parser.add_argument_group("hot swap under load")
    swap.add_argument(
        "--swap-every",
        type=float,
        metavar="MS",
        help="during a second measurement of each level, flip a task's active head between two loaded "
        "versions every MS milliseconds",
    )
    swap.add_argument("--swap-task", help="task whose head is swapped (default: the first benchmarked task)")
    swap.add_argument("--admin-target", help="HeadAdmin address HOST:PORT (needed with --swap-every)")
    swap.add_argument("--admin-token", help="bearer token of the admin service, if it requires one")
    parser.add_argument(
        "--echo-floor",
        action="store_true",
        help="also run each level against Diagnostics.Echo with an Act-sized payload and report ratios",
    )
    parser.add_argument("--csv", metavar="FILE", help="also write the rows to this CSV file")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random observations (default: 0)")
    add_common_flags(parser)
    parser.set_defaults(func=bench_command)


_CSV_FIELDS = [
    "concurrency", "batch", "mode", "rps", "actions_per_s", "mean_ms", "p50_ms", "p90_ms", "p95_ms", "p99_ms",
    "requests", "errors", "windows", "stable", "echo_rps", "echo_p50_ms", "echo_p99_ms", "rps_vs_echo",
    "p50_vs_echo", "swaps", "errors_during_swaps", "swap_p99_ms", "swapped_task_p99_ms", "other_tasks_p99_ms",
    "steady_p99_ms",
]  # fmt: skip


def _csv_row(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: row.get(k) for k in _CSV_FIELDS}
    if "echo" in row:
        out.update(
            echo_rps=row["echo"]["rps"], echo_p50_ms=row["echo"]["p50_ms"], echo_p99_ms=row["echo"]["p99_ms"]
        )
    if "swap" in row:
        s = row["swap"]
        out.update(
            swaps=s["swaps"],
            errors_during_swaps=s["errors_during_swaps"],
            swap_p99_ms=s["p99_ms"],
            swapped_task_p99_ms=s["swapped_task_p99_ms"],
            other_tasks_p99_ms=s["other_tasks_p99_ms"],
            steady_p99_ms=s["steady_p99_ms"],
        )
    return out


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _table(rows: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    table = Table(title="polyhead bench", title_justify="left")
    columns = ["C", "batch", "req/s", "actions/s", "p50 ms", "p90 ms", "p95 ms", "p99 ms", "errors", "stable"]
    echo = any("echo" in r for r in rows)
    swap = any("swap" in r for r in rows)
    if echo:
        columns += ["echo req/s", "echo p50", "x echo p50"]
    if swap:
        columns += ["swaps", "swap errors", "p99 swapped", "p99 others", "p99 steady"]
    for col in columns:
        table.add_column(col, justify="right")
    for r in rows:
        cells = [
            str(r["concurrency"]), str(r["batch"]), _fmt(r["rps"], 0), _fmt(r["actions_per_s"], 0),
            _fmt(r["p50_ms"]), _fmt(r["p90_ms"]), _fmt(r["p95_ms"]), _fmt(r["p99_ms"]), str(r["errors"]),
            "yes" if r["stable"] else "no",
        ]  # fmt: skip
        if echo:
            e = r.get("echo") or {}
            cells += [_fmt(e.get("rps"), 0), _fmt(e.get("p50_ms")), _fmt(r.get("p50_vs_echo"))]
        if swap:
            s = r.get("swap") or {}
            cells += [
                str(s.get("swaps", "-")), str(s.get("errors_during_swaps", "-")),
                _fmt(s.get("swapped_task_p99_ms")), _fmt(s.get("other_tasks_p99_ms")),
                _fmt(s.get("steady_p99_ms")),
            ]  # fmt: skip
        table.add_row(*cells)
    return table


def bench_command(args: argparse.Namespace) -> int:
    from polyhead.clients.errors import PolicyClientError, Unavailable

    try:
        admin_channel = (
            _channel(args, target=args.admin_target, token=args.admin_token) if args.admin_target else None
        )
        config = _bench_config(args, admin_channel)
    except ValueError as exc:
        print(f"polyhead bench: {exc}", file=sys.stderr)
        return 2
    try:
        return _bench(args, config)
    except Unavailable as exc:
        raise _unreachable(exc, args.target) from exc
    except PolicyClientError as exc:
        print(f"polyhead bench: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # e.g. --swap-every with a single loaded version
        print(f"polyhead bench: {exc}", file=sys.stderr)
        return 2


def _bench_config(args: argparse.Namespace, admin_channel: ChannelConfig | None) -> Any:
    from polyhead.clients.bench import BenchConfig

    return BenchConfig(
        channel=_channel(args),
        concurrency=tuple(args.concurrency),
        batch=args.batch,
        tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()),
        mode=args.mode,
        window_s=args.window_s,
        warmup_s=args.warmup_s,
        stability=args.stability,
        stable_windows=args.stable_windows,
        max_windows=args.max_windows,
        workers=args.workers,
        request_timeout_s=args.timeout,
        echo_floor=args.echo_floor,
        swap_every_ms=args.swap_every,
        swap_task=args.swap_task,
        admin_channel=admin_channel,
        seed=args.seed,
    )


def _bench(args: argparse.Namespace, config: Any) -> int:
    from polyhead.cli import jsonable
    from polyhead.clients.bench import config_dict, run_bench

    console = _console()
    with console.status("benchmarking…") as status:

        def progress(message: str) -> None:
            console.print(message, highlight=False)
            status.update(f"benchmarking… ({message.split(':', maxsplit=1)[0]} done)")

        report = run_bench(config, progress=progress)
    data = report.to_json()
    data["config"] = config_dict(config)
    console.print(_table(data["rows"]))
    for note in report.notes:
        console.print(f"note: {note}", highlight=False)
    if args.csv:
        path = Path(args.csv)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=_CSV_FIELDS)
            writer.writeheader()
            for row in data["rows"]:
                writer.writerow(jsonable(_csv_row(row)))
        console.print(f"wrote {path}", highlight=False)
    emit_summary(data, as_json=args.json)
    if report.total_errors:
        print(f"bench: {report.total_errors} requests failed (see errors_by_code)", file=sys.stderr)
        return 1
    return 0
