"""TLS and mTLS on the data plane and the admin server (certificates made with the openssl CLI)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from server_helpers import act, observations

from polyhead.v1 import admin_pb2, admin_pb2_grpc, policy_pb2_grpc
from server.app import BackgroundServer

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, all signed by the CA."""
    d = tmp_path_factory.mktemp("pki")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=polyhead-test-ca",
        cwd=d,
    )
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
            cwd=d,
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-extfile",
            "san.cnf",
            cwd=d,
        )
    return d


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
