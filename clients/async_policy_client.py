"""The asyncio data-plane client (``grpc.aio``): the same API as :class:`~polyhead.clients.PolicyClient`,
awaited.

    async with AsyncPolicyClient("127.0.0.1:50051") as client:
        result = await client.act("cartpole", obs, deterministic=True)

One client per event loop: a ``grpc.aio`` channel belongs to the loop it was created on.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any

import grpc
import numpy.typing as npt

from polyhead.clients.catalog import RemoteTask, TaskCatalog
from polyhead.clients.channel import ChannelConfig, as_config
from polyhead.clients.codec import ActResult, act_request, act_result
from polyhead.clients.errors import Unavailable, from_rpc_error
from polyhead.clients.policy_client import DEFAULT_TIMEOUT_S, ReportSummary
from polyhead.clients.retry import RetryPolicy, acall_with_retry
from polyhead.clients.session import AsyncSession
from polyhead.v1 import policy_pb2, policy_pb2_grpc


class AsyncPolicyClient:
    """Non-blocking client for ``PolicyService`` and ``Diagnostics`` (see
    :class:`~polyhead.clients.PolicyClient`
    for the meaning of every argument and the errors raised)."""

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
        self._channel = self.config.aio_channel()
        self._stub: Any = policy_pb2_grpc.PolicyServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._diag: Any = policy_pb2_grpc.DiagnosticsStub(self._channel)  # type: ignore[no-untyped-call]
        self._metadata = self.config.metadata()
        self._catalog: TaskCatalog | None = None
        self._catalog_lock = asyncio.Lock()

    @property
    def stub(self) -> Any:
        """The raw ``PolicyService`` stub on this channel (the load generator sends prebuilt messages)."""
        return self._stub

    @property
    def diagnostics_stub(self) -> Any:
        return self._diag

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    async def _unary(self, method: Any, request: Any, timeout: float | None) -> Any:
        async def attempt(left: float | None) -> Any:
            return await method(
                request, timeout=left, metadata=self._metadata, wait_for_ready=self.wait_for_ready
            )

        return await acall_with_retry(
            attempt,
            policy=self.retry,
            timeout=self.timeout if timeout is None else timeout,
            rng=self._rng,
        )

    async def list_tasks(self, *, refresh: bool = False, timeout: float | None = None) -> TaskCatalog:
        async with self._catalog_lock:
            if self._catalog is None or refresh:
                resp = await self._unary(self._stub.ListTasks, policy_pb2.ListTasksRequest(), timeout)
                self._catalog = TaskCatalog.from_proto(resp)
            return self._catalog

    async def task(self, task_id: str) -> RemoteTask:
        catalog = await self.list_tasks()
        if task_id not in catalog:
            catalog = await self.list_tasks(refresh=True)
        return catalog[task_id]

    async def act(
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
        task = await self.task(task_id)
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
        return act_result(await self._unary(self._stub.Act, req, timeout), task)

    async def session(
        self,
        task_id: str,
        *,
        deterministic: bool = False,
        seed: int | None = None,
        return_log_prob: bool = False,
        return_value: bool = False,
        episode_prefix: str | None = None,
        timeout: float | None = None,
    ) -> AsyncSession:
        """``async with await client.session(task) as s: action = await s.step(obs, reward)``."""
        return AsyncSession(
            self._stub,
            await self.task(task_id),
            metadata=self._metadata,
            timeout=timeout,
            deterministic=deterministic,
            seed=seed,
            return_log_prob=return_log_prob,
            return_value=return_value,
            episode_prefix=episode_prefix,
        )

    async def report_experience(
        self, reports: AsyncIterator[policy_pb2.ExperienceReport], *, timeout: float | None = None
    ) -> ReportSummary:
        """Stream reports from an async iterator until it ends; not retried (see the sync client)."""
        try:
            resp = await self._stub.ReportExperience(reports, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return ReportSummary(resp.accepted, resp.dropped, resp.episodes_completed)

    async def echo(self, payload: bytes = b"", *, timeout: float | None = None) -> bytes:
        resp = await self._unary(self._diag.Echo, policy_pb2.EchoRequest(payload=payload), timeout)
        return bytes(resp.payload)

    async def wait_ready(self, timeout: float = 10.0) -> None:
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout)
        except TimeoutError:
            raise Unavailable(f"no server answered at {self.config.target} within {timeout}s") from None

    async def close(self) -> None:
        await self._channel.close(None)

    async def __aenter__(self) -> AsyncPolicyClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
