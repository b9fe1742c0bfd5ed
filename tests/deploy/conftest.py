"""Fixtures for the deploy/ tests: the repository's deploy files, and Prometheus + promtool.

Prometheus and promtool come from Debian's ``prometheus`` package, installed on first use by
``install_prometheus.sh`` (apt-get; needs root). The packaged service is never left running: every test
that needs a server starts its own ``prometheus`` on 127.0.0.1 with a free port and temporary storage.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

INSTALL_SCRIPT = Path(__file__).with_name("install_prometheus.sh")


@dataclass(frozen=True)
class PrometheusTools:
    prometheus: Path
    promtool: Path


def _which() -> PrometheusTools | None:
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    if prometheus and promtool:
        return PrometheusTools(Path(prometheus), Path(promtool))
    return None


@pytest.fixture(scope="session")
def prometheus_tools() -> PrometheusTools:
    """Paths of ``prometheus`` and ``promtool``; installs Debian's package once when they are missing."""
    found = _which()
    if found is not None:
        return found
    result = subprocess.run(
        ["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=900, check=False
    )
    found = _which()
    if found is None:
        pytest.skip(
            "Prometheus/promtool could not be installed from Debian's `prometheus` package "
            f"(install_prometheus.sh exited {result.returncode}): {result.stderr.strip()[-500:]}"
        )
    return found
