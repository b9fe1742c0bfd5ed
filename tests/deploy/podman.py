"""Building polyhead's images with ``deploy/podman/build-images.sh`` and running containers with podman.

The build script installs podman and mmdebstrap with apt-get when they are missing (``--install-tools``, as
root: CI runs the suite as root on a fresh machine) and caches the Debian base and the wheelhouse under
``$POLYHEAD_IMAGE_CACHE`` (default ``~/.cache/polyhead-images``), so only the first build pays for them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from .deployfiles import DEPLOY

BUILD_SCRIPT = DEPLOY / "podman" / "build-images.sh"
CONTAINERS_CONF = DEPLOY / "podman" / "containers.conf"
# Cold: apt-get install podman + mmdebstrap, a Debian base, the wheelhouse, the image. A few minutes on a
# 2-core machine; the bound is there to turn a hang into a failure.
BUILD_TIMEOUT_S = 1800


def podman_env() -> dict[str, str]:
    """The environment podman runs with: deploy/podman/containers.conf unless CONTAINERS_CONF is set."""
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(CONTAINERS_CONF))
    return env


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``podman ARGS``; with ``check``, a failure raises with podman's stderr in the message."""
    result = subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, env=podman_env(), check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
    return result


@dataclass(frozen=True)
class BuiltImages:
    """What ``build-images.sh --json`` reports: image names and sizes, the base, seconds per step."""

    names: dict[str, str]
    size_bytes: dict[str, int]
    base: str
    seconds: dict[str, float]
    wall_s: float


def skip_unless_podman_can_be_had() -> None:
    """Skip where no podman can run here: not Linux, or podman absent and no root + apt-get to install it."""
    if sys.platform != "linux":
        pytest.skip(f"podman containers need Linux; this is {sys.platform}")
    if shutil.which("podman") and shutil.which("mmdebstrap"):
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(
            "podman and mmdebstrap are not installed and cannot be installed here (installing them needs "
            "root and apt-get): apt-get install podman mmdebstrap runc, then rerun"
        )


def build_images(images: Sequence[str]) -> BuiltImages:
    """Build (or reuse, through podman's layer cache and the script's caches) the named images."""
    skip_unless_podman_can_be_had()
    started = time.monotonic()
    result = subprocess.run(
        ["bash", str(BUILD_SCRIPT), "--install-tools", "--json", *images],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
        env={**podman_env(), "PYTHON": sys.executable},
        check=False,
    )
    assert result.returncode == 0, (
        f"build-images.sh {' '.join(images)} exited {result.returncode}:\n{result.stderr[-4000:]}"
    )
    summary: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return BuiltImages(
        names={k: v["name"] for k, v in summary["images"].items()},
        size_bytes={k: int(v["size_bytes"]) for k, v in summary["images"].items()},
        base=summary["base"],
        seconds={k: float(v) for k, v in summary["seconds"].items()},
        wall_s=time.monotonic() - started,
    )


def host_port(container: str, port: int) -> int:
    """The 127.0.0.1 port podman published for the container's ``port``."""
    published = podman("port", container, f"{port}/tcp").stdout.strip().splitlines()
    (address,) = (a for a in published if a.startswith("127.0.0.1:"))
    return int(address.rpartition(":")[2])
