"""The synchronous data-plane client: numpy in, numpy out.

    from polyhead.clients import PolicyClient
    with PolicyClient("127.0.0.1:50051", timeout=5.0) as client:
        catalog = client.list_tasks()                    # read once, cached
        result = client.act("cartpole", obs, deterministic=True)
        env.step(result.actions)

Unary calls are retried on UNAVAILABLE / RESOURCE_EXHAUSTED with jittered backoff (clients/retry.py)
and never past ``timeout``; every failure is raised as the typed error of clients/errors.py carrying the
server's status code and message. The client is safe to share between threads (gRPC channels are).
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc
import numpy.typing as npt

from polyhead.clients.catalog import RemoteTask, TaskCatalog
from polyhead.clients.channel import ChannelConfig, as_config
from polyhead.clients.codec import ActResult, act_request, act_result
from polyhead.clients.errors import from_rpc_error
from polyhead.clients.retry import RetryPolicy, call_with_retry
from polyhead.clients.session import Session
from polyhead.v1 import policy_pb2, policy_pb2_grpc

DEFAULT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ReportSummary:
    """The server's answer to a ``ReportExperience`` stream."""

    accepted: int
    dropped: int
    episodes_completed: int


def experience_report(
    task_id: str, episode_id: str, reward: float, *, terminated: bool = False, truncated: bool = False
) -> policy_pb2.ExperienceReport:
    """One reward for the latest action served to ``episode_id`` (joined server-side with that action)."""
    return policy_pb2.ExperienceReport(
        task_id=task_id,
        episode_id=episode_id,
        reward=float(reward),
        terminated=terminated,
        truncated=truncated,
    )


class PolicyClient:
    """Blocking client for ``PolicyService`` and ``Diagnostics``.

    ``target`` is ``HOST:PORT``, several comma-separated (client-side round robin), or a
    :class:`~polyhead.clients.channel.ChannelConfig` (TLS, client certificates, token, keepalive, message
    size).
    ``timeout`` is the default deadline of a call in seconds (retries included); None waits forever.
    """

    def __init__(
        self,
        target: str | ChannelConfig,
        *,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy | None = None,
        wait_for_ready: bool = False,
        **channel_options: Any,
    ) -> None:
        self.config = as_config(target, **channel_options)
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.wait_for_ready = wait_for_ready
        self._rng = random.Random()
        self._channel = self.config.sync_channel()
        self._stub: Any = policy_pb2_grpc.PolicyServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._diag: Any = policy_pb2_grpc.DiagnosticsStub(self._channel)  # type: ignore[no-untyped-call]
        self._metadata = self.config.metadata()
        self._catalog: TaskCatalog | None = None
        self._catalog_lock = threading.Lock()

    # --- plumbing ---------------------------------------------------------------------------------------
    def _unary(self, method: Any, request: Any, timeout: float | None) -> Any:
        def attempt(left: float | None) -> Any:
            return method(request, timeout=left, metadata=self._metadata, wait_for_ready=self.wait_for_ready)

        return call_with_retry(
            attempt,
            policy=self.retry,
            timeout=self.timeout if timeout is None else timeout,
            rng=self._rng,
        )

    # --- tasks ------------------------------------------------------------------------------------------
    def list_tasks(self, *, refresh: bool = False, timeout: float | None = None) -> TaskCatalog:
        """The served tasks, read once from ``ListTasks`` and cached (``refresh`` re-reads them)."""
        with self._catalog_lock:
            if self._catalog is None or refresh:
                resp = self._unary(self._stub.ListTasks, policy_pb2.ListTasksRequest(), timeout)
                self._catalog = TaskCatalog.from_proto(resp)
            return self._catalog

    def task(self, task_id: str) -> RemoteTask:
        """One served task (raises TaskNotFound); re-reads the list once if the task is not cached."""
        catalog = self.list_tasks()
        if task_id not in catalog:
            catalog = self.list_tasks(refresh=True)
        return catalog[task_id]

    # --- acting -----------------------------------------------------------------------------------------
    def act(
        self,
        task_id: str,
        observations: npt.ArrayLike,
        *,
        deterministic: bool = False,
        seed: int | None = None,
        version: int = 0,
        return_log_prob: bool = False,
        return_value: bool = False,
        episode_ids: Sequence[str] | None = None,
        steps: Sequence[int] | None = None,
        timeout: float | None = None,
    ) -> ActResult:
        """Actions for one observation (shape = the task's observation shape) or a batch ``[B, ...]``.

        Returns them decoded into the task's action space with the head version that produced them.
        ``episode_ids`` (one per observation) has the server record the actions for the experience feed;
        ``steps`` (each one's step index in its episode) makes a retried call record nothing twice.
        Raises TaskNotFound, InvalidRequest (shape, dtype, NaN, batch size; the server's message says
        which), Overloaded / Unavailable after retries, DeadlineExceeded.
        """
        task = self.task(task_id)
        req = act_request(
            task_id,
            observations,
            deterministic=deterministic,
            seed=seed,
            version=version,
            return_log_prob=return_log_prob,
            return_value=return_value,
            episode_ids=episode_ids,
            steps=steps,
        )
        return act_result(self._unary(self._stub.Act, req, timeout), task)

    def session(
        self,
        task_id: str,
        *,
        deterministic: bool = False,
        seed: int | None = None,
        return_log_prob: bool = False,
        return_value: bool = False,
        episode_prefix: str | None = None,
        timeout: float | None = None,
    ) -> Session:
        """An ``ActStream`` session for a simulator loop (see clients/session.py). ``timeout`` bounds the
        whole stream (None: no bound, the usual choice for a long-lived session)."""
        return Session(
            self._stub,
            self.task(task_id),
            metadata=self._metadata,
            timeout=timeout,
            deterministic=deterministic,
            seed=seed,
            return_log_prob=return_log_prob,
            return_value=return_value,
            episode_prefix=episode_prefix,
        )

    def remote_policy(self, task_id: str, **kwargs: Any) -> Any:
        """A callable ``policy(obs) -> action`` (see clients/remote_policy.py)."""
        from polyhead.clients.remote_policy import RemotePolicy

        return RemotePolicy(self, task_id, **kwargs)

    # --- experience and diagnostics ---------------------------------------------------------------------
    def report_experience(
        self, reports: Iterable[policy_pb2.ExperienceReport], *, timeout: float | None = None
    ) -> ReportSummary:
        """Stream rewards/terminations keyed by episode (see :func:`experience_report`). Not retried: a
        client stream cannot be replayed safely once some reports were accepted."""
        try:
            resp = self._stub.ReportExperience(
                iter(reports), timeout=self.timeout if timeout is None else timeout, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return ReportSummary(resp.accepted, resp.dropped, resp.episodes_completed)

    def echo(self, payload: bytes = b"", *, timeout: float | None = None) -> bytes:
        """``Diagnostics.Echo``: a round trip through the same server stack, no policy work."""
        resp = self._unary(self._diag.Echo, policy_pb2.EchoRequest(payload=payload), timeout)
        return bytes(resp.payload)

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the channel connects (raises Unavailable-typed DeadlineExceeded otherwise)."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            from polyhead.clients.errors import Unavailable

            raise Unavailable(f"no server answered at {self.config.target} within {timeout}s") from None

    # --- lifecycle --------------------------------------------------------------------------------------
    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
