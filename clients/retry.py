"""Retries with jittered exponential backoff, bounded by the call's deadline.

Only UNAVAILABLE and RESOURCE_EXHAUSTED are retried (the server never started the work, or refused it
before queueing). Everything else fails at once: retrying INVALID_ARGUMENT cannot succeed, and retrying
DEADLINE_EXCEEDED would overshoot the caller's own deadline. Each attempt gets the time left until the
overall deadline; no sleep runs past it. Backoff is "full jitter"
(https://aws.amazon.com/blogs/architecture/exponential-backoff-and-jitter/): a uniform draw below the
exponential cap, so many clients knocked off by one restart do not return in lockstep.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from polyhead.clients.errors import PolicyClientError, error_for, from_rpc_error

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to wait between attempts. ``max_attempts`` counts the first call."""

    max_attempts: int = 5
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    multiplier: float = 2.0
    #: 1.0: full jitter (uniform in [0, cap]); 0.0: the cap exactly (deterministic, for tests).
    jitter: float = 1.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError("jitter must be in [0, 1]")

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        cap = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
        return cap * (1.0 - self.jitter * rng.random())


NO_RETRY = RetryPolicy(max_attempts=1)


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


def _deadline_error(
    last: PolicyClientError | None, attempts: int, timeout: float | None
) -> PolicyClientError:
    why = f"; last error {last.code.name}: {last.details}" if last is not None else ""
    return error_for(
        grpc.StatusCode.DEADLINE_EXCEEDED, f"deadline of {timeout}s passed{why}", attempts=attempts
    )


def call_with_retry(
    fn: Callable[[float | None], T],
    *,
    policy: RetryPolicy,
    timeout: float | None,
    rng: random.Random | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run ``fn(time_left)`` until it succeeds, fails with a non-retryable code, runs out of attempts or
    the ``timeout`` (seconds, overall) passes. Raises the typed error of the last failure."""
    rng = rng or random.Random()
    deadline = None if timeout is None else time.monotonic() + timeout
    last: PolicyClientError | None = None
    for attempt in range(1, policy.max_attempts + 1):
        left = _remaining(deadline)
        if left is not None and left <= 0:
            raise _deadline_error(last, attempt - 1, timeout)
        try:
            return fn(left)
        except grpc.RpcError as exc:
            last = from_rpc_error(exc, attempts=attempt)
        if not last.retryable or attempt == policy.max_attempts:
            raise last
        pause = policy.backoff(attempt, rng)
        left = _remaining(deadline)
        if left is not None and pause >= left:
            raise _deadline_error(last, attempt, timeout)
        sleep(pause)
    raise AssertionError("unreachable")  # pragma: no cover


async def acall_with_retry(
    fn: Callable[[float | None], Awaitable[T]],
    *,
    policy: RetryPolicy,
    timeout: float | None,
    rng: random.Random | None = None,
) -> T:
    """The asyncio twin of :func:`call_with_retry`."""
    rng = rng or random.Random()
    deadline = None if timeout is None else time.monotonic() + timeout
    last: PolicyClientError | None = None
    for attempt in range(1, policy.max_attempts + 1):
        left = _remaining(deadline)
        if left is not None and left <= 0:
            raise _deadline_error(last, attempt - 1, timeout)
        try:
            return await fn(left)
        except grpc.RpcError as exc:
            last = from_rpc_error(exc, attempts=attempt)
        if not last.retryable or attempt == policy.max_attempts:
            raise last
        pause = policy.backoff(attempt, rng)
        left = _remaining(deadline)
        if left is not None and pause >= left:
            raise _deadline_error(last, attempt, timeout)
        await asyncio.sleep(pause)
    raise AssertionError("unreachable")  # pragma: no cover
