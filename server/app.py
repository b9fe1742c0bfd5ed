"""Assembly: the one place that builds the server's objects and wires them together.

Public API (other parts rely on these names):

* ``await start_server(settings) -> RunningServer``: open the bundle, build the trunk session, load every
  task's active head, start the gRPC server(s), health, reflection, the metrics endpoint and the bundle
  watch. ``RunningServer`` has ``.port``, ``.admin_port``, ``.metrics_port``, ``.registry`` and
  ``await stop(grace)``.
* ``BackgroundServer(settings)``: the same in a thread with its own event loop, as a context manager (for
  tests, benchmarks, the demo); exposes ``.port``, ``.admin_port``, ``.metrics_port``, ``.target``
  (``"127.0.0.1:PORT"``), ``.admin_target`` and ``.registry``.

Health (``grpc.health.v1``): ``""`` (overall), ``"polyhead.v1.PolicyService"`` and one name per served task,
``"polyhead.v1.PolicyService/<task>"``; all go NOT_SERVING when shutdown starts. Server reflection lists
every service on each server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer  # the public reflection.aio's class
from prometheus_client import CollectorRegistry

from polyhead import __version__
from polyhead.bundle import Bundle
from polyhead.errors import UsageError
from polyhead.livewatch import MonitorConfig
from polyhead.server.auth import TokenCheck
from polyhead.server.batcher import Batcher
from polyhead.server.calls import CallPolicy, register
from polyhead.server.dataplane import DataPlane
from polyhead.server.draining import DrainGate
from polyhead.server.experience import ExperienceHub
from polyhead.server.health import HealthServicer
from polyhead.server.inflight import InflightCounter
from polyhead.server.metrics import MetricsHTTPServer, ServerMetrics, serve_metrics
from polyhead.server.monitor import LiveReturnWatch
from polyhead.server.registry import HeadRegistry, TaskHeads, gc_paused
from polyhead.server.runtime import TrunkRuntime, session_options
from polyhead.server.servicers import DiagnosticsServicer, HeadAdminServicer, PolicyServicer, make_observer
from polyhead.server.settings import ServerSettings
from polyhead.server.tracing import DISABLED, Tracer, build_tracer
from polyhead.server.watch import BundleWatcher
from polyhead.v1 import admin_pb2, admin_pb2_grpc, policy_pb2, policy_pb2_grpc

log = logging.getLogger(__name__)

POLICY_SERVICE = policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name
DIAGNOSTICS_SERVICE = policy_pb2.DESCRIPTOR.services_by_name["Diagnostics"].full_name
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["HeadAdmin"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


def task_health_name(task_id: str) -> str:
    """The health-check service name of one task."""
    return f"{POLICY_SERVICE}/{task_id}"


def _read_pem(path: Path, setting: str, marker: str) -> bytes:
    """The bytes of a PEM file named by ``setting``; UsageError naming the setting when unreadable."""
    flag = "--" + setting.replace("_", "-")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(
            f"cannot read {setting} ({flag}) {path}: {exc.strerror or exc}; "
            "give a readable PEM file or leave the setting out"
        ) from exc
    if marker.encode() not in data:
        raise UsageError(
            f"{setting} ({flag}) {path} is not a PEM {marker.strip('- ').lower()} "
            f"(no '{marker}' line); give the PEM file"
        )
    return data


def _credentials(prefix: str, cert: Path, key: Path, client_ca: Path | None) -> grpc.ServerCredentials:
    """Server credentials from the ``<prefix>tls_*`` settings; UsageError for an unreadable file."""
    ca = _read_pem(client_ca, f"{prefix}tls_client_ca", "-----BEGIN CERTIFICATE") if client_ca else None
    pair = (
        _read_pem(key, f"{prefix}tls_key", "PRIVATE KEY-----"),
        _read_pem(cert, f"{prefix}tls_cert", "-----BEGIN CERTIFICATE"),
    )
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


def _bind(
    server: grpc.aio.Server, host: str, port: int, creds: grpc.ServerCredentials | None, what: str
) -> int:
    """Listen on ``host:port``; UsageError naming the settings of ``what`` (``""`` for the data plane,
    ``"admin_"``) when the address cannot be bound."""
    address = f"{host}:{port}"
    _check_free(host, port, what)
    try:
        bound = (
            server.add_secure_port(address, creds) if creds is not None else server.add_insecure_port(address)
        )
    except RuntimeError:  # grpc: "Failed to bind to address"
        bound = 0
    if bound == 0:
        raise UsageError(_cannot_listen(address, what))
    return bound


def _check_free(host: str, port: int, what: str) -> None:
    """UsageError when ``host:port`` is taken, found by binding a plain socket first: grpc would log its
    own multi-line error before failing. (The port may still be taken between this and grpc's bind; grpc's
    failure is then reported the same way.)"""
    try:
        name = host.strip("[]") or None  # grpc takes "[::]:P"; getaddrinfo wants "::"
        infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise UsageError(_cannot_listen(f"{host}:{port}", what) + f" ({exc})") from exc
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpc does
        try:
            probe.bind(sockaddr)
        except OSError as exc:
            raise UsageError(_cannot_listen(f"{host}:{port}", what) + f" ({exc.strerror or exc})") from exc


def _cannot_listen(address: str, what: str) -> str:
    flags = f"--{what.replace('_', '-')}port / --{what.replace('_', '-')}host"
    return (
        f"cannot listen on {address} ({flags}): the port is already in use or the address is not one of "
        "this machine's; stop what holds the port or choose another (0 picks a free port)"
    )


@dataclass
class RunningServer:
    """A started server. ``admin_port`` is None with ``admin_mode="off"`` (and equals ``port`` when
    shared); ``metrics_port`` is None without a metrics server."""

    settings: ServerSettings
    port: int
    admin_port: int | None
    metrics_port: int | None
    registry: HeadRegistry
    batcher: Batcher
    hub: ExperienceHub
    metrics: ServerMetrics
    health: HealthServicer
    watcher: BundleWatcher | None
    _servers: list[grpc.aio.Server] = field(repr=False)
    _gate: DrainGate = field(repr=False)
    _metrics_http: MetricsHTTPServer | None = field(repr=False)
    _sweeper: asyncio.Task[None] | None = field(default=None, repr=False)
    tracer: Tracer = field(default=DISABLED, repr=False)
    _stopped: bool = False

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self, grace: float | None = None) -> None:
        """Shut down in three steps, in this order (the README states it):

        1. health reports NOT_SERVING for every service name (then, for ``shutdown_delay_s`` seconds,
           new calls are still served, so load balancers and health watchers move away first);
        2. new calls are refused (UNAVAILABLE);
        3. in-flight calls finish within ``grace`` seconds (default: the settings' grace period), the rest
           are cancelled, then everything is released.

        Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.settings.grace_period_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        log.info("shutdown 1/3: health NOT_SERVING")
        if self.settings.shutdown_delay_s > 0:
            log.info("serving new calls for %.1f s more (shutdown delay)", self.settings.shutdown_delay_s)
            await asyncio.sleep(self.settings.shutdown_delay_s)
        deadline = asyncio.get_running_loop().time() + grace
        # Refuse new calls ourselves (UNAVAILABLE, retryable) and stop gRPC only once the calls in progress
        # are done: a call reaching gRPC's transport as it stops would be CANCELLED instead of refused.
        self._gate.close()
        log.info("shutdown 2/3: new calls refused; draining in-flight calls for up to %.1f s", grace)
        # Endless calls would hold the drain for the whole grace period: end them now that their callers
        # know (experience subscribers; health watchers, which have seen NOT_SERVING).
        self.hub.close()
        self.health.end_watches()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self.watcher is not None:
            await asyncio.to_thread(self.watcher.stop)
        if not await self._gate.wait_idle(deadline - asyncio.get_running_loop().time()):
            log.warning("grace period over with %d calls in progress: cancelling them", self._gate.running)
        remaining = max(deadline - asyncio.get_running_loop().time(), 0.0)
        await asyncio.gather(*(server.stop(remaining) for server in self._servers))
        self.batcher.close()
        await self.batcher.drain()
        await asyncio.to_thread(self.batcher.shutdown)
        await asyncio.to_thread(self.tracer.shutdown)  # exports the spans still buffered
        if self._metrics_http is not None:
            await asyncio.to_thread(self._metrics_http.close)
        log.info("shutdown 3/3: in-flight calls drained, stopped")

    async def wait_for_termination(self) -> None:
        await self._servers[0].wait_for_termination()


async def start_server(
    settings: ServerSettings,
    *,
    metrics_registry: CollectorRegistry | None = None,
    span_exporter: Any = None,
) -> RunningServer:
    """Build and start everything ``settings`` describes; returns once the server accepts calls.

    Raises BundleError (and subclasses) for an unreadable bundle, CorruptHead for a bad trunk, UsageError
    (naming the setting) when a port cannot be bound or a TLS file cannot be read, or when tracing is on
    without OpenTelemetry installed; nothing is left running then. ``span_exporter`` (tracing on): export
    spans there instead of to the OTLP endpoint (tests).
    """
    loop = asyncio.get_running_loop()
    creds = (
        _credentials("", settings.tls_cert, settings.tls_key, settings.tls_client_ca)
        if settings.tls_cert and settings.tls_key
        else None
    )
    admin_creds = (
        _credentials("admin_", settings.admin_tls_cert, settings.admin_tls_key, settings.admin_tls_client_ca)
        if settings.admin_tls_cert and settings.admin_tls_key and settings.admin_mode == "separate"
        else None
    )
    if (
        settings.exposed_admin_address is not None
    ):  # only with insecure_admin: the settings refuse it otherwise
        log.warning(
            "HeadAdmin is reachable from other hosts at %s with neither a token nor mTLS (insecure_admin): "
            "anyone who reaches it can load, swap and unload heads",
            settings.exposed_admin_address,
        )
    tracer = build_tracer(settings, exporter=span_exporter)
    bundle = await asyncio.to_thread(Bundle.open, settings.bundle)
    manifest = bundle.manifest
    opts = session_options(settings.intra_op_threads)
    trunk = TrunkRuntime(
        bundle.trunk_path.read_bytes(),
        input_size=manifest.trunk_input_size,
        feature_size=manifest.feature_size,
        opts=opts,
        padded=not manifest.has_encoders,
    )
    trunk.warm_up(sorted({*settings.warmup_batch_sizes, settings.max_batch_size}))
    metrics = ServerMetrics(metrics_registry if metrics_registry is not None else CollectorRegistry())
    metrics.server_info.labels(version=__version__, trunk_sha256=manifest.trunk_sha256).set(1)
    registry = HeadRegistry(
        bundle,
        trunk,
        session_options=opts,
        warmup_batch_sizes=settings.warmup_batch_sizes,
        metrics=metrics,
        max_head_bytes=settings.max_head_bytes,
        max_loaded_versions=settings.max_loaded_versions,
        stacked_heads=settings.stacked_heads,
    )
    with gc_paused():  # a fifth of a 10,000-head startup otherwise (docs/benchmarks.md, "#15 loading")
        await asyncio.to_thread(registry.load_bundle_heads)
    gate = DrainGate()
    inflight = InflightCounter()
    batcher = Batcher(
        trunk,
        metrics=metrics,
        max_batch_size=settings.max_batch_size,
        max_queue_delay_s=settings.max_queue_delay_s,
        max_queue_size=settings.max_queue_size,
        batching=settings.batching,
        inline_max_rows=settings.inline_max_rows,
        pending=inflight,
        in_progress=inflight.handling,
        max_in_progress=settings.max_inflight_calls,
        tracer=tracer,
    )
    hub = ExperienceHub(
        metrics,
        ttl_s=settings.episode_ttl_s,
        max_open_episodes=settings.max_open_episodes,
        max_segment_steps=settings.max_segment_steps,
        subscriber_queue_size=settings.subscriber_queue_size,
    )
    plane = DataPlane(
        registry,
        batcher,
        hub,
        max_batch_size=settings.max_batch_size,
        max_abs_reward=settings.max_abs_reward,
        metrics=metrics,
    )
    live = LiveReturnWatch(
        registry,
        metrics,
        MonitorConfig(
            window=settings.regression_window,
            reference_episodes=max(settings.regression_reference_episodes, settings.regression_window),
            alpha=settings.regression_alpha,
            margin_fraction=settings.regression_margin,
            eval_margin_fraction=settings.regression_eval_margin,
        ),
    )
    hub.add_episode_listener(live.on_episode)
    observer = make_observer(metrics, registry)
    health_servicer = HealthServicer()

    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),  # a second server on a taken port must fail, not share it silently
    ]
    token = TokenCheck(settings.admin_token) if settings.admin_token else None
    shared_admin = settings.admin_mode == "shared"
    servers: list[grpc.aio.Server] = []
    metrics_http: MetricsHTTPServer | None = None
    try:
        # No interceptors: each method's handler is wrapped once (polyhead.server.calls) to refuse when
        # draining, count the call, check the token, then decode inside the handler.
        main_policy = CallPolicy(
            gate,
            inflight,
            frozenset({f"/{POLICY_SERVICE}/Act"}),
            token if shared_admin else None,
        )
        policy_servicer = PolicyServicer(plane, observer, live, tracer)
        main = grpc.aio.server(options=options)
        register(main, main_policy, policy_pb2_grpc.add_PolicyServiceServicer_to_server, policy_servicer)
        register(main, main_policy, policy_pb2_grpc.add_DiagnosticsServicer_to_server, DiagnosticsServicer())
        register(main, main_policy, health_pb2_grpc.add_HealthServicer_to_server, health_servicer)
        main_services = [POLICY_SERVICE, DIAGNOSTICS_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME]
        admin_servicer = HeadAdminServicer(registry, hub, observer)
        if shared_admin:
            register(main, main_policy, admin_pb2_grpc.add_HeadAdminServicer_to_server, admin_servicer)
            main_services.append(ADMIN_SERVICE)
        add_reflection = reflection_pb2_grpc.add_ServerReflectionServicer_to_server
        register(main, main_policy, add_reflection, ReflectionServicer(main_services))
        servers.append(main)
        port = _bind(main, settings.host, settings.port, creds, "")

        admin_port: int | None = port if shared_admin else None
        if settings.admin_mode == "separate":
            admin_policy = CallPolicy(gate, token=token)
            admin = grpc.aio.server(options=options)
            register(admin, admin_policy, admin_pb2_grpc.add_HeadAdminServicer_to_server, admin_servicer)
            register(admin, admin_policy, health_pb2_grpc.add_HealthServicer_to_server, health_servicer)
            admin_services = [ADMIN_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME]
            register(admin, admin_policy, add_reflection, ReflectionServicer(admin_services))
            servers.append(admin)
            admin_port = _bind(admin, settings.admin_host, settings.admin_port, admin_creds, "admin_")

        # Health follows the registry: a task is SERVING while it has an active head.
        served: set[str] = set()

        async def sync_health(tasks: Mapping[str, TaskHeads]) -> None:
            for task_id in sorted(set(tasks) - served):
                await health_servicer.set(task_health_name(task_id), health_pb2.HealthCheckResponse.SERVING)
            for task_id in sorted(served - set(tasks)):
                await health_servicer.set(
                    task_health_name(task_id), health_pb2.HealthCheckResponse.NOT_SERVING
                )
            served.clear()
            served.update(tasks)

        async def sync_task_health(task_id: str) -> None:
            # One task per change: a full diff per load made loading n heads O(n²).
            if task_id in registry.tasks and task_id not in served:
                served.add(task_id)
                await health_servicer.set(task_health_name(task_id), health_pb2.HealthCheckResponse.SERVING)
            elif task_id not in registry.tasks and task_id in served:
                served.discard(task_id)
                await health_servicer.set(
                    task_health_name(task_id), health_pb2.HealthCheckResponse.NOT_SERVING
                )

        def on_registry_change(_snapshot: Mapping[str, TaskHeads], task_id: str) -> None:
            loop.call_soon_threadsafe(lambda: loop.create_task(sync_task_health(task_id)))

        await sync_health(registry.tasks)
        registry.add_listener(on_registry_change)
        for name in ("", POLICY_SERVICE):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

        if settings.metrics_port is not None:
            try:
                metrics_http = serve_metrics(metrics.registry, settings.metrics_host, settings.metrics_port)
            except OSError as exc:
                address = f"{settings.metrics_host}:{settings.metrics_port}"
                raise UsageError(_cannot_listen(address, "metrics_") + f" ({exc.strerror or exc})") from exc
        for server in servers:
            await server.start()
    except BaseException:
        # A port taken or a file unreadable: release what was built, so the caller sees only the error.
        for server in servers:
            await server.stop(None)
        if metrics_http is not None:
            metrics_http.close()
        batcher.close()
        await asyncio.to_thread(batcher.shutdown)
        tracer.shutdown()
        raise

    async def sweep_episodes() -> None:
        # Without this, episodes abandoned by their clients would stay until the next experience call.
        while True:
            await asyncio.sleep(min(1.0, settings.episode_ttl_s))
            hub.sweep()

    sweeper = asyncio.get_running_loop().create_task(sweep_episodes())
    watcher = None
    if settings.watch_bundle:
        watcher = BundleWatcher(
            registry,
            interval_s=settings.watch_interval_s,
            failures=metrics.watch_failures,
            failing=metrics.watch_failing,
        )
        watcher.start()
    log.info(
        "serving bundle %s (trunk %s…, tasks %s) on %s:%d; admin %s; metrics %s",
        bundle.root,
        manifest.trunk_sha256[:12],
        ", ".join(sorted(registry.tasks)) or "none",
        settings.host,
        port,
        f"{settings.admin_mode} port {admin_port}" if admin_port is not None else "off",
        f"port {metrics_http.port}" if metrics_http is not None else "off",
    )
    return RunningServer(
        settings=settings,
        port=port,
        admin_port=admin_port,
        metrics_port=metrics_http.port if metrics_http is not None else None,
        registry=registry,
        batcher=batcher,
        hub=hub,
        metrics=metrics,
        health=health_servicer,
        watcher=watcher,
        _servers=servers,
        _gate=gate,
        _metrics_http=metrics_http,
        _sweeper=sweeper,
        tracer=tracer,
    )


class BackgroundServer:
    """Runs :func:`start_server` in a daemon thread with its own event loop.

    ``with BackgroundServer(settings) as srv: grpc.insecure_channel(srv.target)``. Leaving the block stops
    the server with ``grace`` seconds for in-flight calls.
    """

    def __init__(
        self,
        settings: ServerSettings,
        *,
        grace: float = 1.0,
        start_timeout: float = 60.0,
        span_exporter: Any = None,
    ) -> None:
        self.settings = settings
        self.span_exporter = span_exporter
        self.grace = grace
        self.start_timeout = start_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running: RunningServer | None = None
        self._error: BaseException | None = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> BackgroundServer:
        self._thread = threading.Thread(target=self._main, name="polyhead-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(self.start_timeout):
            raise TimeoutError(f"server did not start within {self.start_timeout} s")
        if self._error is not None:
            raise self._error
        return self

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            self._running = loop.run_until_complete(
                start_server(self.settings, span_exporter=self.span_exporter)
            )
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def stop(self, grace: float | None = None) -> None:
        if self._running is None or self._loop is None or self._thread is None:
            return
        future = asyncio.run_coroutine_threadsafe(
            self._running.stop(self.grace if grace is None else grace), self._loop
        )
        try:
            future.result(timeout=(self.grace if grace is None else grace) + 30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
            self._running = None

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- what tests and benchmarks use -----------------------------------------------------------------
    @property
    def running(self) -> RunningServer:
        if self._running is None:
            raise RuntimeError("the server is not running")
        return self._running

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("the server is not running")
        return self._loop

    @property
    def port(self) -> int:
        return self.running.port

    @property
    def admin_port(self) -> int | None:
        return self.running.admin_port

    @property
    def metrics_port(self) -> int | None:
        return self.running.metrics_port

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def admin_target(self) -> str:
        if self.admin_port is None:
            raise RuntimeError("the server runs without HeadAdmin (admin_mode='off')")
        return f"127.0.0.1:{self.admin_port}"

    @property
    def registry(self) -> HeadRegistry:
        return self.running.registry
