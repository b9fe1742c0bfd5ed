"""Shared fixtures for every test package (owned by the server issue; reuse them freely).

* ``tiny_bundle`` (session): a small, untrained but complete bundle of the ``classic-mixed`` suite, built
  with ``polyhead.trainer.export.build_random_bundle``: tasks ``cartpole`` (Discrete(2), obs [4]), ``acrobot``
  (Discrete(3), obs [6]) and ``cartpole-continuous`` (Box [1] in [-1, 1], obs [4]); trunk input size 6.
  Read-only: tests that write into a bundle use ``bundle_copy``.
* ``bundle_copy`` (function): a private copy of ``tiny_bundle`` a test may publish heads into.
* ``server_settings`` (function): a factory ``server_settings(bundle=None, **overrides) -> ServerSettings``
  with every port 0 (free ports), 127.0.0.1, a fast bundle watch (0.2 s) and a 1 s grace period.
* ``server`` (function): a real :class:`polyhead.server.app.BackgroundServer` on ``tiny_bundle`` (data plane,
  separate admin port, metrics port), stopped when the test ends. ``server.target`` /
  ``.admin_target``
  are ``"127.0.0.1:PORT"`` strings for ``grpc.insecure_channel``.
* ``policy_stub`` / ``admin_stub`` / ``diagnostics_stub`` (function): raw gRPC stubs connected to ``server``.
* A guard: a test (or test module) that would be *skipped* because one of polyhead's own modules failed to
  import fails instead (``pytest.importorskip("polyhead...")``, or ``pytest.skip`` inside an
  ``except ImportError`` of a polyhead module). A broken import is a bug, not a missing optional tool.
* ``pki`` (session): test certificates made with the openssl command (skips without it): ``ca.pem``,
  ``server.pem``/``.key`` for 127.0.0.1 and localhost, ``client.pem``/``.key``, and
  ``rogue.pem``/``.key``
  signed by an unrelated CA.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from polyhead.v1 import admin_pb2_grpc, policy_pb2_grpc

TINY_SUITE = "classic-mixed"

# importorskip's own reason ("could not import 'polyhead.server.app': ...") at module level, where only the
# report's text is left to read.
_IMPORTORSKIP_REASON = re.compile(r"could not import '(polyhead(?:\.[\w.]+)?)'")


def _own_module_import_failure(exc: BaseException | None, reason: str) -> str | None:
    """The polyhead module whose failed import caused this skip, or None when the skip has another cause."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ImportError) and (exc.name or "").split(".")[0] == "polyhead":
            return str(exc.name)
        exc = exc.__cause__ or exc.__context__
    found = _IMPORTORSKIP_REASON.search(reason)
    return found.group(1) if found else None


def _fail_instead(report: pytest.TestReport | pytest.CollectReport, module: str, reason: str) -> None:
    report.outcome = "failed"
    report.longrepr = (
        f"skipped because polyhead's own module {module!r} failed to import; that is a bug, not a missing "
        f"optional dependency, so the skip counts as a failure ({reason})"
    )


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    return str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.skipped and call.excinfo is not None:
        reason = _skip_reason(report)
        module = _own_module_import_failure(call.excinfo.value, reason)
        if module is not None:
            _fail_instead(report, module, reason)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    report = yield
    if report.skipped:
        reason = _skip_reason(report)
        module = _own_module_import_failure(None, reason)
        if module is not None:
            _fail_instead(report, module, reason)
    return report


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random bundle (see the module docstring); built once per test session."""
    from polyhead.trainer.export import build_random_bundle
    from polyhead.trainer.policy import PolicyConfig

    out = tmp_path_factory.mktemp("tiny") / "bundle"
    config = PolicyConfig(trunk_hidden=(32,), feature_size=16, critic_hidden=(16,))
    build_random_bundle(out, suite=TINY_SUITE, seed=0, config=config)
    return out


@pytest.fixture
def bundle_copy(tiny_bundle: Path, tmp_path: Path) -> Path:
    """A writable copy of ``tiny_bundle``."""
    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, out)
    return out


@pytest.fixture
def server_settings(tiny_bundle: Path) -> Callable[..., Any]:
    """Factory of ServerSettings on free ports; keyword overrides win."""
    from polyhead.server.settings import ServerSettings

    def make(bundle: Path | None = None, **overrides: Any) -> ServerSettings:
        values: dict[str, Any] = {
            "bundle": bundle or tiny_bundle,
            "host": "127.0.0.1",
            "port": 0,
            "admin_port": 0,
            "metrics_host": "127.0.0.1",
            "metrics_port": 0,
            "watch_interval_s": 0.2,
            "grace_period_s": 1.0,
        }
        values.update(overrides)
        return ServerSettings(**values)

    return make


@pytest.fixture
def server(server_settings: Callable[..., Any]) -> Iterator[Any]:
    """A real server on ``tiny_bundle`` (ports 0), stopped after the test."""
    from polyhead.server.app import BackgroundServer

    with BackgroundServer(server_settings()) as srv:
        yield srv


@pytest.fixture
def channel(server: Any) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as ch:
        yield ch


@pytest.fixture
def policy_stub(channel: grpc.Channel) -> policy_pb2_grpc.PolicyServiceStub:
    return policy_pb2_grpc.PolicyServiceStub(channel)


@pytest.fixture
def diagnostics_stub(channel: grpc.Channel) -> policy_pb2_grpc.DiagnosticsStub:
    return policy_pb2_grpc.DiagnosticsStub(channel)


@pytest.fixture
def admin_stub(server: Any) -> Iterator[admin_pb2_grpc.HeadAdminStub]:
    with grpc.insecure_channel(server.admin_target) as ch:
        yield admin_pb2_grpc.HeadAdminStub(ch)


def make_pki(directory: Path) -> Path:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate (openssl CLI)."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    key = ["-newkey", "rsa:2048", "-nodes", "-days", "2"]
    openssl("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=polyhead-test-ca")
    (directory / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    signed = ["-days", "2", "-extfile", "san.cnf", "-CAcreateserial"]
    for name in ("server", "client"):
        openssl("req", *key[:3], "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-out",
            f"{name}.pem",
            *signed,
        )
    # A second, unrelated CA and a client certificate it signed: mTLS must refuse it.
    openssl("req", "-x509", *key, "-keyout", "rogue-ca.key", "-out", "rogue-ca.pem", "-subj", "/CN=rogue-ca")
    openssl("req", *key[:3], "-keyout", "rogue.key", "-out", "rogue.csr", "-subj", "/CN=rogue")
    openssl(
        "x509",
        "-req",
        "-in",
        "rogue.csr",
        "-CA",
        "rogue-ca.pem",
        "-CAkey",
        "rogue-ca.key",
        "-out",
        "rogue.pem",
        *signed,
    )
    return directory


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make test certificates")
    return make_pki(tmp_path_factory.mktemp("pki"))
