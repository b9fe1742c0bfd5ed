"""Typed errors carry the server's status and message; retries only on retryable codes, within the
deadline."""

from __future__ import annotations

import random
import socket
import time

import grpc
import numpy as np
import pytest
from clients_helpers import ADMIN_TOKEN

from polyhead.clients import (
    AdminClient,
    DeadlineExceeded,
    InvalidRequest,
    Overloaded,
    PolicyClient,
    RetryPolicy,
    TaskNotFound,
    Unauthenticated,
    Unavailable,
)
from polyhead.clients.errors import RETRYABLE_CODES, STATUS_ERRORS, PolicyClientError
from polyhead.clients.retry import call_with_retry
from polyhead.server.app import BackgroundServer


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_status_table_retries_only_unavailable_and_resource_exhausted() -> None:
    assert {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED} == RETRYABLE_CODES
    for code, cls in STATUS_ERRORS.items():
        assert issubclass(cls, PolicyClientError)
        assert cls.retryable == (code in RETRYABLE_CODES)


def test_invalid_observation_carries_the_servers_message(clients_server: BackgroundServer) -> None:
    with PolicyClient(clients_server.target) as client:
        with pytest.raises(InvalidRequest) as info:
            client.act("cartpole", np.zeros((2, 7), np.float32))
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "does not match the task's observation shape [4]" in info.value.details
        assert info.value.attempts == 1
        with pytest.raises(InvalidRequest, match="NaN"):
            client.act("cartpole", np.array([0.0, np.nan, 0.0, 0.0], np.float32))


def test_not_found_from_the_server_is_not_retried(clients_server: BackgroundServer) -> None:
    policy = RetryPolicy(max_attempts=5, initial_backoff_s=0.2, jitter=0.0)
    with (
        PolicyClient(clients_server.target, retry=policy, timeout=5.0) as client,
        pytest.raises(TaskNotFound) as info,
    ):
        client.act("cartpole", np.zeros(4, np.float32), version=99)
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert "99" in info.value.details
    assert info.value.attempts == 1  # one attempt: no retry, so no backoff sleep either


def test_unavailable_is_retried_until_the_deadline() -> None:
    policy = RetryPolicy(max_attempts=1000, initial_backoff_s=0.02, max_backoff_s=0.1)
    with PolicyClient(f"127.0.0.1:{_closed_port()}", retry=policy, timeout=1.0) as client:
        started = time.monotonic()
        with pytest.raises((DeadlineExceeded, Unavailable)) as info:
            client.echo(b"x")
        elapsed = time.monotonic() - started
    assert info.value.attempts > 2, "UNAVAILABLE must be retried"
    # Stops at the 1 s deadline (the upper bound leaves room for a loaded machine, not for another retry
    # round: without the deadline the 1,000 attempts would take ~100 s).
    assert 0.5 < elapsed < 3.0, f"retries must stop at the 1 s deadline, took {elapsed:.2f} s"
    assert "UNAVAILABLE" in str(info.value)


def test_unavailable_stops_after_max_attempts() -> None:
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.01)
    client = PolicyClient(f"127.0.0.1:{_closed_port()}", retry=policy, timeout=10.0)
    with client, pytest.raises(Unavailable) as info:
        client.echo()
    assert info.value.attempts == 3


class _Failure(grpc.RpcError):
    """What grpc raises for a failed call: an RpcError with code() and details()."""

    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return f"server said {self._code.name}"


def test_resource_exhausted_is_retried_with_backoff_then_succeeds() -> None:
    calls: list[float | None] = []
    sleeps: list[float] = []

    def attempt(left: float | None) -> str:
        calls.append(left)
        if len(calls) < 3:
            raise _Failure(grpc.StatusCode.RESOURCE_EXHAUSTED)
        return "ok"

    policy = RetryPolicy(max_attempts=5, initial_backoff_s=0.1, multiplier=2.0, jitter=0.0)
    result = call_with_retry(attempt, policy=policy, timeout=5.0, rng=random.Random(0), sleep=sleeps.append)
    assert result == "ok"
    assert sleeps == [0.1, 0.2]
    assert all(left is not None and 0 < left <= 5.0 for left in calls)


def test_exhausted_retries_raise_overloaded_and_other_codes_fail_at_once() -> None:
    policy = RetryPolicy(max_attempts=2, initial_backoff_s=0.0, jitter=0.0)

    def overloaded(_: float | None) -> None:
        raise _Failure(grpc.StatusCode.RESOURCE_EXHAUSTED)

    with pytest.raises(Overloaded) as info:
        call_with_retry(overloaded, policy=policy, timeout=None, sleep=lambda _: None)
    assert info.value.attempts == 2
    assert info.value.details == "server said RESOURCE_EXHAUSTED"

    for code in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
    ):
        count = 0

        def failing(_: float | None, code: grpc.StatusCode = code) -> None:
            nonlocal count
            count += 1
            raise _Failure(code)

        with pytest.raises(PolicyClientError) as err:
            call_with_retry(failing, policy=RetryPolicy(max_attempts=5), timeout=None, sleep=lambda _: None)
        assert count == 1
        assert err.value.code == code


def test_backoff_sleep_never_runs_past_the_deadline() -> None:
    sleeps: list[float] = []

    def unavailable(_: float | None) -> None:
        raise _Failure(grpc.StatusCode.UNAVAILABLE)

    policy = RetryPolicy(max_attempts=100, initial_backoff_s=0.3, max_backoff_s=0.3, jitter=0.0)
    with pytest.raises(DeadlineExceeded, match="last error UNAVAILABLE"):
        call_with_retry(
            unavailable, policy=policy, timeout=0.5, sleep=lambda s: (sleeps.append(s), time.sleep(s))
        )
    assert sleeps == [0.3]


def test_admin_token_is_required_and_sent(clients_server: BackgroundServer) -> None:
    admin_target = f"127.0.0.1:{clients_server.admin_port}"
    with AdminClient(admin_target) as anonymous:
        with pytest.raises(Unauthenticated) as info:
            anonymous.list_heads()
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    with AdminClient(admin_target, token="wrong") as wrong, pytest.raises(Unauthenticated):
        wrong.list_heads()
    with AdminClient(admin_target, token=ADMIN_TOKEN) as admin:
        heads = admin.list_heads()
        assert {h.task_id for h in heads} >= {"cartpole", "acrobot", "cartpole-continuous"}
        with pytest.raises(TaskNotFound):
            admin.set_active_version("cartpole", 42)
