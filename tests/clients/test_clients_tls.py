"""TLS and mutual TLS against a real server: certificates made with the openssl command line."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from polyhead.clients import ChannelConfig, PolicyClient, RetryPolicy, Unavailable
from polyhead.server.app import BackgroundServer
from polyhead.server.settings import ServerSettings


@pytest.fixture(scope="module")
def mtls_server(clients_bundle: Path, pki: Path) -> Iterator[BackgroundServer]:
    settings = ServerSettings(
        bundle=clients_bundle,
        host="127.0.0.1",
        port=0,
        admin_port=0,
        metrics_port=None,
        tls_cert=pki / "server.pem",
        tls_key=pki / "server.key",
        tls_client_ca=pki / "ca.pem",
    )
    with BackgroundServer(settings) as srv:
        yield srv


def test_mutual_tls_round_trip(mtls_server: BackgroundServer, pki: Path) -> None:
    config = ChannelConfig(
        target=mtls_server.target,
        root_certs=pki / "ca.pem",
        client_cert=pki / "client.pem",
        client_key=pki / "client.key",
    )
    with PolicyClient(config) as client:
        result = client.act("cartpole", np.zeros(4, np.float32), deterministic=True)
        assert result.head_version == 1


def test_without_a_client_certificate_the_handshake_fails(mtls_server: BackgroundServer, pki: Path) -> None:
    config = ChannelConfig(target=mtls_server.target, root_certs=pki / "ca.pem")
    with (
        PolicyClient(config, timeout=5.0, retry=RetryPolicy(max_attempts=1)) as client,
        pytest.raises(Unavailable),
    ):
        client.echo(b"x")


def test_channel_config_rejects_half_a_client_certificate(pki: Path) -> None:
    with pytest.raises(ValueError, match="client_cert and client_key"):
        ChannelConfig(target="127.0.0.1:1", root_certs=pki / "ca.pem", client_cert=pki / "client.pem")
