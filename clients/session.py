"""A simulator session over ``ActStream``: one message per step both reports the last reward and asks
for the next action.

Typical loop (sync; the asyncio twin :class:`AsyncSession` is the same with ``await``)::

    with client.session("cartpole") as s:
        obs, _ = env.reset(seed=0)
        reward, terminated, truncated = None, False, False
        for _ in range(1000):
            action = s.step(obs, reward)               # reward of the previous action (None at start)
            obs, reward, terminated, truncated, _ = env.step(action)
            if terminated or truncated:
                s.end_episode(reward, terminated=terminated, truncated=truncated)
                obs, _ = env.reset()
                reward = None

Contract: each reward given to :meth:`step` / :meth:`end_episode` / :meth:`record` is sent exactly once,
attached to the episode it belongs to. ``step(obs, reward, terminated=True)`` also ends the episode (final
feedback) and then asks for ``obs`` as the first step of a new one, so ``obs`` must then be the reset
observation. ``record(reward)`` keeps the latest action's outcome until the next ``step`` (or sends it at
once as final feedback when terminated/truncated); leaving the ``with`` block sends a recorded, unsent
outcome as the open episode's final feedback (a truncation) and closes the stream. An episode whose last
outcome was never given stays open on the server until its TTL.

A stream is ordered and stateful, so a failed stream is not retried: the step raises the typed error and
the session is closed; open a new one.
"""

from __future__ import annotations

import queue
import threading
import uuid
from collections.abc import Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
import numpy.typing as npt

from polyhead.clients.codec import StepResult, step_request, step_result
from polyhead.clients.errors import Cancelled, PolicyClientError, from_rpc_error
from polyhead.v1 import policy_pb2

# End of a grpc.aio stream (grpc-stubs does not declare it).
_EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]

if TYPE_CHECKING:
    from polyhead.clients.catalog import RemoteTask


class _Episodes:
    """Episode bookkeeping shared by the sync and asyncio sessions (no I/O)."""

    def __init__(self, task_id: str, prefix: str | None) -> None:
        self.task_id = task_id
        self.prefix = prefix or uuid.uuid4().hex[:12]
        self.count = 0
        self.episode_id: str | None = None
        self.steps = 0
        self.episode_return = 0.0
        self.returns: list[float] = []
        self.head_versions: set[int] = set()

    def current(self) -> str:
        if self.episode_id is None:
            self.episode_id = f"{self.prefix}-{self.count}"
            self.count += 1
            self.steps = 0
            self.episode_return = 0.0
        return self.episode_id

    def add_reward(self, reward: float | None) -> None:
        if reward is not None:
            self.episode_return += float(reward)

    def finish(self) -> None:
        self.returns.append(self.episode_return)
        self.episode_id = None


class _SessionBase:
    def __init__(
        self,
        task: RemoteTask,
        *,
        deterministic: bool,
        seed: int | None,
        return_log_prob: bool,
        return_value: bool,
        episode_prefix: str | None,
    ) -> None:
        self.task = task
        self.deterministic = deterministic
        self.seed = seed
        self.return_log_prob = return_log_prob
        self.return_value = return_value
        self._episodes = _Episodes(task.task_id, episode_prefix)
        self.last: StepResult | None = None
        self.closed = False
        # The latest action's reward, recorded with record() and not yet sent.
        self._pending: float | None = None

    @property
    def episode_id(self) -> str | None:
        """The open episode's id, or None between episodes."""
        return self._episodes.episode_id

    @property
    def episode_returns(self) -> list[float]:
        """Sum of the reported rewards of every finished episode, in order."""
        return list(self._episodes.returns)

    @property
    def head_versions(self) -> set[int]:
        return set(self._episodes.head_versions)

    def _check_record(self, reward: float) -> float:
        if self._episodes.episode_id is None:
            raise ValueError("no open episode: step(obs) first, then record() the action's outcome")
        if self._pending is not None:
            raise ValueError("the latest action's outcome was already recorded")
        return float(reward)

    def _take(self, reward: float | None) -> float | None:
        """The reward to send now: the one given, or the recorded one (never both: each is sent once)."""
        if self._pending is None:
            return reward
        if reward is not None:
            raise ValueError("reward given twice for the same action: to record() and again here")
        pending, self._pending = self._pending, None
        return pending

    def _seed(self) -> int | None:
        # A distinct, reproducible seed per step: the same session seed replays the same samples.
        if self.seed is None:
            return None
        return (self.seed * 1_000_003 + self._episodes.count * 10_007 + self._episodes.steps) % (1 << 63)

    def _final_request(
        self,
        reward: float | None,
        terminated: bool,
        truncated: bool,
        final_observation: npt.ArrayLike | None = None,
    ) -> policy_pb2.StepRequest:
        episodes = self._episodes
        if episodes.episode_id is None:
            raise ValueError("no open episode to end")
        episodes.add_reward(reward)
        cut = truncated or not terminated
        return step_request(
            self.task.task_id,
            episodes.episode_id,
            None,
            reward=0.0 if reward is None else reward,
            terminated=terminated,
            truncated=cut,
            # A terminated episode has no future to bootstrap; only a cut one needs its last state.
            final_observation=final_observation if cut and not terminated else None,
        )

    def _step_request(self, obs: npt.ArrayLike, reward: float | None) -> policy_pb2.StepRequest:
        episodes = self._episodes
        fresh = episodes.episode_id is None
        episode_id = episodes.current()
        if not fresh:
            episodes.add_reward(reward)
        return step_request(
            self.task.task_id,
            episode_id,
            obs,
            # A reward given with an episode's first observation belongs to no action: dropped by contract.
            reward=None if fresh else reward,
            deterministic=self.deterministic,
            seed=self._seed(),
            return_log_prob=self.return_log_prob,
            return_value=self.return_value,
        )

    def _accept(self, resp: policy_pb2.StepResponse) -> StepResult:
        result = step_result(resp, self.task)
        self._episodes.steps += 1
        self._episodes.head_versions.add(result.head_version)
        self.last = result
        return result


class Session(_SessionBase):
    """A synchronous ``ActStream`` session (see the module docstring). Built by ``PolicyClient.session``."""

    def __init__(
        self,
        stub: Any,
        task: RemoteTask,
        *,
        metadata: tuple[tuple[str, str], ...] = (),
        timeout: float | None = None,
        deterministic: bool = False,
        seed: int | None = None,
        return_log_prob: bool = False,
        return_value: bool = False,
        episode_prefix: str | None = None,
    ) -> None:
        super().__init__(
            task,
            deterministic=deterministic,
            seed=seed,
            return_log_prob=return_log_prob,
            return_value=return_value,
            episode_prefix=episode_prefix,
        )
        self._requests: queue.Queue[policy_pb2.StepRequest | None] = queue.Queue()
        self._lock = threading.Lock()
        self._call = stub.ActStream(self._request_iter(), metadata=metadata, timeout=timeout)
        self._responses: Iterator[policy_pb2.StepResponse] = iter(self._call)

    def _request_iter(self) -> Iterator[policy_pb2.StepRequest]:
        while (req := self._requests.get()) is not None:
            yield req

    def _roundtrip(self, req: policy_pb2.StepRequest) -> StepResult:
        if self.closed:
            raise Cancelled("the session is closed")
        with self._lock:
            self._requests.put(req)
            try:
                resp = next(self._responses)
            except grpc.RpcError as exc:
                self._abort()
                raise from_rpc_error(exc) from None
            except StopIteration:
                self._abort()
                raise Cancelled("the server closed the stream") from None
        return self._accept(resp)

    def step(
        self,
        obs: npt.ArrayLike,
        reward: float | None = None,
        terminated: bool = False,
        truncated: bool = False,
    ) -> Any:
        """Report the previous action's outcome and return the action for ``obs`` (decoded into the task's
        action space). With ``terminated``/``truncated`` the open episode ends first and ``obs`` starts a
        new one. ``reward`` may instead have been given to :meth:`record`."""
        if (terminated or truncated) and self._episodes.episode_id is not None:
            self.end_episode(reward, terminated=terminated, truncated=truncated)
            reward = None
        result = self._roundtrip(self._step_request(obs, self._take(reward)))
        return result.action

    def record(self, reward: float, terminated: bool = False, truncated: bool = False) -> None:
        """Record the latest action's outcome: it goes out with the next :meth:`step`, or at once as the
        episode's final feedback when ``terminated``/``truncated``, or on :meth:`close` (as a truncation)."""
        reward = self._check_record(reward)
        if terminated or truncated:
            self.end_episode(reward, terminated=terminated, truncated=truncated)
        else:
            self._pending = reward

    def end_episode(
        self,
        reward: float | None = None,
        *,
        terminated: bool = True,
        truncated: bool = False,
        final_observation: npt.ArrayLike | None = None,
    ) -> float:
        """Send the last action's reward (given here or recorded) with the episode's end; returns the
        episode's return. On truncation pass ``final_observation`` (the observation ``env.step`` returned):
        the updater bootstraps from it (without it, it has to approximate)."""
        self._roundtrip(self._final_request(self._take(reward), terminated, truncated, final_observation))
        self._episodes.finish()
        return self._episodes.returns[-1]

    def _abort(self) -> None:
        self.closed = True
        self._requests.put(None)
        self._call.cancel()

    def close(self) -> None:
        """Send a recorded, unsent outcome as the open episode's final feedback (a truncation), then
        half-close the stream and wait for the server to finish it."""
        if self.closed:
            return
        if self._pending is not None and self._episodes.episode_id is not None:
            self.end_episode(truncated=True, terminated=False)
        self.closed = True
        self._requests.put(None)
        try:
            for _ in self._responses:
                pass
        except grpc.RpcError as exc:
            err = from_rpc_error(exc)
            if not isinstance(err, Cancelled):
                raise err from None

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None and not isinstance(exc, PolicyClientError):
            self._abort()
        elif not self.closed:
            self.close()


class AsyncSession(_SessionBase):
    """The asyncio ``ActStream`` session. Built by ``AsyncPolicyClient.session``; use ``async with``."""

    def __init__(
        self,
        stub: Any,
        task: RemoteTask,
        *,
        metadata: tuple[tuple[str, str], ...] = (),
        timeout: float | None = None,
        deterministic: bool = False,
        seed: int | None = None,
        return_log_prob: bool = False,
        return_value: bool = False,
        episode_prefix: str | None = None,
    ) -> None:
        super().__init__(
            task,
            deterministic=deterministic,
            seed=seed,
            return_log_prob=return_log_prob,
            return_value=return_value,
            episode_prefix=episode_prefix,
        )
        self._call: Any = stub.ActStream(metadata=metadata, timeout=timeout)

    async def _roundtrip(self, req: policy_pb2.StepRequest) -> StepResult:
        if self.closed:
            raise Cancelled("the session is closed")
        try:
            await self._call.write(req)
            resp = await self._call.read()
        except grpc.RpcError as exc:
            self.closed = True
            raise from_rpc_error(exc) from None
        if resp is _EOF:
            self.closed = True
            raise Cancelled("the server closed the stream")
        return self._accept(resp)

    async def step_result(
        self,
        obs: npt.ArrayLike,
        reward: float | None = None,
        terminated: bool = False,
        truncated: bool = False,
    ) -> StepResult:
        """Like :meth:`step` but returns the whole decoded answer (head version, step index, ...)."""
        if (terminated or truncated) and self._episodes.episode_id is not None:
            await self.end_episode(reward, terminated=terminated, truncated=truncated)
            reward = None
        return await self._roundtrip(self._step_request(obs, self._take(reward)))

    async def step(
        self,
        obs: npt.ArrayLike,
        reward: float | None = None,
        terminated: bool = False,
        truncated: bool = False,
    ) -> Any:
        return (await self.step_result(obs, reward, terminated, truncated)).action

    async def record(self, reward: float, terminated: bool = False, truncated: bool = False) -> None:
        reward = self._check_record(reward)
        if terminated or truncated:
            await self.end_episode(reward, terminated=terminated, truncated=truncated)
        else:
            self._pending = reward

    async def end_episode(
        self,
        reward: float | None = None,
        *,
        terminated: bool = True,
        truncated: bool = False,
        final_observation: npt.ArrayLike | None = None,
    ) -> float:
        await self._roundtrip(
            self._final_request(self._take(reward), terminated, truncated, final_observation)
        )
        self._episodes.finish()
        return self._episodes.returns[-1]

    async def close(self) -> None:
        if self.closed:
            return
        if self._pending is not None and self._episodes.episode_id is not None:
            await self.end_episode(truncated=True, terminated=False)
        self.closed = True
        try:
            await self._call.done_writing()
            while await self._call.read() is not _EOF:
                pass
        except grpc.RpcError as exc:
            err = from_rpc_error(exc)
            if not isinstance(err, Cancelled):
                raise err from None

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None and not isinstance(exc, PolicyClientError):
            self.closed = True
            self._call.cancel()
        elif not self.closed:
            await self.close()
