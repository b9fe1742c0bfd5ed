"""Helpers of the reliability tests: subprocess servers, /proc readings, metrics scrapes, test certificates,
and the count of property-based cases (printed in the terminal summary by this folder's conftest).

Subprocess servers reuse the deploy tests' :class:`Replica` and :func:`wait_ready` (tests/deploy/
test_replicas.py); only the command line differs (metrics on, extra flags, a chosen environment).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc

from tests.deploy.test_replicas import Replica, wait_ready

__all__ = ["CASES", "CLIENT_MISTAKE_CODES", "OUTCOMES", "Replica", "wait_ready"]

#: Property-based cases run in this session, by test (printed by conftest.pytest_terminal_summary).
CASES: Counter[str] = Counter()
#: How those cases ended, by status code name.
OUTCOMES: Counter[str] = Counter()

#: Codes a client mistake may get. INTERNAL and UNKNOWN are server bugs; UNAVAILABLE would mean the
#: server (or its connection) went away.
CLIENT_MISTAKE_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)


def start_serve(
    bundle: Path,
    workdir: Path,
    name: str,
    *flags: str,
    env: Mapping[str, str] | None = None,
    metrics: bool = True,
    log_level: str | None = None,
) -> Replica:
    """``polyhead serve`` on free ports in its own process (stdout and stderr to ``workdir/<name>.log``)."""
    ready = workdir / f"{name}.ready.json"
    ready.unlink(missing_ok=True)
    log_path = workdir / f"{name}.log"
    argv = [sys.executable, "-m", "polyhead", "serve", "--bundle", str(bundle), "--port", "0"]
    argv += ["--admin-port", "0", "--ready-file", str(ready)]
    argv += ["--metrics-port", "0"] if metrics else ["--no-metrics"]
    if log_level is not None:
        argv += ["--log-level", log_level]
    argv += list(flags)
    environment = {
        **os.environ,
        "POLYHEAD_HOST": "127.0.0.1",
        "POLYHEAD_METRICS_HOST": "127.0.0.1",
        "POLYHEAD_GRACE_PERIOD_S": "2",
        **(env or {}),
    }
    with log_path.open("ab") as log:
        process = subprocess.Popen(argv, env=environment, stdout=log, stderr=subprocess.STDOUT)
    return Replica(process=process, ready_file=ready, log_path=log_path)


def started(replica: Replica, timeout: float = 90.0) -> Replica:
    """Waits for the ready file; also reads the admin and metrics ports into attributes."""
    import json

    wait_ready(replica, timeout=timeout)
    info = json.loads(replica.ready_file.read_text())
    replica.admin_port = info.get("admin_port")  # type: ignore[attr-defined]
    replica.metrics_port = info.get("metrics_port")  # type: ignore[attr-defined]
    return replica


def admin_target(replica: Replica) -> str:
    return f"127.0.0.1:{replica.admin_port}"  # type: ignore[attr-defined]


def stop(replica: Replica, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
    """Signals the process (if alive) and waits; kill -9 when it does not exit in time. Returns its status."""
    if replica.process.poll() is None:
        replica.process.send_signal(sig)
    try:
        return replica.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        replica.process.kill()
        return replica.process.wait(timeout=10)


def stop_all(replicas: Sequence[Replica]) -> None:
    for replica in replicas:
        stop(replica)


def rss_kib(pid: int) -> int:
    """Resident set size of a live process, from /proc/<pid>/status (KiB)."""
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+)\s+kB", text, re.MULTILINE)
    assert match is not None, text
    return int(match.group(1))


def scrape(metrics_port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
        return str(resp.read().decode())


def metric_value(text: str, name: str, labels: Mapping[str, str] | None = None) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when there is none)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        series, _, label_text = head.partition("{")
        if series != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', label_text))
        if all(found.get(k) == v for k, v in (labels or {}).items()):
            total += float(value)
    return total


def wait_until(predicate: object, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(interval)
    return False
