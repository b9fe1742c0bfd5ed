"""How a client reaches the server: target(s), TLS, keepalive, message size, the admin token.

:class:`ChannelConfig` is read once and builds both sync (``grpc.Channel``) and asyncio
(``grpc.aio.Channel``) channels with identical options, so every client speaks to the server the same way.

Several targets (``"127.0.0.1:5001,127.0.0.1:5002"`` or ``"ipv4:127.0.0.1:5001,127.0.0.1:5002"``) become
one channel with gRPC's client-side ``round_robin`` balancing: gRPC needs L7 or client-side balancing,
since a plain TCP balancer pins a long-lived HTTP/2 connection to one replica.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

# 64 MiB: a batch of 1024 MiniGrid observations is well under this; large heads travel via LoadHead.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def _read(path: str | Path | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


@dataclass(frozen=True)
class ChannelConfig:
    """Everything needed to open a channel to a polyhead server (or several replicas).

    ``target`` is ``HOST:PORT``, a comma-separated list of them, or any gRPC target URI (``dns:///svc:50051``,
    ``ipv4:a:p1,b:p2``). ``root_certs`` (PEM path) switches TLS on; ``client_cert`` and ``client_key``
    add a client certificate for mutual TLS. ``token`` is sent as ``authorization: Bearer <token>`` on
    every call (the admin service requires it when the server is configured with one).
    ``propagate_trace`` sends the caller's current OpenTelemetry span as W3C ``traceparent`` metadata on
    every call, so a server with tracing on continues the caller's trace (needs ``polyhead[tracing]``).
    """

    target: str
    root_certs: str | Path | None = None
    client_cert: str | Path | None = None
    client_key: str | Path | None = None
    #: Override the TLS host name the certificate is checked against (tests, IP targets).
    server_name_override: str | None = None
    token: str | None = None
    #: Interval between HTTP/2 keepalive pings; keeps idle streams through NATs and load balancers.
    keepalive_ms: int = 30_000
    keepalive_timeout_ms: int = 10_000
    #: Reconnect backoff after a lost connection: gRPC's defaults (1 s, growing to 120 s) can leave a client
    #: waiting minutes for a server that restarted in seconds; with these a restarted server is reached
    #: within ~2 s of coming back.
    reconnect_initial_ms: int = 100
    reconnect_max_ms: int = 2_000
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    #: "round_robin" spreads calls over every address the target resolves to; None keeps gRPC's default
    #: (pick_first), except that a multi-address target always gets round_robin.
    lb_policy: str | None = None
    extra_options: tuple[tuple[str, Any], ...] = field(default=())
    propagate_trace: bool = False

    def __post_init__(self) -> None:
        if not self.target.strip():
            raise ValueError("target must be HOST:PORT (or several, comma-separated)")
        _ = self.grpc_target  # a malformed replica list fails here, not at the first call
        if bool(self.client_cert) != bool(self.client_key):
            raise ValueError("mutual TLS needs both client_cert and client_key")
        if self.client_cert and not self.root_certs:
            raise ValueError("a client certificate needs TLS: set root_certs as well")
        if self.propagate_trace:
            from polyhead.clients.tracing import aio_propagators

            aio_propagators()  # without OpenTelemetry: ImportError with the install hint, here

    @property
    def grpc_target(self) -> str:
        """The target as gRPC understands it; a bare comma-separated list of ``IP:PORT`` becomes an
        ``ipv4:``/``ipv6:`` URI (gRPC has no multi-name DNS target: use ``dns:///name:port`` for a name
        that resolves to every replica, e.g. a Kubernetes headless Service)."""
        target = self.target.strip()
        if "," not in target or target.startswith(("ipv4:", "ipv6:")) or "://" in target:
            return target
        parts = [part.strip() for part in target.split(",") if part.strip()]
        hosts = [part.rpartition(":")[0].strip("[]") for part in parts]
        try:
            families = {ipaddress.ip_address(host).version for host in hosts}
        except ValueError:
            raise ValueError(
                f"comma-separated targets must be IP:PORT (got {target!r}); for a DNS name that resolves "
                "to several replicas use dns:///NAME:PORT with lb_policy='round_robin'"
            ) from None
        if len(families) != 1:
            raise ValueError(f"comma-separated targets mix IPv4 and IPv6 addresses: {target!r}")
        return ("ipv4:" if families == {4} else "ipv6:") + ",".join(parts)

    @property
    def is_multi_target(self) -> bool:
        return "," in self.target

    @property
    def tls(self) -> bool:
        return self.root_certs is not None

    def options(self) -> list[tuple[str, Any]]:
        opts: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", self.keepalive_ms),
            ("grpc.keepalive_timeout_ms", self.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.initial_reconnect_backoff_ms", self.reconnect_initial_ms),
            ("grpc.max_reconnect_backoff_ms", self.reconnect_max_ms),
            # Retries are ours (clients/retry.py): one policy, visible in the attempt count.
            ("grpc.enable_retries", 0),
        ]
        lb = self.lb_policy or ("round_robin" if self.is_multi_target else None)
        if lb:
            opts.append(("grpc.lb_policy_name", lb))
        if self.server_name_override:
            opts.append(("grpc.ssl_target_name_override", self.server_name_override))
        opts.extend(self.extra_options)
        return opts

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.root_certs),
            private_key=_read(self.client_key),
            certificate_chain=_read(self.client_cert),
        )

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Per-call metadata (the bearer token), sent explicitly so it also works without TLS."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def sync_channel(self) -> grpc.Channel:
        creds = self.credentials()
        if creds is None:
            channel = grpc.insecure_channel(self.grpc_target, options=self.options())
        else:
            channel = grpc.secure_channel(self.grpc_target, creds, options=self.options())
        if self.propagate_trace:
            from polyhead.clients.tracing import SyncPropagator

            channel = grpc.intercept_channel(channel, SyncPropagator())
        return channel

    def aio_channel(self) -> grpc.aio.Channel:
        creds = self.credentials()
        interceptors = None
        if self.propagate_trace:
            from polyhead.clients.tracing import aio_propagators

            interceptors = aio_propagators()
        if creds is None:
            return grpc.aio.insecure_channel(
                self.grpc_target, options=self.options(), interceptors=interceptors
            )
        return grpc.aio.secure_channel(
            self.grpc_target, creds, options=self.options(), interceptors=interceptors
        )


def as_config(target: str | ChannelConfig, **overrides: Any) -> ChannelConfig:
    """Accept either a ready config or a target string plus keyword options."""
    if isinstance(target, ChannelConfig):
        if overrides:
            from dataclasses import replace

            return replace(target, **overrides)
        return target
    return ChannelConfig(target=target, **overrides)
