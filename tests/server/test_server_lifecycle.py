"""The bundle watch follows what an updater publishes; SIGTERM drains in-flight calls and exits 0."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_helpers import act, actions_of, new_head_version, observations

from polyhead.bundle import Bundle, HeadMeta
from polyhead.server.app import BackgroundServer
from polyhead.tensors import to_proto
from polyhead.v1 import admin_pb2, admin_pb2_grpc, policy_pb2, policy_pb2_grpc

REPO = Path(__file__).resolve().parents[2]


def _wait_for(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_watch_loads_and_activates_a_published_version(
    server_settings: Callable[..., Any], bundle_copy: Path
) -> None:
    with (
        BackgroundServer(server_settings(bundle=bundle_copy)) as srv,
        grpc.insecure_channel(srv.target) as ch,
    ):
        stub = policy_pb2_grpc.PolicyServiceStub(ch)
        obs = observations("cartpole", 128, seed=2)
        v1 = actions_of(act(stub, "cartpole", obs))
        onnx, head_json = new_head_version(bundle_copy, "cartpole", seed=4)
        bundle = Bundle.open(bundle_copy)
        # Staged first (no pointer change): loaded, not served.
        bundle.write_head(
            HeadMeta.from_json_text(head_json),
            onnx,
            encoder=Bundle.open(bundle_copy).head("cartpole", 1).read_encoder(),
            activate=False,
        )
        _wait_for(lambda: 2 in srv.registry.tasks["cartpole"].versions)
        assert act(stub, "cartpole", obs).head_version == 1
        # The updater moves the pointer: every replica follows.
        bundle.set_active_version("cartpole", 2)
        _wait_for(lambda: act(stub, "cartpole", obs).head_version == 2)
        assert not np.array_equal(actions_of(act(stub, "cartpole", obs)), v1)
        with grpc.insecure_channel(srv.admin_target) as ach:
            heads = admin_pb2_grpc.HeadAdminStub(ach).ListHeads(
                admin_pb2.ListHeadsRequest(task_id="cartpole")
            )
        assert [(h.version, h.active, h.source) for h in heads.heads] == [
            (1, False, "bundle"),
            (2, True, "watch"),
        ]
        # A published version the server cannot load is counted and the serving version stays.
        bad = HeadMeta.from_json_text(head_json)
        bundle.write_head(
            bad,
            b"garbage",
            encoder=Bundle.open(bundle_copy).head("cartpole", 1).read_encoder(),
            activate=True,
        )
        _wait_for(
            lambda: (
                srv.running.metrics.head_load_failures.labels(task="cartpole", reason="CorruptHead").value
                >= 1
            )
        )
        assert act(stub, "cartpole", obs).head_version == 2


class _RollbackDuringRead(Bundle):
    """A real bundle on which, the first time the watch reads ``task``'s pointer, an updater rolls back to
    ``to`` right after the read: it moves the pointer on disk, then activates ``to`` on the server."""

    _rollback: tuple[Any, str, int] | None = None

    def arm(self, registry: Any, task: str, to: int) -> None:
        self._rollback = (registry, task, to)

    def active_version(self, task_id: str) -> int:
        seen = super().active_version(task_id)
        if self._rollback is not None and self._rollback[1] == task_id:
            (registry, task, to), self._rollback = self._rollback, None
            self.set_active_version(task, to)
            registry.set_active(task, to)
        return seen


def test_a_stale_bundle_pointer_never_undoes_a_later_activation(
    server_settings: Callable[..., Any], bundle_copy: Path
) -> None:
    """The updater publishes v2 (pointer 2, server 2) and rolls back to v1 (pointer 1, then server 1)
    between the watch's read of the pointer and its swap: the watch must not serve the stale 2."""
    from polyhead.server.watch import BundleWatcher

    with BackgroundServer(server_settings(bundle=bundle_copy, watch_bundle=False)) as srv:
        registry = srv.registry
        onnx, head_json = new_head_version(bundle_copy, "cartpole", seed=4)
        racing = _RollbackDuringRead.open(bundle_copy)
        registry.bundle = racing
        watcher = BundleWatcher(registry, interval_s=60.0)  # polled by hand, below
        racing.write_head(
            HeadMeta.from_json_text(head_json),
            onnx,
            encoder=Bundle.open(bundle_copy).head("cartpole", 1).read_encoder(),
            activate=True,
        )
        registry.load_from_bundle("cartpole", 2, activate=True)
        racing.arm(registry, "cartpole", to=1)
        watcher.poll()
        assert racing._rollback is None, "the rollback did not run inside the watch's read"
        assert racing.active_version("cartpole") == 1
        assert registry.tasks["cartpole"].active == 1, "the watch swapped back to a stale pointer"
        watcher.poll()  # the next poll reads pointer 1 and leaves the server as it is
        assert registry.tasks["cartpole"].active == 1
        # The guard on its own: a swap that is no longer wanted changes nothing.
        assert registry.set_active_if("cartpole", 2, lambda: False) is None
        assert registry.tasks["cartpole"].active == 1


def test_the_watch_and_an_upload_of_the_same_version_both_succeed(
    server_settings: Callable[..., Any], bundle_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The updater writes a version to the bundle and uploads the same bytes; the watch loads it from disk
    while the upload warms up. Whichever lands first, neither load fails and the upload activates.

    Both loads are held at their warm-up until both are there, so they always overlap."""
    from polyhead.server.runtime import HeadRuntime

    warm_up = HeadRuntime.warm_up
    both_warming = threading.Barrier(2, timeout=30)

    def overlapping_warm_up(self: HeadRuntime, *args: Any, **kwargs: Any) -> None:
        both_warming.wait()
        warm_up(self, *args, **kwargs)

    with BackgroundServer(server_settings(bundle=bundle_copy, watch_bundle=False)) as srv:
        registry = srv.registry
        onnx, head_json = new_head_version(bundle_copy, "cartpole", seed=4)
        bundle = Bundle.open(bundle_copy)
        monkeypatch.setattr(HeadRuntime, "warm_up", overlapping_warm_up)
        for _ in range(4):
            record = bundle.write_head(
                HeadMeta.from_json_text(head_json),
                onnx,
                encoder=Bundle.open(bundle_copy).head("cartpole", 1).read_encoder(),
                activate=False,
            )
            version = record.version
            errors: list[BaseException] = []

            def attempt(load: Callable[[], Any], errors: list[BaseException] = errors) -> None:
                try:
                    load()
                except BaseException as exc:  # collected, asserted below
                    errors.append(exc)

            loads = [
                lambda v=version: registry.load_from_bundle("cartpole", v, activate=False, source="watch"),
                lambda v=version: registry.load_from_bytes(
                    "cartpole", onnx, head_json, version=v, activate=True
                ),
            ]
            threads = [threading.Thread(target=attempt, args=(load,)) for load in loads]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert errors == [], errors
            assert registry.tasks["cartpole"].active == version
            both_warming.reset()


def test_an_unreadable_bundle_is_counted_logged_once_and_serving_goes_on(
    server_settings: Callable[..., Any], bundle_copy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The bundle volume goes away under a running server (here: the directory is moved): every failed
    poll counts in polyhead_bundle_watch_failures_total, the error is logged once, the loaded heads keep
    serving, and the recovery is logged once when the bundle is back."""
    caplog.set_level(logging.INFO, logger="polyhead.server.watch")
    with (
        BackgroundServer(server_settings(bundle=bundle_copy, watch_interval_s=0.05)) as srv,
        grpc.insecure_channel(srv.target) as ch,
    ):
        stub = policy_pb2_grpc.PolicyServiceStub(ch)
        obs = observations("cartpole", 4, seed=1)
        failures = srv.running.metrics.watch_failures
        assert failures._value.get() == 0
        aside = bundle_copy.with_name(bundle_copy.name + "-unmounted")
        bundle_copy.rename(aside)
        try:
            _wait_for(lambda: failures._value.get() >= 5)
            assert srv.running.metrics.watch_failing._value.get() == 1
            assert act(stub, "cartpole", obs).head_version == 1  # still serving what is loaded
        finally:
            aside.rename(bundle_copy)
        _wait_for(lambda: any("readable again" in r.getMessage() for r in caplog.records))
        settled = failures._value.get()
        time.sleep(0.3)
        assert failures._value.get() == settled  # polls succeed again
        assert srv.running.metrics.watch_failing._value.get() == 0
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and "watch" in r.getMessage()]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert "manifest.json" in errors[0].getMessage() or "manifest.json" in str(errors[0].exc_info[1])


def _start_serve(bundle: Path, tmp: Path, *extra: str) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    ready = tmp / "ready.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "polyhead",
            "serve",
            "--bundle",
            str(bundle),
            "--port",
            "0",
            "--admin-port",
            "0",
            "--metrics-port",
            "0",
            "--ready-file",
            str(ready),
            "--json",
            *extra,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return proc, json.loads(ready.read_text())


def test_sigterm_drains_in_flight_calls_and_exits_zero(tiny_bundle: Path, tmp_path: Path) -> None:
    proc, info = _start_serve(tiny_bundle, tmp_path, "--grace-period", "20")
    target = f"127.0.0.1:{info['port']}"
    assert sorted(info["tasks"]) == ["acrobot", "cartpole", "cartpole-continuous"]
    steps = 60
    started = threading.Barrier(5)  # four sessions with answered steps, and the test
    sent_sigterm = threading.Event()
    results: list[tuple[int, BaseException | None]] = []

    def session(index: int) -> None:
        """A simulator session: a long-lived ActStream that keeps stepping after SIGTERM."""
        answered = threading.Event()

        def requests() -> Any:
            for step in range(steps):
                if step == 5:
                    # The call is in flight on the server once it has answered; then SIGTERM comes.
                    answered.wait(timeout=30)
                    started.wait(timeout=30)
                    sent_sigterm.wait(timeout=30)
                if step > 5:
                    time.sleep(0.01)
                yield policy_pb2.StepRequest(
                    task_id="cartpole",
                    episode_id=f"s{index}",
                    observation=to_proto(observations("cartpole")),
                    feedback=policy_pb2.Feedback(reward=1.0) if step else None,
                )

        got = 0
        try:
            with grpc.insecure_channel(target) as ch:
                for _ in policy_pb2_grpc.PolicyServiceStub(ch).ActStream(requests(), timeout=60):
                    got += 1
                    answered.set()
            results.append((got, None))
        except grpc.RpcError as exc:
            results.append((got, exc))

    threads = [threading.Thread(target=session, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    started.wait(timeout=30)
    with grpc.insecure_channel(target) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        proc.send_signal(signal.SIGTERM)
        # Health goes NOT_SERVING and new calls are refused while the sessions drain.
        _wait_for(lambda: _health_or_gone(health) != health_pb2.HealthCheckResponse.SERVING)
    sent_sigterm.set()
    with grpc.insecure_channel(target) as ch:
        try:
            act(policy_pb2_grpc.PolicyServiceStub(ch), "cartpole", observations("cartpole"))
            refused = None
        except grpc.RpcError as exc:
            refused = exc.code()
    for t in threads:
        t.join(timeout=60)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()[-3000:]
    assert results == [(steps, None)] * 4, (results, err.decode()[-3000:])
    assert refused == grpc.StatusCode.UNAVAILABLE
    summary = json.loads(out.decode().strip().splitlines()[-1])
    assert summary["requests"] >= 4 * steps


def _health_or_gone(stub: Any) -> int:
    try:
        return int(stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status)
    except grpc.RpcError:
        return -1
