"""Several replicas on one bundle, as deploy/ runs them (a shared directory here, a ReadWriteMany volume in
Kubernetes): three `polyhead serve` processes on one bundle directory, a client balancing over them with
gRPC's round_robin, a head version published into the bundle; every replica must serve it within a bounded
time (measured and reported), and the client must see no failed call while it rolls out.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from polyhead.bundle import Bundle
from polyhead.clients.errors import PolicyClientError
from polyhead.clients.policy_client import PolicyClient

pytestmark = pytest.mark.service

REPLICAS = 3
TASK = "cartpole"
WATCH_INTERVAL_S = 0.5
# One poll interval, plus the new version's load and warm-up, plus slack for a shared 2-core machine.
ROLLOUT_BOUND_S = 10.0


@dataclass
class Replica:
    process: subprocess.Popen[bytes]
    ready_file: Path
    log_path: Path
    port: int = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


def start_replica(bundle: Path, workdir: Path, index: int) -> Replica:
    """`polyhead serve` in its own process, configured the way the deploy files do: POLYHEAD_* variables."""
    ready = workdir / f"ready-{index}.json"
    log_path = workdir / f"replica-{index}.log"
    env = {
        **os.environ,
        "POLYHEAD_HOST": "127.0.0.1",
        "POLYHEAD_WATCH_BUNDLE": "true",
        "POLYHEAD_WATCH_INTERVAL_S": str(WATCH_INTERVAL_S),
        "POLYHEAD_GRACE_PERIOD_S": "2",
    }
    argv = [sys.executable, "-m", "polyhead", "serve", "--bundle", str(bundle)]
    argv += ["--port", "0", "--admin-port", "0", "--no-metrics", "--ready-file", str(ready)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    return Replica(process=process, ready_file=ready, log_path=log_path)


def wait_ready(replica: Replica, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if replica.process.poll() is not None:
            raise AssertionError(f"replica exited early:\n{replica.log_path.read_text()[-3000:]}")
        if replica.ready_file.is_file():
            replica.port = int(json.loads(replica.ready_file.read_text())["port"])
            return
        time.sleep(0.1)
    raise AssertionError(f"replica not ready in {timeout} s:\n{replica.log_path.read_text()[-3000:]}")


@pytest.fixture
def replicas(bundle_copy: Path, tmp_path: Path) -> Iterator[list[Replica]]:
    started = [start_replica(bundle_copy, tmp_path, i) for i in range(REPLICAS)]
    try:
        for replica in started:
            wait_ready(replica)
        yield started
    finally:
        for replica in started:
            if replica.process.poll() is None:
                replica.process.send_signal(signal.SIGTERM)
        for replica in started:
            try:
                replica.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                replica.process.kill()
                replica.process.wait(timeout=5)


@dataclass
class BalancedLoad:
    """Act calls over all replicas until stopped; what each call returned."""

    versions: list[int] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self, target: str) -> None:
        observation = np.zeros(4, dtype=np.float32)
        with PolicyClient(target, timeout=5.0) as client:
            for _ in range(100_000):  # bounded; stopped by the test long before
                if self.stop.is_set():
                    return
                try:
                    self.versions.append(client.act(TASK, observation, deterministic=True).head_version)
                except PolicyClientError as exc:
                    self.failures.append(repr(exc))
                time.sleep(0.002)


def test_published_version_reaches_every_replica_without_failed_calls(
    replicas: list[Replica], bundle_copy: Path, record_property: pytest.RecordProperty
) -> None:
    load = BalancedLoad()
    balanced_target = ",".join(r.target for r in replicas)
    worker = threading.Thread(target=load.run, args=(balanced_target,), daemon=True)
    worker.start()
    time.sleep(1.0)  # traffic on every replica before the rollout

    bundle = Bundle.open(bundle_copy)
    current = bundle.head(TASK)
    published_at = time.monotonic()
    record = bundle.write_head(
        current.meta, current.read_onnx(), encoder=current.read_encoder(), activate=True
    )
    new_version = record.version
    assert new_version == current.version + 1

    reached_after: dict[str, float] = {}
    clients = {r.target: PolicyClient(r.target, timeout=5.0) for r in replicas}
    try:
        deadline = published_at + ROLLOUT_BOUND_S
        observation = np.zeros(4, dtype=np.float32)
        while len(reached_after) < len(replicas) and time.monotonic() < deadline:
            for target, client in clients.items():
                if target not in reached_after and client.act(TASK, observation).head_version == new_version:
                    reached_after[target] = time.monotonic() - published_at
            time.sleep(0.02)
    finally:
        for client in clients.values():
            client.close()
    time.sleep(0.5)  # the balanced client keeps going on the new version
    settled = len(load.versions)
    time.sleep(0.5)
    load.stop.set()
    worker.join(timeout=30)

    slowest = max(reached_after.values(), default=float("inf"))
    record_property("rollout_seconds_per_replica", json.dumps(reached_after))
    rounded = {t: round(s, 3) for t, s in reached_after.items()}
    print(
        f"\nversion {new_version} reached {len(reached_after)}/{REPLICAS} replicas; seconds after publish: "
        f"{rounded} (watch interval {WATCH_INTERVAL_S} s, shared 2-core machine)"
    )
    assert len(reached_after) == REPLICAS, f"only {reached_after} within {ROLLOUT_BOUND_S} s"
    assert slowest < ROLLOUT_BOUND_S
    assert not load.failures, load.failures[:5]
    assert set(load.versions) == {current.version, new_version}
    assert load.versions[settled:] and set(load.versions[settled:]) == {new_version}
    # Replicas drain and exit cleanly on SIGTERM, as a rolling restart needs.
    for replica in replicas:
        replica.process.send_signal(signal.SIGTERM)
    for replica in replicas:
        assert replica.process.wait(timeout=30) == 0, replica.log_path.read_text()[-2000:]
