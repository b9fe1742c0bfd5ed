"""Every client mistake gets its documented status code (never INTERNAL), and the server keeps serving."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest
from server_helpers import act, observations

from polyhead.errors import DeadlineExpired, Overloaded
from polyhead.server.actions import Sampling
from polyhead.server.app import BackgroundServer
from polyhead.tensors import to_proto
from polyhead.v1 import policy_pb2, types_pb2

BAD_OBSERVATIONS: dict[str, Any] = {
    "wrong shape": np.zeros(5, np.float32),
    "wrong batch shape": np.zeros((3, 5), np.float32),
    "nan": np.array([0.0, np.nan, 0.0, 0.0], np.float32),
    "inf": np.array([[0.0, 0.0, np.inf, 0.0]], np.float32),
    "empty batch": np.zeros((0, 4), np.float32),
}


@pytest.mark.parametrize("case", sorted(BAD_OBSERVATIONS))
def test_bad_observations_are_invalid_argument(policy_stub: Any, case: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        act(policy_stub, "cartpole", BAD_OBSERVATIONS[case])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    if "shape" in case:
        assert "[4]" in (err.value.details() or "")  # names the expected shape
    assert act(policy_stub, "cartpole", observations("cartpole")).head_version == 1


def test_malformed_tensors_are_invalid_argument(policy_stub: Any) -> None:
    cases = [
        types_pb2.Tensor(dtype=types_pb2.DTYPE_FLOAT32, shape=[4], raw_data=b"\x00" * 15),  # short data
        types_pb2.Tensor(dtype=99, shape=[4], raw_data=b"\x00" * 16),  # unknown dtype  # type: ignore[arg-type]
        types_pb2.Tensor(shape=[4], float_data=[1.0, 2.0]),  # too few values
        types_pb2.Tensor(shape=[-1, 4], float_data=[1.0] * 4),  # negative dimension
        types_pb2.Tensor(shape=[1 << 20, 1 << 20]),  # absurd shape without data
        types_pb2.Tensor(),  # no observation at all
    ]
    for tensor in cases:
        with pytest.raises(grpc.RpcError) as err:
            policy_stub.Act(policy_pb2.ActRequest(task_id="cartpole", observations=tensor))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, tensor
    assert act(policy_stub, "cartpole", observations("cartpole")).head_version == 1


def test_unknown_task_is_not_found(policy_stub: Any) -> None:
    with pytest.raises(grpc.RpcError) as err:
        act(policy_stub, "no-such-task", observations("cartpole"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "cartpole" in (err.value.details() or "")  # lists the served tasks


def test_batch_over_the_limit_is_invalid_argument(server_settings: Callable[..., Any]) -> None:
    with (
        BackgroundServer(server_settings(max_batch_size=8, watch_bundle=False)) as srv,
        grpc.insecure_channel(srv.target) as ch,
    ):
        from polyhead.v1 import policy_pb2_grpc

        stub = policy_pb2_grpc.PolicyServiceStub(ch)
        assert len(from_actions(act(stub, "cartpole", observations("cartpole", 8)))) == 8
        with pytest.raises(grpc.RpcError) as err:
            act(stub, "cartpole", observations("cartpole", 9))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "8" in (err.value.details() or "")


def from_actions(response: policy_pb2.ActResponse) -> Any:
    from polyhead.tensors import from_proto

    return from_proto(response.actions)


def test_mismatched_episode_ids_are_invalid_argument(policy_stub: Any) -> None:
    with pytest.raises(grpc.RpcError) as err:
        act(policy_stub, "cartpole", observations("cartpole", 3), episode_ids=["a", "b"])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_act_stream_errors(policy_stub: Any) -> None:
    def one(request: policy_pb2.StepRequest) -> grpc.StatusCode:
        with pytest.raises(grpc.RpcError) as err:
            list(policy_stub.ActStream(iter([request])))
        return err.value.code()

    obs = to_proto(observations("cartpole"))
    assert (
        one(policy_pb2.StepRequest(task_id="nope", episode_id="e", observation=obs))
        == grpc.StatusCode.NOT_FOUND
    )
    assert (
        one(policy_pb2.StepRequest(task_id="cartpole", observation=obs)) == grpc.StatusCode.INVALID_ARGUMENT
    )
    batch = to_proto(observations("cartpole", 2))
    assert one(policy_pb2.StepRequest(task_id="cartpole", episode_id="e", observation=batch)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    assert one(policy_pb2.StepRequest(task_id="cartpole", episode_id="e")) == grpc.StatusCode.INVALID_ARGUMENT


# --- the batcher's own refusals (real trunk, real heads, no gRPC) ----------------------------------------
def test_queue_full_is_overloaded_with_the_limit(server_settings: Callable[..., Any]) -> None:
    with BackgroundServer(server_settings(max_queue_size=2, inline_max_rows=0, watch_bundle=False)) as srv:
        batcher = srv.running.batcher
        head = srv.registry.resolve("cartpole")
        obs = observations("cartpole", 64)

        async def burst() -> list[BaseException | None]:
            calls = [batcher.act(head, obs, Sampling(64, True, None)) for _ in range(6)]
            results = await asyncio.gather(*calls, return_exceptions=True)
            return [r if isinstance(r, BaseException) else None for r in results]

        outcomes = asyncio.run_coroutine_threadsafe(burst(), srv.loop).result(timeout=30)
        refused = [o for o in outcomes if isinstance(o, Overloaded)]
        assert refused, outcomes
        assert "2 requests" in str(refused[0])
        assert sum(o is None for o in outcomes) >= 2


def test_calls_beyond_max_inflight_calls_are_overloaded_with_the_limit(server: Any) -> None:
    """A batcher on the server's real trunk and head, with the in-progress count set by the test: at most
    ``max_in_progress`` calls (the asking one included) are admitted; 0 means no limit."""
    from prometheus_client import CollectorRegistry

    from polyhead.server.batcher import Batcher
    from polyhead.server.metrics import ServerMetrics

    head = server.registry.resolve("cartpole")
    obs = observations("cartpole", 1)
    metrics = ServerMetrics(CollectorRegistry())

    async def ask(running: int, limit: int) -> BaseException | None:
        batcher = Batcher(
            server.registry.trunk,
            metrics=metrics,
            max_batch_size=8,
            max_queue_delay_s=0.0,
            max_queue_size=8,
            in_progress=lambda: running,
            max_in_progress=limit,
        )
        try:
            await batcher.act(head, obs, Sampling(1, True, None))
        except Overloaded as exc:
            return exc
        finally:
            batcher.shutdown()
        return None

    def outcome(running: int, limit: int) -> BaseException | None:
        return asyncio.run_coroutine_threadsafe(ask(running, limit), server.loop).result(timeout=30)

    assert outcome(4, 4) is None
    refused = outcome(5, 4)
    assert isinstance(refused, Overloaded)
    assert "5 Act calls in progress" in str(refused) and "max_inflight_calls (4)" in str(refused)
    assert outcome(1_000_000, 0) is None
    assert metrics.rejected.labels(task="cartpole").value == 1


def test_expired_requests_are_dropped_before_inference(server: Any) -> None:
    import time

    batcher = server.running.batcher
    head = server.registry.resolve("cartpole")
    before = batcher.stats

    async def late() -> BaseException | None:
        try:
            await batcher.act(
                head, observations("cartpole", 1), Sampling(1, True, None), deadline=time.monotonic() - 1
            )
        except DeadlineExpired as exc:
            return exc
        return None

    assert isinstance(
        asyncio.run_coroutine_threadsafe(late(), server.loop).result(timeout=30), DeadlineExpired
    )
    assert batcher.stats.requests == before.requests  # never reached a pass


def test_malformed_request_bytes_are_invalid_argument(server: Any, policy_stub: Any) -> None:
    garbage = b"\xff\xff\xff\xff not a protobuf"
    with grpc.insecure_channel(server.target) as ch, grpc.insecure_channel(server.admin_target) as admin:
        calls: list[Callable[[], Any]] = [
            lambda: ch.unary_unary("/polyhead.v1.PolicyService/Act")(garbage),
            lambda: ch.unary_unary("/polyhead.v1.PolicyService/ListTasks")(garbage),
            lambda: list(ch.stream_stream("/polyhead.v1.PolicyService/ActStream")(iter([garbage]))),
            lambda: ch.stream_unary("/polyhead.v1.PolicyService/ReportExperience")(iter([garbage])),
            lambda: admin.unary_unary("/polyhead.v1.HeadAdmin/LoadHead")(garbage),
            lambda: admin.unary_unary("/polyhead.v1.HeadAdmin/SetActiveVersion")(garbage),
            lambda: list(admin.unary_stream("/polyhead.v1.HeadAdmin/StreamExperience")(garbage)),
        ]
        for call in calls:
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    import time

    deadline = time.monotonic() + 5
    while server.running.batcher._pending() != 0:  # the in-flight count is released (just after the status)
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert server.running.batcher._in_progress() == 0  # and so is the count of running handlers
    assert act(policy_stub, "cartpole", observations("cartpole")).head_version == 1


def test_inflight_count_forgets_calls_that_never_reached_their_handler() -> None:
    from polyhead.server.inflight import InflightCounter

    counter = InflightCounter(stale_after_s=0.0)
    counter.accept()  # accepted, then cancelled before its message was read: no handler ever starts
    counter.accept()
    counter.enter()
    assert counter.handling() == 1
    time.sleep(0.001)
    assert counter() == 1  # the stale acceptance is forgotten; the running handler still counts
    counter.leave()
    assert counter() == 0
    fresh = InflightCounter()
    fresh.accept()  # accepted, then refused while draining before its handler started
    assert fresh() == 1
    fresh.forget()
    assert fresh() == 0
