"""TLS and mTLS on the data plane and the admin server (certificates made with the openssl CLI)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from server_helpers import act, observations

from polyhead.server.app import BackgroundServer
from polyhead.v1 import admin_pb2, admin_pb2_grpc, policy_pb2_grpc


def test_tls_and_mtls(server_settings: Callable[..., Any], pki: Path) -> None:
    settings = server_settings(
        tls_cert=pki / "server.pem",
        tls_key=pki / "server.key",
        admin_tls_cert=pki / "server.pem",
        admin_tls_key=pki / "server.key",
        admin_tls_client_ca=pki / "ca.pem",
        watch_bundle=False,
    )
    ca = (pki / "ca.pem").read_bytes()
    with BackgroundServer(settings) as srv:
        tls = grpc.ssl_channel_credentials(root_certificates=ca)
        with grpc.secure_channel(srv.target, tls) as ch:
            assert (
                act(policy_pb2_grpc.PolicyServiceStub(ch), "cartpole", observations("cartpole")).head_version
                == 1
            )
        with grpc.insecure_channel(srv.target) as ch, pytest.raises(grpc.RpcError) as plain:
            act(policy_pb2_grpc.PolicyServiceStub(ch), "cartpole", observations("cartpole"))
        assert plain.value.code() == grpc.StatusCode.UNAVAILABLE
        # Admin requires a client certificate signed by the CA (mTLS).
        with grpc.secure_channel(srv.admin_target, tls) as ch, pytest.raises(grpc.RpcError) as no_cert:
            admin_pb2_grpc.HeadAdminStub(ch).ListHeads(admin_pb2.ListHeadsRequest(), timeout=10)
        assert no_cert.value.code() == grpc.StatusCode.UNAVAILABLE
        mtls = grpc.ssl_channel_credentials(
            root_certificates=ca,
            private_key=(pki / "client.key").read_bytes(),
            certificate_chain=(pki / "client.pem").read_bytes(),
        )
        with grpc.secure_channel(srv.admin_target, mtls) as ch:
            assert len(admin_pb2_grpc.HeadAdminStub(ch).ListHeads(admin_pb2.ListHeadsRequest()).heads) == 3
