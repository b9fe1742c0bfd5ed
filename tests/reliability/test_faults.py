"""Faults: a server killed (-9) under load and restarted, the updater's publish across a server restart, an
updater killed mid-publish, and one of two round-robin replicas stopped (SIGTERM, then kill -9) under load.

Every server is a real ``polyhead serve`` subprocess on the shared bundle directory (ports from its ready
file). Retrying clients are :class:`polyhead.clients.policy_client.PolicyClient`; a second client without
retries
counts the calls that needed one. Windows and counts are printed (run with ``-s`` to see them) and
recorded in docs/reliability.md.
"""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from reliability_helpers import Replica, admin_target, start_serve, started, stop, stop_all, wait_until

from polyhead.bundle import Bundle
from polyhead.clients.errors import PolicyClientError
from polyhead.clients.policy_client import PolicyClient
from polyhead.clients.retry import NO_RETRY, RetryPolicy
from polyhead.server.app import BackgroundServer
from polyhead.server.settings import ServerSettings
from polyhead.trainer.updater.control import ServerControl

TASK = "cartpole"
OBS = np.zeros(4, np.float32)
#: Enough patience to ride out a restart of a few seconds (the deadline bounds it).
PATIENT = RetryPolicy(max_attempts=1000, initial_backoff_s=0.05, max_backoff_s=0.25)


@dataclass
class Load:
    """Act calls until stopped: a retrying client (must never fail) and a no-retry probe (what needed one)."""

    target: str
    ok: list[tuple[float, int]] = field(default_factory=list)  # (completion time, head version)
    failures: list[str] = field(default_factory=list)
    first_attempt_failures: list[float] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with (
            PolicyClient(self.target, timeout=30.0, retry=PATIENT) as client,
            PolicyClient(self.target, timeout=5.0, retry=NO_RETRY) as probe,
        ):
            while not self.stop.is_set():
                try:
                    result = probe.act(TASK, OBS, deterministic=True)
                    self.ok.append((time.monotonic(), result.head_version))
                    time.sleep(0.002)
                    continue
                except PolicyClientError:
                    self.first_attempt_failures.append(time.monotonic())
                try:
                    result = client.act(TASK, OBS, deterministic=True)
                    self.ok.append((time.monotonic(), result.head_version))
                except PolicyClientError as exc:
                    self.failures.append(repr(exc))

    def longest_gap(self, after: float) -> float:
        times = [t for t, _ in self.ok if t >= after - 5.0]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


@pytest.fixture
def loads() -> Iterator[list[tuple[Load, threading.Thread]]]:
    running: list[tuple[Load, threading.Thread]] = []
    yield running
    for load, thread in running:
        load.stop.set()
        thread.join(timeout=60)


def start_load(loads: list[tuple[Load, threading.Thread]], target: str, n: int = 2) -> list[Load]:
    out = []
    for _ in range(n):
        load = Load(target)
        thread = threading.Thread(target=load.run, daemon=True)
        thread.start()
        loads.append((load, thread))
        out.append(load)
    return out


@pytest.fixture
def servers() -> Iterator[list[Replica]]:
    running: list[Replica] = []
    yield running
    stop_all(running)


def leave_half_written_heads(bundle_dir: Path, task: str) -> tuple[Path, Path]:
    """What a killed writer (or a partial copy) leaves: a temp dir, and a version dir without head.json."""
    bundle = Bundle.open(bundle_dir)
    onnx = bundle.head(task).read_onnx()
    top = max(bundle.versions(task))
    temp = bundle.task_dir(task) / f".v{top + 1}-abc123"
    temp.mkdir()
    (temp / "head.onnx").write_bytes(onnx[: len(onnx) // 2])
    partial = bundle.task_dir(task) / str(top + 2)
    partial.mkdir()
    (partial / "head.onnx").write_bytes(onnx)
    return temp, partial


@pytest.mark.slow
def test_kill9_under_load_then_restart(
    bundle_copy: Path, tmp_path: Path, servers: list[Replica], loads: list[tuple[Load, threading.Thread]]
) -> None:
    server = started(start_serve(bundle_copy, tmp_path, "a", "--watch-interval", "0.3"))
    servers.append(server)
    port, admin_port = server.port, server.admin_port  # type: ignore[attr-defined]
    running = start_load(loads, server.target)
    assert wait_until(lambda: all(len(load.ok) > 20 for load in running), 30)

    # Publish version 2 (the updater's way: Bundle.write_head), then leave half-written heads behind.
    bundle = Bundle.open(bundle_copy)
    head = bundle.head(TASK)
    assert (
        bundle.write_head(head.meta, head.read_onnx(), encoder=head.read_encoder(), activate=True).version
        == 2
    )
    assert wait_until(lambda: all(load.ok[-1][1] == 2 for load in running), 15), "v2 not served"
    _temp, partial = leave_half_written_heads(bundle_copy, TASK)

    killed_at = time.monotonic()
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(timeout=10)
    restart = started(
        start_serve(
            bundle_copy,
            tmp_path,
            "a-restarted",
            "--watch-interval",
            "0.3",
            "--admin-port",
            str(admin_port),
            "--port",
            str(port),
        )
    )
    servers.append(restart)
    ready_after = time.monotonic() - killed_at
    assert wait_until(lambda: all(load.ok[-1][0] > killed_at + ready_after for load in running), 30)
    time.sleep(1.0)

    # Publishing goes on after the restart: the stray version directory neither blocks the next versions
    # nor is ever loaded.
    bundle = Bundle.open(bundle_copy)
    versions = [
        bundle.write_head(head.meta, head.read_onnx(), encoder=head.read_encoder(), activate=True).version
        for _ in range(2)
    ]
    assert int(partial.name) not in versions, (versions, partial.name)
    published = versions[-1]
    assert wait_until(lambda: all(load.ok[-1][1] == published for load in running), 15), "not served"
    for load, thread in loads:
        load.stop.set()
        thread.join(timeout=60)

    with PolicyClient(restart.target, timeout=10) as client:
        assert client.list_tasks(refresh=True)[TASK].active_version == published
    control = ServerControl(admin_target(restart))
    try:
        loaded, active = control.versions(TASK)
    finally:
        control.close()
    assert active == published
    assert int(partial.name) not in loaded, loaded  # the version without head.json is never loaded
    assert set(versions) <= set(loaded)
    failures = [f for load in running for f in load.failures]
    window = max(load.longest_gap(killed_at) for load in running)
    first_fail = [t - killed_at for load in running for t in load.first_attempt_failures]
    print(
        f"\nkill -9 under load: restarted server ready {ready_after:.2f} s after the kill; "
        f"longest gap between successful calls {window:.2f} s; {len(first_fail)} first attempts failed (from "
        f"{min(first_fail, default=0):.2f} to {max(first_fail, default=0):.2f} s after the kill); "
        f"{len(failures)} failed calls with retries; "
        f"{sum(len(load.ok) for load in running)} calls served"
    )
    assert not failures, failures[:3]
    assert all(0 <= t <= window + ready_after + 1.0 for t in first_fail), "errors outside the restart window"
    assert window < ready_after + 5.0
    assert "Traceback" not in restart.log_path.read_text()


def test_updater_publish_rides_out_a_server_restart(
    bundle_copy: Path, tmp_path: Path, servers: list[Replica]
) -> None:
    """The updater's LoadHead, sent while its server is down, succeeds once the server is back (bounded
    retries on UNAVAILABLE in polyhead.trainer.updater.control.ServerControl)."""
    server = started(start_serve(bundle_copy, tmp_path, "s", "--no-watch"))
    servers.append(server)
    port, admin_port = server.port, server.admin_port  # type: ignore[attr-defined]
    bundle = Bundle.open(bundle_copy)
    current = bundle.head(TASK)
    record = bundle.write_head(
        current.meta, current.read_onnx(), encoder=current.read_encoder(), activate=False
    )
    head_json = (record.path / "head.json").read_text()
    onnx = (record.path / "head.onnx").read_bytes()
    control = ServerControl(admin_target(server))
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(timeout=10)
    outcome: dict[str, Any] = {}

    def publish() -> None:
        started_at = time.monotonic()
        try:
            outcome["active"] = control.load(
                TASK, record.version, onnx, head_json, encoder=record.read_encoder(), activate=True
            )
        except Exception as exc:  # recorded and asserted on below
            outcome["error"] = exc
        outcome["seconds"] = time.monotonic() - started_at

    thread = threading.Thread(target=publish, daemon=True)
    thread.start()
    time.sleep(1.0)  # the server is down for at least this long while LoadHead retries
    servers.append(
        started(
            start_serve(
                bundle_copy,
                tmp_path,
                "s2",
                "--no-watch",
                "--port",
                str(port),
                "--admin-port",
                str(admin_port),
            )
        )
    )
    thread.join(timeout=60)
    control.close()
    print(f"\nupdater LoadHead across a restart: {outcome}")
    assert "error" not in outcome, outcome
    assert outcome["active"] == record.version


def adapt_command(bundle: Path, spec: Path) -> list[str]:
    return [
        sys.executable, "-m", "polyhead", "adapt", "--bundle", str(bundle), "--task-spec", str(spec),
        "--source", "local", "--total-steps", "1024", "--eval-episodes", "2", "--exporter", "torchscript",
        "--no-progress", "--json",
    ]  # fmt: skip


def bundle_is_consistent(bundle_dir: Path) -> dict[str, list[int]]:
    """Bundle.open verifies the trunk; every complete head opens with its sha256 verified and loads in
    onnxruntime. Returns the versions per task."""
    import onnxruntime as ort

    bundle = Bundle.open(bundle_dir)
    out = {}
    for task in bundle.task_ids():
        out[task] = bundle.versions(task)
        for version in out[task]:
            ort.InferenceSession(bundle.head(task, version).read_onnx(), providers=["CPUExecutionProvider"])
        if out[task]:
            bundle.head(task)  # the active pointer names a complete version
    return out


@pytest.mark.slow
def test_updater_killed_mid_publish_leaves_a_consistent_bundle_and_resumes(
    bundle_copy: Path, tmp_path: Path
) -> None:
    spec = tmp_path / "task.toml"
    spec.write_text('[[task]]\nid = "cartpole-long"\nenv = "CartPole-v1"\nattrs = { length = 0.8 }\n')
    task_dir = bundle_copy / "heads" / "cartpole-long"
    log = (tmp_path / "adapt-1.log").open("wb")
    process = subprocess.Popen(adapt_command(bundle_copy, spec), stdout=log, stderr=subprocess.STDOUT)
    seen = ""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        entries = sorted(p.name for p in task_dir.iterdir()) if task_dir.is_dir() else []
        if entries:  # the first write of the publish step has started: kill now
            process.send_signal(signal.SIGKILL)
            seen = ",".join(entries)
            break
        time.sleep(0.001)
    process.wait(timeout=30)
    log.close()
    assert seen, f"the updater never started publishing:\n{(tmp_path / 'adapt-1.log').read_text()[-3000:]}"
    left = sorted(p.name for p in task_dir.iterdir())
    before = bundle_is_consistent(bundle_copy)
    first = before.get("cartpole-long", [])
    # A server started on the bundle now serves every complete head and nothing half-written.
    settings = ServerSettings(bundle=bundle_copy, host="127.0.0.1", port=0, admin_port=0, metrics_port=None)
    with BackgroundServer(settings) as srv:
        served = {task: sorted(entry.versions) for task, entry in srv.registry.tasks.items()}
    assert served == {task: [max(v)] for task, v in before.items() if v}, (served, before)

    result = subprocess.run(
        adapt_command(bundle_copy, spec), capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    after = bundle_is_consistent(bundle_copy)
    print(
        f"\nupdater killed with {seen!r} in the task dir (left {left!r}); complete versions after the kill "
        f"{first}; after the restarted run {after['cartpole-long']}; "
        f"published by the restarted run {summary['versions_published']}"
    )
    # The restarted run resumes: its versions come after what the killed run completed, which it keeps.
    assert after["cartpole-long"][: len(first)] == first
    assert len(after["cartpole-long"]) > len(first)
    assert min(after["cartpole-long"][len(first) :]) > max(first, default=0)
    assert summary["versions_published"] >= 1
    for task in ("cartpole", "acrobot", "cartpole-continuous"):
        assert after[task] == before[task]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_one_of_two_replicas_stops_under_load(
    bundle_copy: Path,
    tmp_path: Path,
    servers: list[Replica],
    loads: list[tuple[Load, threading.Thread]],
    how: str,
) -> None:
    pair = [start_serve(bundle_copy, tmp_path, f"r{i}", "--no-watch", metrics=False) for i in range(2)]
    servers.extend(pair)
    for replica in pair:
        started(replica)
    running = start_load(loads, ",".join(r.target for r in pair), n=3)
    assert wait_until(lambda: all(len(load.ok) > 50 for load in running), 30)
    stopped_at = time.monotonic()
    code = stop(pair[0], signal.SIGTERM if how == "SIGTERM" else signal.SIGKILL)
    served_before = sum(len(load.ok) for load in running)
    assert wait_until(lambda: sum(len(load.ok) for load in running) > served_before + 300, 30)
    for load, thread in loads:
        load.stop.set()
        thread.join(timeout=60)
    failures = [f for load in running for f in load.failures]
    retried = [t - stopped_at for load in running for t in load.first_attempt_failures]
    gap = max(load.longest_gap(stopped_at) for load in running)
    print(
        f"\n{how} one of two replicas under load (exit status {code}): {len(failures)} failed calls, "
        f"{len(retried)} calls needed a retry, longest gap between successful calls {gap:.3f} s, "
        f"{sum(len(load.ok) for load in running)} calls served"
    )
    assert not failures, failures[:3]
    # Calls needed a retry only around the stop (connections to the stopped replica failing over), never
    # once the survivor carries the load.
    assert all(-1.0 <= t <= 10.0 for t in retried), sorted(retried)[-5:]
    if how == "SIGTERM":
        assert code == 0
