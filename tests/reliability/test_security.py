"""Security: the admin token on every HeadAdmin RPC, TLS and mTLS on both services, admin on loopback by
default, tokens never in the logs, and the head upload size limit (see also test_bad_input.py).

tests/server covers ListHeads/StreamExperience with a token and data-plane TLS + admin mTLS; this adds
every admin method (in separate and shared mode, with valid and with undecodable request bytes), data-plane
mTLS, admin TLS without client certificates, a certificate from a foreign CA, and the bind address.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from reliability_helpers import admin_target, start_serve, started, stop

from polyhead.bundle import Bundle
from polyhead.server.app import BackgroundServer
from polyhead.server.settings import ServerSettings
from polyhead.tensors import to_proto
from polyhead.v1 import admin_pb2, admin_pb2_grpc, policy_pb2, policy_pb2_grpc

TOKEN = "tok-3f9a1c7e-never-logged"
WRONG = "wrong-7d2b-also-never-logged"
OBS = to_proto(np.zeros(4, np.float32))


def admin_requests(bundle: Path) -> dict[str, Any]:
    """One well-formed request per HeadAdmin method (the right token gets each past the token check)."""
    head = Bundle.open(bundle).head("cartpole")
    load = admin_pb2.LoadHeadRequest(
        task_id="cartpole", onnx=head.read_onnx(), head_json=json.dumps(head.meta.to_json()), version=1
    )
    requests = {
        "LoadHead": load,
        "LoadHeads": [load, load],  # a stream of requests
        "SetActiveVersion": admin_pb2.SetActiveVersionRequest(task_id="cartpole", version=1),
        "UnloadHead": admin_pb2.UnloadHeadRequest(task_id="cartpole", version=1),
        "ListHeads": admin_pb2.ListHeadsRequest(),
        # The canary calls reach the registry with the token (FAILED_PRECONDITION: version 1 is stable).
        "SetCanary": admin_pb2.SetCanaryRequest(task_id="cartpole", version=1, canary_percent=10.0),
        "PromoteCanary": admin_pb2.PromoteCanaryRequest(task_id="cartpole"),
        "ClearCanary": admin_pb2.ClearCanaryRequest(task_id="cartpole"),
        "StreamExperience": admin_pb2.StreamExperienceRequest(task_ids=["cartpole"]),
    }
    # Every method of the service, so a new one cannot skip the token check unnoticed.
    assert set(requests) == set(admin_pb2.DESCRIPTOR.services_by_name["HeadAdmin"].methods_by_name)
    return requests


def call(
    stub: admin_pb2_grpc.HeadAdminStub,
    method: str,
    request: Any,
    token: str | None,
    *,
    stream_timeout: float = 10.0,
) -> grpc.StatusCode:
    """The call's status; an accepted StreamExperience runs until ``stream_timeout`` (DEADLINE_EXCEEDED),
    a refused one ends at once, so the default leaves a loaded machine ample time to refuse."""
    metadata = None if token is None else [("authorization", f"Bearer {token}")]
    try:
        if method == "StreamExperience":
            list(stub.StreamExperience(request, metadata=metadata, timeout=stream_timeout))
        elif method == "LoadHeads":
            list(stub.LoadHeads(iter(request), metadata=metadata, timeout=30))
        else:
            getattr(stub, method)(request, metadata=metadata, timeout=30)
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def send_raw(channel: grpc.Channel, method: str, payload: bytes) -> None:
    """``payload`` as the request message of HeadAdmin ``method``, with no serializer in between."""
    if method == "StreamExperience":
        list(channel.unary_stream(f"/polyhead.v1.HeadAdmin/{method}")(payload, timeout=5))
    elif method == "LoadHeads":
        list(channel.stream_stream(f"/polyhead.v1.HeadAdmin/{method}")(iter([payload]), timeout=5))
    else:
        channel.unary_unary(f"/polyhead.v1.HeadAdmin/{method}")(payload, timeout=5)


@pytest.mark.parametrize("mode", ["separate", "shared"])
def test_token_is_enforced_on_every_admin_rpc(
    server_settings: Callable[..., Any], tiny_bundle: Path, mode: str
) -> None:
    requests = admin_requests(tiny_bundle)
    settings = server_settings(admin_token=TOKEN, admin_mode=mode, watch_bundle=False)
    with BackgroundServer(settings) as srv, grpc.insecure_channel(srv.admin_target) as ch:
        stub = admin_pb2_grpc.HeadAdminStub(ch)
        for method, request in requests.items():
            for token in (None, WRONG, "", TOKEN[:-1], TOKEN + "x", TOKEN.upper()):
                assert call(stub, method, request, token) == grpc.StatusCode.UNAUTHENTICATED, (method, token)
            # Undecodable bytes without a token: refused for the token, before the request is read.
            with pytest.raises(grpc.RpcError) as err:
                send_raw(ch, method, b"\xff\xff\xff")
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, method
            assert "admin token" in (err.value.details() or "")
        # Nothing was changed by the refused calls.
        assert [h.version for h in srv.registry.tasks["cartpole"].versions.values()] == [1]
        # With the token every method runs (UnloadHead of the active version and the canary calls on a task
        # without a canary are refused on their merits).
        expected = {
            "UnloadHead": grpc.StatusCode.FAILED_PRECONDITION,
            "SetCanary": grpc.StatusCode.FAILED_PRECONDITION,
            "PromoteCanary": grpc.StatusCode.FAILED_PRECONDITION,
            "StreamExperience": grpc.StatusCode.DEADLINE_EXCEEDED,
        }
        for method, request in requests.items():
            status = call(stub, method, request, TOKEN, stream_timeout=0.5)
            assert status == expected.get(method, grpc.StatusCode.OK), method
        # The data plane needs no token, also on a shared port.
        with grpc.insecure_channel(srv.target) as data:
            policy = policy_pb2_grpc.PolicyServiceStub(data)
            assert (
                policy.Act(
                    policy_pb2.ActRequest(task_id="cartpole", observations=OBS), timeout=10
                ).head_version
                == 1
            )


def credentials(pki: Path, client: str | None = None) -> grpc.ChannelCredentials:
    if client is None:
        return grpc.ssl_channel_credentials(root_certificates=(pki / "ca.pem").read_bytes())
    return grpc.ssl_channel_credentials(
        root_certificates=(pki / "ca.pem").read_bytes(),
        private_key=(pki / f"{client}.key").read_bytes(),
        certificate_chain=(pki / f"{client}.pem").read_bytes(),
    )


def reaches(target: str, creds: grpc.ChannelCredentials | None, service: str) -> grpc.StatusCode:
    """The outcome of one cheap call to ``service`` ("policy" ListTasks, "echo", "admin" ListHeads)."""
    channel = grpc.insecure_channel(target) if creds is None else grpc.secure_channel(target, creds)
    with channel:
        try:
            if service == "policy":
                policy_pb2_grpc.PolicyServiceStub(channel).ListTasks(policy_pb2.ListTasksRequest(), timeout=5)
            elif service == "echo":
                policy_pb2_grpc.DiagnosticsStub(channel).Echo(policy_pb2.EchoRequest(payload=b"x"), timeout=5)
            else:
                admin_pb2_grpc.HeadAdminStub(channel).ListHeads(admin_pb2.ListHeadsRequest(), timeout=5)
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_mtls_data_plane_and_tls_admin(server_settings: Callable[..., Any], pki: Path) -> None:
    """The combination tests/server does not cover: mTLS on the data plane, server-only TLS on admin."""
    settings = server_settings(
        tls_cert=pki / "server.pem",
        tls_key=pki / "server.key",
        tls_client_ca=pki / "ca.pem",
        admin_tls_cert=pki / "server.pem",
        admin_tls_key=pki / "server.key",
        watch_bundle=False,
    )
    rogue = grpc.ssl_channel_credentials(
        root_certificates=(pki / "ca.pem").read_bytes(),
        private_key=(pki / "rogue.key").read_bytes(),
        certificate_chain=(pki / "rogue.pem").read_bytes(),
    )
    with BackgroundServer(settings) as srv:
        for service in ("policy", "echo"):
            assert reaches(srv.target, credentials(pki, "client"), service) == grpc.StatusCode.OK
            assert reaches(srv.target, credentials(pki), service) == grpc.StatusCode.UNAVAILABLE  # no cert
            assert reaches(srv.target, rogue, service) == grpc.StatusCode.UNAVAILABLE  # foreign CA
            assert reaches(srv.target, None, service) == grpc.StatusCode.UNAVAILABLE  # plaintext
        assert reaches(srv.admin_target, credentials(pki), "admin") == grpc.StatusCode.OK
        assert reaches(srv.admin_target, None, "admin") == grpc.StatusCode.UNAVAILABLE


def test_mtls_admin_refuses_a_foreign_ca_and_tls_shared_mode(
    server_settings: Callable[..., Any], pki: Path
) -> None:
    settings = server_settings(
        admin_tls_cert=pki / "server.pem",
        admin_tls_key=pki / "server.key",
        admin_tls_client_ca=pki / "ca.pem",
        watch_bundle=False,
    )
    rogue = grpc.ssl_channel_credentials(
        root_certificates=(pki / "ca.pem").read_bytes(),
        private_key=(pki / "rogue.key").read_bytes(),
        certificate_chain=(pki / "rogue.pem").read_bytes(),
    )
    with BackgroundServer(settings) as srv:
        assert reaches(srv.admin_target, rogue, "admin") == grpc.StatusCode.UNAVAILABLE
        assert reaches(srv.admin_target, credentials(pki, "client"), "admin") == grpc.StatusCode.OK
    shared = server_settings(
        admin_mode="shared",
        tls_cert=pki / "server.pem",
        tls_key=pki / "server.key",
        watch_bundle=False,
    )
    with BackgroundServer(shared) as srv:
        for service in ("policy", "echo", "admin"):
            assert reaches(srv.target, credentials(pki), service) == grpc.StatusCode.OK
            assert reaches(srv.target, None, service) == grpc.StatusCode.UNAVAILABLE


def non_loopback_address() -> str | None:
    """An IPv4 address of this machine that is not loopback, or None."""
    candidates: list[str] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.255", 9))  # UDP connect sends nothing; it only picks the outgoing address
            candidates.append(str(s.getsockname()[0]))
        except OSError:
            pass
    with contextlib.suppress(OSError):
        candidates += socket.gethostbyname_ex(socket.gethostname())[2]
    hostname_i = subprocess.run(["hostname", "-I"], capture_output=True, text=True, check=False).stdout
    candidates += hostname_i.split()
    for address in candidates:
        if "." in address and not address.startswith("127.") and address != "0.0.0.0":
            return address
    return None


def test_admin_binds_loopback_by_default(server_settings: Callable[..., Any], tiny_bundle: Path) -> None:
    defaults = ServerSettings(bundle=tiny_bundle)
    assert defaults.admin_host == "127.0.0.1"
    assert defaults.admin_mode == "separate"
    # The data plane on every interface, admin left at its default host.
    with BackgroundServer(
        server_settings(host="0.0.0.0", admin_host=defaults.admin_host, watch_bundle=False)
    ) as srv:
        assert reaches(f"127.0.0.1:{srv.admin_port}", None, "admin") == grpc.StatusCode.OK
        address = non_loopback_address()
        if address is None:
            pytest.skip("this machine has no non-loopback IPv4 address to try the admin port on")
        assert reaches(f"{address}:{srv.port}", None, "policy") == grpc.StatusCode.OK  # the address works
        with socket.socket() as s:
            s.settimeout(2)
            assert s.connect_ex((address, srv.admin_port)) != 0, f"admin port reachable on {address}"


@pytest.fixture
def debug_server(tiny_bundle: Path, tmp_path: Path) -> Iterator[Any]:
    replica = start_serve(
        tiny_bundle, tmp_path, "debug", "--no-watch", env={"POLYHEAD_ADMIN_TOKEN": TOKEN}, log_level="DEBUG"
    )
    try:
        yield started(replica)
    finally:
        stop(replica)


def test_tokens_are_never_logged(debug_server: Any, tiny_bundle: Path) -> None:
    """A DEBUG-level server, admin calls with the right, a wrong and no token: neither token text appears
    in anything the process printed (grpc's own tracing included: GRPC_VERBOSITY is inherited)."""
    requests = admin_requests(tiny_bundle)
    with grpc.insecure_channel(admin_target(debug_server)) as ch:
        stub = admin_pb2_grpc.HeadAdminStub(ch)
        for method, request in requests.items():
            accepted = call(stub, method, request, TOKEN, stream_timeout=0.5)
            assert accepted not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INTERNAL), method
            for token in (WRONG, None):
                assert call(stub, method, request, token) == grpc.StatusCode.UNAUTHENTICATED, method
        assert call(stub, "ListHeads", requests["ListHeads"], TOKEN) == grpc.StatusCode.OK
    assert stop(debug_server) == 0
    log = debug_server.log_path.read_text(errors="replace")
    assert "DEBUG" in log or "INFO" in log, log[-2000:]  # the log is not simply empty
    assert TOKEN not in log and TOKEN[:12] not in log
    assert WRONG not in log and WRONG[:12] not in log
    argv = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=False).stdout
    assert TOKEN not in argv  # passed by environment, not on a command line
