"""Fail closed: HeadAdmin reachable from other hosts needs a token or mTLS, or an explicit
``--insecure-admin``; otherwise ``polyhead serve`` refuses to start with one line naming the setting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pydantic
import pytest

from polyhead.server.settings import ServerSettings, is_loopback
from polyhead.v1 import admin_pb2, admin_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
TOKEN = "fail-closed-token"


def test_loopback_names() -> None:
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "[::]", "10.1.2.3", "example.org", ""):
        assert not is_loopback(host), host


# (settings, accepted): every combination of placement, address and protection.
CASES: dict[str, tuple[dict[str, Any], bool]] = {
    "separate-loopback": ({"admin_host": "127.0.0.1"}, True),
    "separate-localhost": ({"admin_host": "localhost"}, True),
    "separate-exposed": ({"admin_host": "0.0.0.0"}, False),
    "separate-exposed-token": ({"admin_host": "0.0.0.0", "admin_token": TOKEN}, True),
    "separate-exposed-mtls": ({"admin_host": "0.0.0.0", "admin_tls": "mtls"}, True),
    "separate-exposed-tls-only": ({"admin_host": "0.0.0.0", "admin_tls": "tls"}, False),
    "separate-exposed-insecure": ({"admin_host": "0.0.0.0", "insecure_admin": True}, True),
    # The data plane's address does not matter while admin has its own loopback port.
    "separate-data-plane-exposed": ({"host": "0.0.0.0", "admin_host": "127.0.0.1"}, True),
    "shared-loopback": ({"admin_mode": "shared", "host": "127.0.0.1"}, True),
    "shared-exposed": ({"admin_mode": "shared", "host": "0.0.0.0"}, False),
    "shared-exposed-token": ({"admin_mode": "shared", "host": "0.0.0.0", "admin_token": TOKEN}, True),
    "shared-exposed-mtls": ({"admin_mode": "shared", "host": "0.0.0.0", "tls": "mtls"}, True),
    "shared-exposed-tls-only": ({"admin_mode": "shared", "host": "0.0.0.0", "tls": "tls"}, False),
    # A client CA of the *other* server does not protect the shared admin service.
    "shared-exposed-admin-mtls": ({"admin_mode": "shared", "host": "0.0.0.0", "admin_tls": "mtls"}, False),
    "shared-exposed-insecure": ({"admin_mode": "shared", "host": "0.0.0.0", "insecure_admin": True}, True),
    "off-exposed": ({"admin_mode": "off", "host": "0.0.0.0", "admin_host": "0.0.0.0"}, True),
}


def _settings(tiny_bundle: Path, pki: Path, values: dict[str, Any]) -> ServerSettings:
    values = dict(values)
    for prefix in ("", "admin_"):
        kind = values.pop(f"{prefix}tls", None)
        if kind is not None:
            values[f"{prefix}tls_cert"] = pki / "server.pem"
            values[f"{prefix}tls_key"] = pki / "server.key"
            if kind == "mtls":
                values[f"{prefix}tls_client_ca"] = pki / "ca.pem"
    return ServerSettings(bundle=tiny_bundle, **values)


@pytest.mark.parametrize("case", sorted(CASES))
def test_admin_reachable_from_other_hosts_needs_a_token_or_mtls(
    tiny_bundle: Path, pki: Path, case: str
) -> None:
    values, accepted = CASES[case]
    if accepted:
        settings = _settings(tiny_bundle, pki, values)
        # Accepted because protected or not reachable, or reachable and unprotected on explicit request.
        assert (settings.exposed_admin_address is not None) == settings.insecure_admin
        return
    with pytest.raises(pydantic.ValidationError) as raised:
        _settings(tiny_bundle, pki, values)
    message = str(raised.value)
    # Names the address, the settings that fix it and the explicit way out.
    assert "0.0.0.0" in message and "admin_token" in message and "--insecure-admin" in message
    assert ("--admin-host" if values.get("admin_mode") != "shared" else "--host") in message


def _serve(
    bundle: Path, tmp_path: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    argv = [
        sys.executable, "-m", "polyhead", "serve", "--bundle", str(bundle), "--port", "0",
        "--admin-port", "0", "--metrics-port", "0", "--no-watch",
        "--ready-file", str(tmp_path / "ready.json"), *extra,
    ]  # fmt: skip
    return subprocess.Popen(
        argv,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
    )


def _ready(proc: subprocess.Popen[str], tmp_path: Path) -> dict[str, Any]:
    ready = tmp_path / "ready.json"
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "polyhead serve did not become ready"
        time.sleep(0.05)
    info: dict[str, Any] = json.loads(ready.read_text())
    return info


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    return err


def _list_heads(port: int, token: str | None = None) -> grpc.StatusCode:
    metadata = [("authorization", f"Bearer {token}")] if token else None
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            admin_pb2_grpc.HeadAdminStub(channel).ListHeads(
                admin_pb2.ListHeadsRequest(), timeout=10, metadata=metadata
            )
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


@pytest.mark.parametrize(
    "flags",
    [("--admin-host", "0.0.0.0"), ("--admin-mode", "shared", "--host", "0.0.0.0")],
    ids=["separate", "shared"],
)
def test_serve_refuses_an_open_admin_in_one_line(
    tiny_bundle: Path, tmp_path: Path, flags: tuple[str, ...]
) -> None:
    proc = _serve(tiny_bundle, tmp_path, *flags)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("polyhead serve: error: invalid settings:")
    assert "admin_token" in lines[0] and "--insecure-admin" in lines[0]
    assert not (tmp_path / "ready.json").exists()


def test_serve_with_a_token_on_an_exposed_admin_starts(tiny_bundle: Path, tmp_path: Path) -> None:
    proc = _serve(tiny_bundle, tmp_path, "--admin-host", "0.0.0.0", env={"POLYHEAD_ADMIN_TOKEN": TOKEN})
    try:
        info = _ready(proc, tmp_path)
        assert _list_heads(info["admin_port"]) == grpc.StatusCode.UNAUTHENTICATED
        assert _list_heads(info["admin_port"], TOKEN) == grpc.StatusCode.OK
    finally:
        err = _stop(proc)
    assert "insecure" not in err.lower()


def test_insecure_admin_starts_with_a_warning(tiny_bundle: Path, tmp_path: Path) -> None:
    proc = _serve(tiny_bundle, tmp_path, "--admin-host", "0.0.0.0", "--insecure-admin")
    try:
        info = _ready(proc, tmp_path)
        assert _list_heads(info["admin_port"]) == grpc.StatusCode.OK
    finally:
        err = _stop(proc)
    warnings = [line for line in err.splitlines() if " WARNING " in line]
    assert any("HeadAdmin is reachable from other hosts" in w and "insecure_admin" in w for w in warnings), (
        err
    )


def test_insecure_admin_also_from_the_environment(tiny_bundle: Path, tmp_path: Path) -> None:
    proc = _serve(tiny_bundle, tmp_path, "--admin-host", "0.0.0.0", env={"POLYHEAD_INSECURE_ADMIN": "true"})
    try:
        _ready(proc, tmp_path)
    finally:
        err = _stop(proc)
    assert "HeadAdmin is reachable from other hosts" in err
