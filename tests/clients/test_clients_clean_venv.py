"""``pip install 'polyhead[client]'`` into a clean virtual environment gives a working client without
torch or onnxruntime."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from polyhead.server.app import BackgroundServer

REPO = Path(__file__).resolve().parents[2]

CLIENT_SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, sys
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
        "torch_importable": importlib.util.find_spec("torch") is not None,
        "onnxruntime_importable": importlib.util.find_spec("onnxruntime") is not None,
        "loaded": sorted(
            m for m in sys.modules if m.split(".")[0] in {"torch", "onnxruntime", "server", "trainer"}
        ),
    }))
    """
)


def _copy_source(dest: Path) -> Path:
    """The files a source install needs, so the build never writes into the working tree."""
    src = dest / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "node_modules", "*.pyc")
    for package in ("polyhead", "clients", "server", "trainer"):
        shutil.copytree(REPO / package, src / package, ignore=ignore)
    return src


@pytest.mark.slow
def test_client_extra_installs_and_works_without_torch(
    clients_server: BackgroundServer, tmp_path: Path
) -> None:
    src = _copy_source(tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", f"{src}[client]"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    script = tmp_path / "client_check.py"
    script.write_text(CLIENT_SCRIPT)
    # Run from tmp_path so nothing resolves against the working tree.
    proc = subprocess.run(
        [str(python), str(script), clients_server.target],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["tasks"] == ["acrobot", "cartpole", "cartpole-continuous"]
    assert report["head_version"] == 1
    assert len(report["returns"]) == 2
    assert report["torch_importable"] is False
    assert report["onnxruntime_importable"] is False
    assert report["loaded"] == []
    cli = subprocess.run(
        [str(venv / "bin" / "polyhead"), "simulate", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert cli.returncode == 0 and "--episodes" in cli.stdout
