"""SIGTERM, observed from outside a real ``polyhead serve`` process: health goes NOT_SERVING first, then
new calls are refused, then in-flight calls drain, and the process exits 0 (the order the README states).
Health watches, endless calls, are ended by the server so they do not hold the drain.

``--shutdown-delay`` holds the first step open long enough to see it: during it health already says
NOT_SERVING while new calls are still answered, which is what lets load balancers move away first.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_helpers import act, observations

from polyhead.server.process import ServeProcess
from polyhead.tensors import to_proto
from polyhead.v1 import policy_pb2, policy_pb2_grpc

SHUTDOWN_DELAY_S = 1.5


class Timeline:
    """Events seen by the clients, each with the monotonic time it was observed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.events: list[tuple[float, str, Any]] = []

    def add(self, kind: str, value: Any = None) -> float:
        now = time.monotonic()
        with self._lock:
            self.events.append((now, kind, value))
        return now

    def times(self, kind: str, value: Any = None) -> list[float]:
        with self._lock:
            return [t for t, k, v in self.events if k == kind and (value is None or v == value)]


def test_sigterm_health_first_then_refuse_then_drain(tiny_bundle: Path, tmp_path: Path) -> None:
    log_path = tmp_path / "serve.log"
    server = ServeProcess(
        tiny_bundle,
        args=("--no-watch", "--shutdown-delay", str(SHUTDOWN_DELAY_S), "--grace-period", "20"),
        log_path=log_path,
    )
    timeline = Timeline()
    end_stream = threading.Event()
    failures: list[BaseException] = []

    def watch_health() -> None:
        """A health watcher that never hangs up: the server must end the call itself (with OK) once it
        refuses new calls, or the watch would hold the drain for the whole grace period."""
        with grpc.insecure_channel(server.target) as channel:
            try:
                for reply in health_pb2_grpc.HealthStub(channel).Watch(
                    health_pb2.HealthCheckRequest(service="")
                ):
                    if not timeline.times("health", reply.status):  # a repeated status is allowed
                        timeline.add("health", reply.status)
                timeline.add("health watch ended")
            except grpc.RpcError as exc:
                failures.append(exc)

    def session() -> None:
        """An in-flight call: one ActStream that keeps stepping through the whole shutdown."""

        def steps() -> Any:
            step = 0
            while not end_stream.is_set():
                yield policy_pb2.StepRequest(
                    task_id="cartpole",
                    episode_id="drain",
                    observation=to_proto(observations("cartpole", seed=step)),
                    feedback=policy_pb2.Feedback(reward=1.0) if step else None,
                )
                step += 1
                time.sleep(0.02)

        try:
            with grpc.insecure_channel(server.target) as channel:
                for _ in policy_pb2_grpc.PolicyServiceStub(channel).ActStream(steps(), timeout=60):
                    timeline.add("stream step")
            timeline.add("stream ended")
        except grpc.RpcError as exc:
            failures.append(exc)

    threads = [threading.Thread(target=watch_health), threading.Thread(target=session)]
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while not (timeline.times("health") and len(timeline.times("stream step")) >= 5):
            assert time.monotonic() < deadline, (timeline.events, failures)
            time.sleep(0.02)
        first_health = next(v for _, k, v in timeline.events if k == "health")
        assert first_health == health_pb2.HealthCheckResponse.SERVING

        sigterm = timeline.add("SIGTERM")
        server.proc.terminate()
        # New calls, one after another, until the server refuses one; then a few more.
        refused_at = None
        with grpc.insecure_channel(server.target) as channel:
            stub = policy_pb2_grpc.PolicyServiceStub(channel)
            while time.monotonic() < sigterm + SHUTDOWN_DELAY_S + 15:
                started = time.monotonic()
                try:
                    act(stub, "cartpole", observations("cartpole"))
                    timeline.add("new call answered", started)
                except grpc.RpcError as exc:
                    timeline.add("new call refused", (started, exc.code()))
                    if refused_at is None:
                        refused_at = started
                if refused_at is not None and time.monotonic() > refused_at + 0.5:
                    break
                time.sleep(0.02)
        assert refused_at is not None, "the server never refused a new call"
        end_stream.set()
        for thread in threads:
            thread.join(timeout=60)
        status = server.proc.wait(timeout=60)
    finally:
        end_stream.set()
        server.stop()
    log = log_path.read_text()
    assert status == 0, log[-3000:]
    assert failures == [], (failures, log[-3000:])

    (not_serving,) = timeline.times("health", health_pb2.HealthCheckResponse.NOT_SERVING)
    answered_starts = [v for t, k, v in timeline.events if k == "new call answered"]
    refusals = [v for t, k, v in timeline.events if k == "new call refused"]
    # 1. Health first: calls that started after the client saw NOT_SERVING were still answered.
    assert not_serving > sigterm
    assert any(start > not_serving for start in answered_starts), (not_serving, answered_starts)
    # 2. Then new calls refused, with UNAVAILABLE (a retryable status), and none answered after that.
    assert {code for _, code in refusals} == {grpc.StatusCode.UNAVAILABLE}
    assert refused_at > not_serving
    assert all(start < refused_at for start in answered_starts)
    # 3. Then the in-flight call drains: the stream kept being answered after refusals began, and ended OK.
    assert any(t > refused_at for t in timeline.times("stream step"))
    assert timeline.times("stream ended")
    # The watch was ended by the server, with OK, after health had said NOT_SERVING.
    (watch_ended,) = timeline.times("health watch ended")
    assert watch_ended > not_serving
    # The server logs the same order.
    marks = [log.index(f"shutdown {n}/3") for n in (1, 2, 3)]
    assert marks == sorted(marks), log[-3000:]
