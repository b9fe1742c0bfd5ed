"""Server configuration: one frozen object, read once at the edge (environment + CLI flags).

Every field can be set from the environment with the ``POLYHEAD_`` prefix (``POLYHEAD_PORT=6000``,
``POLYHEAD_ADMIN_TOKEN=...``) or passed as a keyword (the ``polyhead serve`` flags do that; keywords win
over the environment). Port 0 everywhere means "pick a free port"; the bound ports are reported by
:class:`polyhead.server.app.RunningServer` and ``polyhead serve --ready-file``.

Admin placement (``admin_mode``):

* ``"separate"`` (default): ``HeadAdmin`` on its own server at ``admin_host:admin_port``
  (127.0.0.1:50052), so the control plane is not reachable from where simulators connect.
* ``"shared"``: ``HeadAdmin`` on the data-plane port (one port to expose; protect it with a token).
* ``"off"``: no ``HeadAdmin`` at all (the bundle watch still follows published versions).

Fail closed: HeadAdmin reachable from other hosts (``admin_host`` not a loopback address in ``separate``
mode, or ``host`` not a loopback address in ``shared`` mode) must require a token (``admin_token``) or a
client certificate (``admin_tls_client_ca``, or ``tls_client_ca`` when shared); otherwise the settings are
refused, unless ``insecure_admin`` says the operator accepts an open control plane.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServerSettings(BaseSettings):
    """Everything ``polyhead serve`` can be told. Frozen: build a new one to change anything."""

    model_config = SettingsConfigDict(env_prefix="POLYHEAD_", frozen=True, extra="forbid")

    # --- what to serve -----------------------------------------------------------------------------------
    bundle: Path = Field(description="bundle directory (manifest.json, trunk.onnx, heads/)")

    # --- data plane (PolicyService, Diagnostics, health, reflection) -------------------------------------
    host: str = Field("0.0.0.0", description="address the data plane binds")
    port: int = Field(50051, ge=0, le=65535, description="data-plane port (0: pick a free one)")

    # --- control plane (HeadAdmin) -----------------------------------------------------------------------
    admin_mode: Literal["separate", "shared", "off"] = Field(
        "separate", description="HeadAdmin on its own port, on the data-plane port, or not at all"
    )
    admin_host: str = Field("127.0.0.1", description="address the separate admin server binds")
    admin_port: int = Field(50052, ge=0, le=65535, description="admin port (0: pick a free one)")
    admin_token: str | None = Field(
        None, description="when set, every HeadAdmin call needs `authorization: Bearer <token>` metadata"
    )
    insecure_admin: bool = Field(
        False,
        description="allow HeadAdmin to be reachable from other hosts with neither a token nor mTLS "
        "(anyone who reaches it can load, swap and unload heads); refused without this",
    )

    # --- metrics -----------------------------------------------------------------------------------------
    metrics_host: str = Field("0.0.0.0", description="address of the Prometheus /metrics HTTP server")
    metrics_port: int | None = Field(
        9100, ge=0, le=65535, description="Prometheus port (0: pick a free one; None: no metrics server)"
    )

    # --- batching and backpressure -----------------------------------------------------------------------
    batching: bool = Field(True, description="gather concurrent requests of any task into one trunk pass")
    max_batch_size: int = Field(256, ge=1, description="most observations per request and per trunk pass")
    max_queue_delay_ms: float = Field(
        2.0,
        ge=0.0,
        description="longest a request waits for others to join its batch; the wait happens only while "
        "requests keep arriving, so a lone client never pays it",
    )
    max_queue_size: int = Field(
        1024, ge=1, description="requests waiting for inference before new ones get RESOURCE_EXHAUSTED"
    )
    max_inflight_calls: int = Field(
        2048,
        ge=0,
        description="Act calls being handled at once; one more gets RESOURCE_EXHAUSTED before it queues "
        "(as does an ActStream step meanwhile); bounds what one server holds under overload (0: no limit)",
    )
    inline_max_rows: int = Field(
        16,
        ge=0,
        description="a pass of at most this many observations runs on the event loop thread; larger ones "
        "in the inference thread (for a few rows the thread hand-off costs more than the inference)",
    )
    intra_op_threads: int = Field(
        1, ge=0, description="onnxruntime threads per session (1: best for small models; 0: ORT default)"
    )

    # --- heads -------------------------------------------------------------------------------------------
    stacked_heads: bool = Field(
        True,
        description="run heads whose ONNX graphs are plain MLPs from stacked weights, many heads in one "
        "grouped matmul per batch (False: an onnxruntime session per head, as before)",
    )
    watch_bundle: bool = Field(
        True, description="poll the bundle for new head versions and active.json changes, load them"
    )
    watch_interval_s: float = Field(1.0, gt=0.0, description="seconds between bundle polls")
    max_loaded_versions: int = Field(
        3,
        ge=1,
        description="versions of a task kept loaded (active, previous, newest candidate); older ones are "
        "unloaded and stay on disk",
    )
    warmup_batch_sizes: tuple[int, ...] = Field(
        (1, 8), description="batch sizes every session runs once before it serves"
    )

    # --- experience --------------------------------------------------------------------------------------
    episode_ttl_s: float = Field(300.0, gt=0.0, description="an episode idle this long is dropped")
    max_open_episodes: int = Field(10_000, ge=1, description="episodes assembled at once; oldest evicted")
    max_segment_steps: int = Field(
        512, ge=1, description="an episode longer than this is sent to subscribers in segments"
    )
    max_abs_reward: float = Field(
        1e6,
        gt=0.0,
        description="a reported reward outside [-max_abs_reward, max_abs_reward] (or NaN/inf) is refused "
        "with INVALID_ARGUMENT and counted, never trained on",
    )
    subscriber_queue_size: int = Field(
        1024, ge=1, description="segments buffered per StreamExperience subscriber before dropping"
    )

    # --- live-return monitor (polyhead.livewatch) ------------------------------------------------------
    regression_window: int = Field(
        20, ge=2, description="episodes of the stable version per regression test block"
    )
    regression_reference_episodes: int = Field(
        40, ge=2, description="live episodes of a new stable version that form its reference"
    )
    regression_alpha: float = Field(
        1e-3, gt=0.0, lt=1.0, description="false-alarm rate of one regression test block"
    )
    regression_margin: float = Field(
        0.2, ge=0.0, description="a drop below this fraction of the reference mean is tolerated"
    )
    regression_eval_margin: float = Field(
        0.8,
        ge=0.0,
        description="the tolerated drop against the head's (deterministic) eval return, used until the "
        "stable version has a live reference; wide because live traffic usually samples",
    )

    # --- tracing (polyhead.server.tracing; needs the `tracing` extra) ------------------------------------
    tracing_enabled: bool = Field(
        False,
        description="OpenTelemetry spans for Act calls and ActStream steps, exported over OTLP/gRPC; the "
        "caller's W3C traceparent metadata is the parent (off: OpenTelemetry is not even imported)",
    )
    tracing_endpoint: str = Field(
        "localhost:4317", min_length=1, description="OTLP/gRPC collector address (HOST:PORT)"
    )
    tracing_sample_ratio: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="share of calls without a sampled caller trace that are traced; a caller's traceparent "
        "keeps its own decision",
    )
    tracing_service_name: str = Field(
        "polyhead-server", min_length=1, description="service.name of the exported spans"
    )
    tracing_tls: bool = Field(
        False, description="TLS to the collector (system roots, or tracing_ca); default plaintext"
    )
    tracing_ca: Path | None = Field(None, description="PEM CA of the collector (implies tracing_tls)")

    # --- transport ---------------------------------------------------------------------------------------
    max_message_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="largest gRPC message accepted")
    max_head_bytes: int = Field(
        16 * 1024 * 1024,
        ge=1024,
        description="largest head a LoadHead upload may carry (onnx + head_json); more is INVALID_ARGUMENT",
    )
    shutdown_delay_s: float = Field(
        0.0,
        ge=0.0,
        description="SIGTERM: seconds health reports NOT_SERVING while new calls are still served, so load "
        "balancers and health watchers move away before calls are refused",
    )
    grace_period_s: float = Field(10.0, ge=0.0, description="SIGTERM: seconds in-flight calls may finish")
    tls_cert: Path | None = Field(None, description="PEM certificate of the data plane (enables TLS)")
    tls_key: Path | None = Field(None, description="PEM private key of the data plane")
    tls_client_ca: Path | None = Field(None, description="PEM CA: require client certificates (mTLS)")
    admin_tls_cert: Path | None = Field(None, description="PEM certificate of the admin server")
    admin_tls_key: Path | None = Field(None, description="PEM private key of the admin server")
    admin_tls_client_ca: Path | None = Field(None, description="PEM CA for admin client certificates")

    @model_validator(mode="after")
    def _check(self) -> ServerSettings:
        for cert, key, what in (
            (self.tls_cert, self.tls_key, "tls"),
            (self.admin_tls_cert, self.admin_tls_key, "admin_tls"),
        ):
            if (cert is None) != (key is None):
                raise ValueError(f"{what}_cert and {what}_key must be set together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mTLS) needs tls_cert and tls_key")
        if self.admin_tls_client_ca is not None and self.admin_tls_cert is None:
            raise ValueError("admin_tls_client_ca (mTLS) needs admin_tls_cert and admin_tls_key")
        if self.admin_mode == "separate" and self.admin_port != 0 and self.admin_port == self.port:
            raise ValueError(
                f"admin_port {self.admin_port} equals port; use admin_mode='shared' to serve HeadAdmin "
                "on the data-plane port"
            )
        if any(b < 1 for b in self.warmup_batch_sizes):
            raise ValueError("warmup_batch_sizes must be positive")
        exposed = self.exposed_admin_address
        if exposed is not None and not self.insecure_admin:
            client_ca = (
                "tls_client_ca (--tls-client-ca)"
                if self.admin_mode == "shared"
                else ("admin_tls_client_ca (--admin-tls-client-ca)")
            )
            where = "admin_host (--admin-host)" if self.admin_mode == "separate" else "host (--host)"
            raise ValueError(
                f"HeadAdmin would be reachable from other hosts at {exposed} with neither a token nor mTLS: "
                f"set admin_token (POLYHEAD_ADMIN_TOKEN) or {client_ca}, bind {where} to 127.0.0.1, or "
                "pass --insecure-admin (POLYHEAD_INSECURE_ADMIN=true) to accept an open control plane"
            )
        return self

    @property
    def exposed_admin_address(self) -> str | None:
        """``host:port`` where HeadAdmin listens on a non-loopback address with neither a token nor a
        client certificate required; None when it is not reachable from other hosts or is protected."""
        if self.admin_mode == "off" or self.admin_token:
            return None
        if self.admin_mode == "shared":
            host, port, client_ca = self.host, self.port, self.tls_client_ca
        else:
            host, port, client_ca = self.admin_host, self.admin_port, self.admin_tls_client_ca
        if client_ca is not None or is_loopback(host):
            return None
        return f"{host}:{port}"

    @property
    def tracing_uses_tls(self) -> bool:
        return self.tracing_tls or self.tracing_ca is not None

    @property
    def max_queue_delay_s(self) -> float:
        return self.max_queue_delay_ms / 1000.0


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` listens on loopback only (``127.0.0.0/8``, ``::1``, ``localhost``).
    Wildcards (``0.0.0.0``, ``::``), other addresses and other host names count as reachable."""
    name = host.strip().strip("[]").lower()
    if name in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False
