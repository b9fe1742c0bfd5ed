"""The first hour: the usual mistakes fail cleanly. Each case runs the real ``polyhead`` command in a child
process and expects exit status 2, no traceback, nothing on stdout, and one ``polyhead <command>: error:``
line (the last on stderr) that names what was wrong and how to fix it. ``--log-level DEBUG`` adds the
traceback.

Elsewhere: an unreachable server for ``simulate`` (tests/clients/test_clients_simulate.py) and for
``adapt``, a missing bundle and bad task specs for ``adapt`` (tests/updater/test_updater_errors.py), bad
suites for ``train`` (tests/trainer/test_cli.py), broken bundles for ``serve``
(tests/reliability/test_bundle_faults.py), an open HeadAdmin (tests/server/test_server_fail_closed.py).
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest


def polyhead(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "polyhead", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        check=False,
    )


def serve(bundle: Path, cwd: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """``polyhead serve`` on free ports, except those ``extra`` sets."""
    free = {"--port": "0", "--admin-port": "0", "--metrics-port": "0"}
    ports = [word for flag, value in free.items() if flag not in extra for word in (flag, value)]
    argv = ["serve", "--bundle", str(bundle), "--host", "127.0.0.1", "--no-watch", "--json"]
    return polyhead(*argv, *ports, *extra, cwd=cwd)


def error_line(proc: subprocess.CompletedProcess[str], command: str) -> str:
    """The one error line, after checking everything else about a clean failure."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stdout.strip() == "", proc.stdout  # no --json summary for a run that never started
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(f"polyhead {command}: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr[-3000:]
    return errors[0]


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port some other process listens on (here, this test)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


@pytest.mark.parametrize("flag", ["--port", "--admin-port", "--metrics-port"])
def test_serve_port_in_use(tiny_bundle: Path, tmp_path: Path, taken_port: int, flag: str) -> None:
    extra = [flag, str(taken_port)]
    if flag == "--metrics-port":
        extra += ["--metrics-host", "127.0.0.1"]
    line = error_line(serve(tiny_bundle, tmp_path, *extra), "serve")
    assert f"127.0.0.1:{taken_port}" in line and flag in line
    assert "already in use" in line and "choose another" in line


def test_adapt_metrics_port_in_use(tiny_bundle: Path, tmp_path: Path, taken_port: int) -> None:
    argv = ["adapt", "--bundle", str(tiny_bundle), "--task-spec", "classic-mixed:acrobot-heavy"]
    argv += ["--metrics-port", str(taken_port), "--no-progress", "--json"]
    line = error_line(polyhead(*argv, cwd=tmp_path), "adapt")
    assert f":{taken_port}" in line and "--metrics-port" in line and "choose another" in line


def test_serve_bundle_missing(tmp_path: Path) -> None:
    line = error_line(serve(tmp_path / "no-such-bundle", tmp_path), "serve")
    assert "BundleNotFound" in line and "no-such-bundle" in line and "does not exist" in line
    assert "polyhead train --out" in line  # how to get one


@pytest.mark.parametrize("scenario", ["adapt", "drift"])
def test_demo_bundle_missing_fails_before_anything_starts(tmp_path: Path, scenario: str) -> None:
    argv = ["demo", "--scenario", scenario, "--fast", "--bundle", str(tmp_path / "no-such-bundle")]
    line = error_line(polyhead(*argv, "--out", str(tmp_path / "report"), cwd=tmp_path), "demo")
    assert "BundleNotFound" in line and "no-such-bundle" in line and "polyhead train --out" in line
    assert not (tmp_path / "report").exists()  # nothing was started or written


def test_serve_path_is_not_a_bundle(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a bundle")
    line = error_line(serve(tmp_path, tmp_path), "serve")
    assert "manifest.json" in line and "polyhead train --out" in line


@pytest.mark.parametrize("which", ["cert-missing", "key-is-a-directory", "cert-not-pem", "client-ca-missing"])
def test_serve_unreadable_tls_file(tiny_bundle: Path, tmp_path: Path, pki: Path, which: str) -> None:
    files = {"--tls-cert": pki / "server.pem", "--tls-key": pki / "server.key"}
    if which == "cert-missing":
        files["--tls-cert"] = tmp_path / "missing.pem"
    elif which == "key-is-a-directory":
        files["--tls-key"] = tmp_path
    elif which == "cert-not-pem":
        files["--tls-cert"] = tmp_path / "cert.pem"
        files["--tls-cert"].write_text("hello\n")
    else:
        files["--tls-client-ca"] = tmp_path / "missing-ca.pem"
    bad_flag = {
        "cert-missing": "--tls-cert",
        "key-is-a-directory": "--tls-key",
        "cert-not-pem": "--tls-cert",
        "client-ca-missing": "--tls-client-ca",
    }[which]
    line = error_line(serve(tiny_bundle, tmp_path, *(str(w) for kv in files.items() for w in kv)), "serve")
    assert f"({bad_flag})" in line and str(files[bad_flag]) in line
    assert "PEM" in line


def test_client_unreadable_tls_file(tmp_path: Path) -> None:
    missing = tmp_path / "ca.pem"
    proc = polyhead(
        "simulate", "--target", "127.0.0.1:1", "--task", "cartpole", "--tls-ca", str(missing), cwd=tmp_path
    )
    line = error_line(proc, "simulate")
    assert "--tls-ca" in line and str(missing) in line


def test_bench_unreachable_server(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    proc = polyhead(
        "bench", "--target", f"127.0.0.1:{port}", "--concurrency", "1", "--timeout", "1", cwd=tmp_path
    )
    line = error_line(proc, "bench")
    assert f"no polyhead server answered at 127.0.0.1:{port}" in line and "--target" in line


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (None, "does not exist"),
        ('[[task]]\nid = "t"\nenv = "NoSuchEnv-v9"\n', "NoSuchEnv-v9"),
        ("[[task]\nnot toml", "TOML"),
    ],
    ids=["missing-file", "unknown-env", "not-toml"],
)
def test_simulate_bad_task_spec(tmp_path: Path, spec: str | None, expected: str) -> None:
    path = tmp_path / "task.toml"
    if spec is not None:
        path.write_text(spec)
    argv = ["simulate", "--target", "127.0.0.1:1", "--task", "t", "--task-spec", str(path)]
    line = error_line(polyhead(*argv, cwd=tmp_path), "simulate")
    assert "InvalidTaskSpec" in line and expected in line
    assert "SUITE:TASK" in line  # how to write one


def test_debug_log_level_adds_the_traceback(tmp_path: Path) -> None:
    proc = serve(tmp_path / "no-such-bundle", tmp_path, "--log-level", "DEBUG")
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and "BundleNotFound" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("polyhead serve: error: BundleNotFound")


def test_exit_status_classes() -> None:
    """What the user can fix exits 2, a server that went away mid-run (a failed gRPC call after its
    retries) or another polyhead error exits 1, anything else is a bug and keeps its traceback."""
    from polyhead.cli import _exit_status
    from polyhead.clients.errors import ServerError, Unavailable
    from polyhead.errors import BundleNotFound, InvalidTaskSpec, UsageError

    assert _exit_status(UsageError("port in use")) == 2
    assert _exit_status(BundleNotFound("x")) == 2
    assert _exit_status(InvalidTaskSpec("x")) == 2
    assert _exit_status(Unavailable("the server is shutting down", attempts=5)) == 1
    assert _exit_status(ServerError("internal")) == 1
    assert _exit_status(ValueError("a bug")) is None


@pytest.mark.parametrize("command", ["serve", "simulate", "bench"])
def test_serving_and_client_commands_do_not_import_torch(command: str, tmp_path: Path) -> None:
    """Every subcommand other than the one run is only listed, so `polyhead serve` never pays for the
    trainer's import of torch (it once did, through `operate`'s registrar: 1.7 s of every server start)."""
    probe = (
        "import sys; from polyhead.cli import build_parser; "
        f"build_parser(only={command!r}); print('torch' in sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=tmp_path, check=True
    )
    assert proc.stdout.strip() == "False", proc.stdout
    listed = polyhead("--help", cwd=tmp_path)
    assert "operate" in listed.stdout and "regresses" in listed.stdout
