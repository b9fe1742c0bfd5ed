"""The wheel a user installs: one import namespace (``polyhead.*`` only) and extras that keep torch and
onnxruntime out of the installs that do not need them.

The wheel is built from a copy of the source tree (the build never writes into the working tree), then
installed into fresh virtual environments (``python -m venv``) with the ``client`` and the ``serve`` extra
from the package indexes pip is configured with, reusing pip's cache. Each install is exercised for real:
the client venv acts and simulates against a server, the serve venv runs ``polyhead serve`` on a bundle.
"""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys
import textwrap
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from polyhead.tensors import to_proto
from polyhead.v1 import policy_pb2, policy_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
# What a user's own code base may well call its modules: none of them may come from our wheel.
FOREIGN_TOP_LEVEL = ("server", "clients", "trainer")

pytestmark = pytest.mark.slow


def _copy_source(dest: Path) -> Path:
    """The files a build needs, symlinks kept as links (polyhead/server -> ../server), as in a checkout."""
    src = dest / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "node_modules", "*.pyc", "*.egg-info")
    for package in ("polyhead", "clients", "server", "trainer"):
        shutil.copytree(REPO / package, src / package, symlinks=True, ignore=ignore)
    return src


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip wheel --no-deps`` of a copy of the repository."""
    work = tmp_path_factory.mktemp("wheel")
    src = _copy_source(work)
    assert (src / "polyhead" / "server").is_symlink(), "the build must see the checkout's layout"
    dist = work / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dist), str(src)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (found,) = dist.glob("polyhead-*.whl")
    return found


def _venv(root: Path, wheel: Path, extra: str) -> Path:
    """A fresh venv with ``polyhead[extra]`` installed from ``wheel``; returns its python."""
    venv = root / f"venv-{extra}"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=180)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", f"{wheel}[{extra}]"],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    return python


# Run in the venv from an empty directory, so nothing resolves against the working tree.
PROBE = textwrap.dedent(
    """
    import importlib, importlib.metadata, importlib.util, json, sys
    results = {}
    for name in sys.argv[1:]:
        try:
            importlib.import_module(name)
            results[name] = "ok"
        except ImportError as exc:
            results[name] = f"{type(exc).__name__}: {exc}"
    installed = sorted(d.metadata["Name"].lower() for d in importlib.metadata.distributions())
    print(json.dumps({
        "imports": results,
        "installed": installed,
        "torch_findable": importlib.util.find_spec("torch") is not None,
        "onnxruntime_findable": importlib.util.find_spec("onnxruntime") is not None,
        "loaded": sorted({m.split(".")[0] for m in sys.modules} & {"torch", "onnxruntime"}),
    }))
    """
)


def _probe(python: Path, cwd: Path, *modules: str) -> dict[str, Any]:
    script = cwd / "probe.py"
    script.write_text(PROBE)
    proc = subprocess.run(
        [str(python), str(script), *modules],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return report


def _assert_one_namespace(report: dict[str, Any]) -> None:
    for name in FOREIGN_TOP_LEVEL:
        assert report["imports"][name].startswith("ModuleNotFoundError"), (name, report["imports"][name])


def test_wheel_holds_only_the_polyhead_package_and_no_links(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        infos = zf.infolist()
        top_level = zf.read(next(i for i in infos if i.filename.endswith(".dist-info/top_level.txt")))
    names = [i.filename for i in infos]
    roots = {n.split("/")[0] for n in names}
    assert roots == {"polyhead", "polyhead-0.1.0.dist-info"}, roots
    assert top_level.decode().split() == ["polyhead"]
    # The symlinked parts arrive as real files under polyhead/.
    for part, module in (("server", "app.py"), ("trainer", "ppo.py"), ("clients", "policy_client.py")):
        assert f"polyhead/{part}/{module}" in names
        assert f"polyhead/{part}/py.typed" in names
    links = [i.filename for i in infos if stat.S_ISLNK(i.external_attr >> 16)]
    assert links == []
    assert not [n for n in names if "/node/" in n or n.endswith((".pyc", ".js"))]
    assert "polyhead/suites/cartpole-family.toml" in names


@pytest.fixture(scope="module")
def client_python(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _venv(tmp_path_factory.mktemp("client-venv"), wheel, "client")


@pytest.fixture(scope="module")
def serve_python(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _venv(tmp_path_factory.mktemp("serve-venv"), wheel, "serve")


CLIENT_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from polyhead.clients import PolicyClient, TaskNotFound
    from polyhead.clients.simulator import SimulationConfig, run_simulation

    target = sys.argv[1]
    with PolicyClient(target) as client:
        tasks = sorted(t.task_id for t in client.list_tasks())
        action = client.act("cartpole", np.zeros(4, np.float32), deterministic=True)
        try:
            client.act("cartpole", np.zeros(4, np.float32), version=77)
            raise SystemExit("expected TaskNotFound")
        except TaskNotFound:
            pass
    config = SimulationConfig(task_id="cartpole", episodes=2, envs=2, deterministic=True)
    result = run_simulation(target, config)
    print(json.dumps({
        "tasks": tasks,
        "head_version": action.head_version,
        "returns": result.returns,
        "loaded": sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "onnxruntime"}),
    }))
    """
)


def test_client_extra_has_one_namespace_and_no_torch_or_onnxruntime(
    client_python: Path, server: Any, tmp_path: Path
) -> None:
    report = _probe(
        client_python, tmp_path, "polyhead.clients", "polyhead.clients.simulator", *FOREIGN_TOP_LEVEL
    )
    assert report["imports"]["polyhead.clients"] == "ok"
    assert report["imports"]["polyhead.clients.simulator"] == "ok"
    _assert_one_namespace(report)
    assert not {"torch", "onnxruntime"} & set(report["installed"]), report["installed"]
    assert report["torch_findable"] is False and report["onnxruntime_findable"] is False
    assert report["loaded"] == []

    # The installed client works against a real server.
    script = tmp_path / "client_check.py"
    script.write_text(CLIENT_SCRIPT)
    proc = subprocess.run(
        [str(client_python), str(script), server.target],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tasks"] == ["acrobot", "cartpole", "cartpole-continuous"]
    assert result["head_version"] == 1
    assert len(result["returns"]) == 2
    assert result["loaded"] == []
    cli = subprocess.run(
        [str(client_python.parent / "polyhead"), "simulate", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert cli.returncode == 0 and "--episodes" in cli.stdout
    # A command whose part is not installed says which extra brings it, and fails cleanly.
    train = subprocess.run(
        [str(client_python.parent / "polyhead"), "train", "--out", str(tmp_path / "b")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert train.returncode == 2, train.stderr
    assert "polyhead[train]" in train.stderr and "Traceback" not in train.stderr


@pytest.fixture
def installed_server(serve_python: Path, tiny_bundle: Path, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """``polyhead serve`` from the serve venv on ``tiny_bundle``; yields its ready-file contents."""
    ready = tmp_path / "ready.json"
    argv = [
        str(serve_python.parent / "polyhead"), "serve", "--bundle", str(tiny_bundle), "--host", "127.0.0.1",
        "--port", "0", "--admin-port", "0", "--metrics-host", "127.0.0.1", "--metrics-port", "0",
        "--ready-file", str(ready),
    ]  # fmt: skip
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while not ready.exists():
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "polyhead serve from the wheel did not become ready"
            time.sleep(0.05)
        yield json.loads(ready.read_text())
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0, (tmp_path / "serve.log").read_text()[-3000:]
        log.close()


def test_serve_extra_has_one_namespace_no_torch_and_serves(
    serve_python: Path, installed_server: dict[str, Any], tmp_path: Path
) -> None:
    report = _probe(serve_python, tmp_path, "polyhead.server.app", "polyhead.clients", *FOREIGN_TOP_LEVEL)
    assert report["imports"]["polyhead.server.app"] == "ok"
    _assert_one_namespace(report)
    assert "torch" not in report["installed"] and "onnxruntime" in report["installed"]
    assert report["torch_findable"] is False
    # The server from the wheel answers a real Act.
    with grpc.insecure_channel(f"127.0.0.1:{installed_server['port']}") as channel:
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        request = policy_pb2.ActRequest(
            task_id="cartpole", observations=to_proto(np.zeros((1, 4), np.float32))
        )
        reply = stub.Act(request, timeout=30)
    assert reply.head_version == 1
