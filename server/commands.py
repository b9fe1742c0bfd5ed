"""``polyhead serve``: serve a bundle until SIGTERM/SIGINT, then drain and exit 0.

Flags override ``POLYHEAD_*`` environment variables, which override the defaults of
:class:`polyhead.server.settings.ServerSettings`. ``--ready-file PATH`` writes ``{"port", "admin_port",
"metrics_port", "pid"}`` as JSON once the server accepts calls (with port 0 = pick a free port, this is how
a supervising process or a test learns the ports).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

from polyhead.bundle import atomic_write_json
from polyhead.cli import add_common_flags, emit_summary
from polyhead.errors import UsageError

log = logging.getLogger("polyhead.serve")

# (flag, settings field, type, help); flags left unset fall through to the environment and defaults.
_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--host", "host", str, "data-plane bind address (default 0.0.0.0)"),
    ("--port", "port", int, "data-plane port; 0 picks a free port (default 50051)"),
    ("--admin-host", "admin_host", str, "HeadAdmin bind address (default 127.0.0.1)"),
    ("--admin-port", "admin_port", int, "HeadAdmin port; 0 picks a free port (default 50052)"),
    (
        "--admin-mode",
        "admin_mode",
        str,
        "'separate' (own port, default), 'shared' (on the data-plane port) or 'off' (no HeadAdmin)",
    ),
    (
        "--admin-token",
        "admin_token",
        str,
        "require `authorization: Bearer <token>` on HeadAdmin calls (prefer POLYHEAD_ADMIN_TOKEN)",
    ),
    ("--metrics-host", "metrics_host", str, "Prometheus endpoint bind address (default 0.0.0.0)"),
    ("--metrics-port", "metrics_port", int, "Prometheus /metrics port; 0 picks a free port (default 9100)"),
    ("--max-batch-size", "max_batch_size", int, "most observations per request and per trunk pass (256)"),
    (
        "--max-queue-delay-ms",
        "max_queue_delay_ms",
        float,
        "longest a request waits for others to join its batch, only while requests keep arriving (2.0)",
    ),
    ("--max-queue-size", "max_queue_size", int, "queued requests before RESOURCE_EXHAUSTED (1024)"),
    (
        "--max-inflight-calls",
        "max_inflight_calls",
        int,
        "Act calls in progress before new ones get RESOURCE_EXHAUSTED; 0: no limit (2048)",
    ),
    ("--intra-op-threads", "intra_op_threads", int, "onnxruntime threads per session (1)"),
    ("--watch-interval", "watch_interval_s", float, "seconds between bundle polls (1.0)"),
    (
        "--shutdown-delay",
        "shutdown_delay_s",
        float,
        "SIGTERM: seconds health reports NOT_SERVING while new calls are still served, so load balancers "
        "move away before calls are refused (0)",
    ),
    (
        "--max-loaded-versions",
        "max_loaded_versions",
        int,
        "versions of a task kept loaded: active, previous, newest; older ones unloaded, kept on disk (3)",
    ),
    (
        "--max-abs-reward",
        "max_abs_reward",
        float,
        "reported rewards beyond +/- this (or NaN/inf) are refused with INVALID_ARGUMENT (1e6)",
    ),
    ("--grace-period", "grace_period_s", float, "SIGTERM: seconds in-flight calls may finish (10)"),
    ("--episode-ttl", "episode_ttl_s", float, "seconds before an idle episode's experience is dropped (300)"),
    ("--max-open-episodes", "max_open_episodes", int, "episodes assembled at once (10000)"),
    ("--max-message-bytes", "max_message_bytes", int, "largest gRPC message accepted (64 MiB)"),
    ("--max-head-bytes", "max_head_bytes", int, "largest uploaded head, onnx + head_json (16 MiB)"),
    (
        "--tracing-endpoint",
        "tracing_endpoint",
        str,
        "OTLP/gRPC collector HOST:PORT the spans go to, with --tracing (localhost:4317)",
    ),
    (
        "--tracing-sample-ratio",
        "tracing_sample_ratio",
        float,
        "share of calls traced when the caller sent no sampled traceparent, 0..1 (1.0)",
    ),
    ("--tracing-service-name", "tracing_service_name", str, "service.name of the spans (polyhead-server)"),
    ("--tracing-ca", "tracing_ca", Path, "PEM CA of the collector: export over TLS"),
    ("--tls-cert", "tls_cert", Path, "PEM certificate: serve the data plane over TLS"),
    ("--tls-key", "tls_key", Path, "PEM private key for --tls-cert"),
    ("--tls-client-ca", "tls_client_ca", Path, "PEM CA: require client certificates (mTLS)"),
    ("--admin-tls-cert", "admin_tls_cert", Path, "PEM certificate of the admin server"),
    ("--admin-tls-key", "admin_tls_key", Path, "PEM private key for --admin-tls-cert"),
    ("--admin-tls-client-ca", "admin_tls_client_ca", Path, "PEM CA for admin client certificates (mTLS)"),
]


def register_serve(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a bundle over gRPC (actions, hot-swappable heads, metrics)",
        description=(
            "Serve a bundle: PolicyService (Act, ActStream, ListTasks, ReportExperience) and Diagnostics on "
            "--port, HeadAdmin on --admin-port, Prometheus metrics on --metrics-port. Every option can also "
            "be set as POLYHEAD_<FIELD> in the environment (e.g. POLYHEAD_ADMIN_TOKEN). HeadAdmin reachable "
            "from other hosts needs --admin-token or mTLS (or an explicit --insecure-admin). SIGTERM: health "
            "goes NOT_SERVING, then new calls are refused, then in-flight calls drain within the grace "
            "period; exit 0."
        ),
    )
    parser.add_argument("--bundle", required=True, type=Path, help="bundle directory to serve")
    for flag, dest, kind, text in _FLAGS:
        parser.add_argument(flag, dest=dest, type=kind, default=None, help=text)
    parser.add_argument(
        "--no-batching",
        dest="batching",
        action="store_const",
        const=False,
        default=None,
        help="run every request in its own trunk pass (for benchmarks)",
    )
    parser.add_argument(
        "--no-stacked-heads",
        dest="stacked_heads",
        action="store_const",
        const=False,
        default=None,
        help="give every head its own onnxruntime session instead of running plain-MLP heads from stacked "
        "weights (POLYHEAD_STACKED_HEADS=false)",
    )
    parser.add_argument(
        "--no-watch",
        dest="watch_bundle",
        action="store_const",
        const=False,
        default=None,
        help="do not poll the bundle for newly published head versions",
    )
    parser.add_argument(
        "--insecure-admin",
        dest="insecure_admin",
        action="store_const",
        const=True,
        default=None,
        help="start even though HeadAdmin is reachable from other hosts (a non-loopback --admin-host, or "
        "--admin-mode shared on a non-loopback --host) with neither --admin-token nor mTLS; without it "
        "polyhead serve refuses such settings (POLYHEAD_INSECURE_ADMIN)",
    )
    parser.add_argument(
        "--tracing",
        dest="tracing_enabled",
        action="store_const",
        const=True,
        default=None,
        help="export OpenTelemetry spans of Act calls and ActStream steps over OTLP/gRPC (needs "
        "polyhead[tracing]); a caller's W3C traceparent metadata becomes their parent "
        "(POLYHEAD_TRACING_ENABLED)",
    )
    parser.add_argument(
        "--tracing-tls",
        dest="tracing_tls",
        action="store_const",
        const=True,
        default=None,
        help="export to the collector over TLS with the system roots (--tracing-ca: with that CA)",
    )
    parser.add_argument(
        "--no-metrics",
        action="store_true",
        help="do not start the Prometheus endpoint",
    )
    parser.add_argument(
        "--ready-file",
        type=Path,
        default=None,
        help="write the bound ports as JSON to this file once serving (for supervisors and tests)",
    )
    add_common_flags(parser)
    parser.set_defaults(func=serve)


def settings_from_args(args: argparse.Namespace) -> Any:
    from polyhead.server.settings import ServerSettings

    overrides: dict[str, Any] = {"bundle": args.bundle}
    for _, dest, _, _ in _FLAGS:
        value = getattr(args, dest)
        if value is not None:
            overrides[dest] = value
    for dest in (
        "batching",
        "watch_bundle",
        "insecure_admin",
        "stacked_heads",
        "tracing_enabled",
        "tracing_tls",
    ):
        if getattr(args, dest) is not None:
            overrides[dest] = getattr(args, dest)
    if args.no_metrics:
        overrides["metrics_port"] = None
    return ServerSettings(**overrides)


def one_line(exc: Any) -> str:
    """A pydantic ValidationError as one line: ``field: message; field: message``."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error.get("loc", ()))
        message = str(error.get("msg", "")).removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


def serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        raise UsageError(f"invalid settings: {one_line(exc)}") from exc
    summary = asyncio.run(_serve(settings, args.ready_file))
    emit_summary(summary, as_json=args.json, human="polyhead serve: stopped cleanly")
    return 0


async def _serve(settings: Any, ready_file: Path | None) -> dict[str, Any]:
    from polyhead.server.app import start_server

    running = await start_server(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ready = {
        "port": running.port,
        "admin_port": running.admin_port,
        "metrics_port": running.metrics_port,
        "pid": os.getpid(),
        "tasks": sorted(running.registry.tasks),
    }
    if ready_file is not None:
        atomic_write_json(ready_file, ready)
    log.info("ready: %s", json.dumps(ready))
    await stop.wait()
    log.info("signal received: draining (grace period %.1f s)", settings.grace_period_s)
    await running.stop(settings.grace_period_s)
    stats = running.batcher.stats
    return {**ready, "requests": stats.requests, "trunk_passes": stats.passes, "observations": stats.rows}
