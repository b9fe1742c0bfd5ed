"""The simulator runner: drive K gymnasium environments of a task through a policy server.

This is the engine behind ``polyhead simulate``, reusable in-process (the demo, the online updater's
remote mode): build a :class:`SimulationConfig`, call :func:`run_simulation` (or ``await``
:func:`arun_simulation` inside a running loop) and read the :class:`SimulationResult`.

Two ways to talk to the server:

* ``unary``: the K environments step in lockstep; each vector step is ONE batched ``Act`` call carrying
  every waiting observation, and each step goes back as a full transition (observation, raw action,
  log-prob, head version, reward) on one ``ReportExperience`` stream opened for the whole run;
* ``stream``: one ``ActStream`` session per environment, K concurrent sessions; each message carries the
  previous reward, and an episode's end is sent as final feedback.

Reproducibility: episode ``j`` (0-based, in order of starting) resets its environment with seed
``seed + j``. In deterministic mode its return depends only on that seed and the served head, so the
returns (listed by episode index) equal an in-process evaluation with the same seeds, whatever K and the
mode. Sampled runs pass a per-request seed derived from ``seed`` and are reproducible for the same K
and mode.

A request that fails after the client's retries is counted in ``failed_requests`` (by status code in
``errors``) and re-sent with the same observation; after ``max_consecutive_failures`` in a row the run
stops early (``completed`` is then False).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from polyhead.clients.async_policy_client import AsyncPolicyClient
from polyhead.clients.catalog import RemoteTask
from polyhead.clients.channel import ChannelConfig
from polyhead.clients.codec import ActResult, encode_observations
from polyhead.clients.errors import InvalidRequest, PolicyClientError
from polyhead.clients.policy_client import ReportSummary, experience_report
from polyhead.clients.retry import RetryPolicy
from polyhead.clients.session import AsyncSession
from polyhead.spaces import DiscreteSpec, space_from_gymnasium
from polyhead.taskspec import TaskSpec
from polyhead.tensors import to_proto
from polyhead.v1 import policy_pb2

Mode = Literal["unary", "stream"]
ProgressFn = Callable[["EpisodeRecord", int, int], None]


@dataclass(frozen=True)
class SimulationConfig:
    """What to run. ``task_spec`` overrides the served spec for building the environment (a user's own
    variant of a served task); its spaces must match the served task's."""

    task_id: str
    episodes: int = 10
    envs: int = 4
    deterministic: bool = False
    seed: int = 0
    mode: Mode = "unary"
    task_spec: TaskSpec | None = None
    #: Send rewards to the server (experience feed, episode-return metrics). Stream mode always does.
    report_rewards: bool = True
    #: Deadline of each request in seconds (retries included).
    request_timeout_s: float = 10.0
    max_consecutive_failures: int = 5

    @property
    def feeds_training(self) -> bool:
        """Whether the run's experience can train an online updater: only sampled actions train (the
        server marks deterministic steps and the updater leaves them out), and only reported ones."""
        return self.report_rewards and not self.deterministic

    def __post_init__(self) -> None:
        if self.episodes < 1:
            raise ValueError("episodes must be >= 1")
        if self.envs < 1:
            raise ValueError("envs must be >= 1")
        if self.mode not in ("unary", "stream"):
            raise ValueError(f"mode must be 'unary' or 'stream', got {self.mode!r}")


@dataclass(frozen=True)
class EpisodeRecord:
    index: int
    seed: int
    episode_return: float
    length: int
    head_versions: tuple[int, ...]


@dataclass
class SimulationResult:
    task_id: str
    mode: Mode
    episodes: list[EpisodeRecord]
    steps: int
    duration_s: float
    latencies_ms: list[float]
    failed_requests: int
    errors: dict[str, int]
    head_versions: list[int]
    completed: bool
    report: ReportSummary | None = None
    error_messages: list[str] = field(default_factory=list)
    feeds_training: bool = True

    @property
    def returns(self) -> list[float]:
        return [e.episode_return for e in self.episodes]

    def summary(self) -> dict[str, Any]:
        """The ``polyhead simulate --json`` line (documented keys first, extras after)."""
        returns = np.asarray(self.returns, dtype=np.float64)
        lat = np.asarray(self.latencies_ms, dtype=np.float64)
        return {
            "task": self.task_id,
            "episodes": len(self.episodes),
            "mean_return": float(returns.mean()) if returns.size else math.nan,
            "std_return": float(returns.std()) if returns.size else math.nan,
            "steps": self.steps,
            "actions_per_second": self.steps / self.duration_s if self.duration_s > 0 else math.nan,
            "latency_ms": {
                "p50": float(np.percentile(lat, 50)) if lat.size else math.nan,
                "p99": float(np.percentile(lat, 99)) if lat.size else math.nan,
            },
            "failed_requests": self.failed_requests,
            "head_versions": self.head_versions,
            "mode": self.mode,
            "returns": self.returns,
            "requests": len(self.latencies_ms),
            "errors": self.errors,
            "completed": self.completed,
            "duration_s": self.duration_s,
            "feeds_training": self.feeds_training,
            "reported": None
            if self.report is None
            else {
                "accepted": self.report.accepted,
                "dropped": self.report.dropped,
                "episodes_completed": self.report.episodes_completed,
            },
        }


def _make_env(spec: TaskSpec) -> Any:
    from polyhead.envs import make_env

    return make_env(spec)


def _check_spaces(env: Any, task: RemoteTask) -> None:
    obs_space = space_from_gymnasium(env.observation_space)
    act_space = space_from_gymnasium(env.action_space)
    if obs_space != task.observation_space or act_space != task.action_space:
        raise InvalidRequest(
            f"task {task.task_id}: the environment's spaces (observation {obs_space}, action {act_space}) "
            f"differ from the served task's (observation {task.observation_space}, "
            f"action {task.action_space})"
        )


def _env_action(action: Any, task: RemoteTask) -> Any:
    return int(action) if isinstance(task.action_space, DiscreteSpec) else np.asarray(action)


def _raw_actions(result: ActResult, task: RemoteTask) -> npt.NDArray[Any]:
    """The policy's raw actions (whose log-probs the server reports): Discrete index, Box pre-squash u."""
    space = task.action_space
    if isinstance(space, DiscreteSpec):
        return np.asarray(result.actions, dtype=np.int64).reshape(-1) - space.start
    if result.raw_actions is not None:
        return np.asarray(result.raw_actions, dtype=np.float32).reshape(len(result.actions), -1)
    return np.asarray(result.actions, dtype=np.float32).reshape(len(result.actions), -1)


class _Run:
    """Mutable state shared by the coroutines of one run."""

    def __init__(self, config: SimulationConfig, task: RemoteTask, progress: ProgressFn | None) -> None:
        self.config = config
        self.task = task
        self.progress = progress
        self.next_episode = 0
        self.records: list[EpisodeRecord] = []
        self.steps = 0
        self.latencies_ms: list[float] = []
        self.failed = 0
        self.errors: dict[str, int] = {}
        self.messages: list[str] = []
        self.consecutive_failures = 0
        self.aborted = False
        self.versions: set[int] = set()

    def claim_episode(self) -> int | None:
        if self.aborted or self.next_episode >= self.config.episodes:
            return None
        index = self.next_episode
        self.next_episode += 1
        return index

    def finish_episode(self, record: EpisodeRecord) -> None:
        self.records.append(record)
        if self.progress is not None:
            self.progress(record, len(self.records), self.config.episodes)

    def ok(self, started: float, version: int) -> None:
        self.latencies_ms.append((time.perf_counter() - started) * 1e3)
        self.versions.add(version)
        self.consecutive_failures = 0

    def fail(self, exc: PolicyClientError) -> None:
        self.failed += 1
        self.errors[exc.code.name] = self.errors.get(exc.code.name, 0) + 1
        if len(self.messages) < 10:
            self.messages.append(str(exc))
        self.consecutive_failures += 1
        if self.consecutive_failures >= self.config.max_consecutive_failures:
            self.aborted = True


@dataclass
class _Slot:
    """One environment of the unary lockstep loop and its open episode."""

    env: Any
    episode: int = -1
    obs: Any = None
    episode_return: float = 0.0
    length: int = 0
    versions: set[int] = field(default_factory=set)

    @property
    def episode_id(self) -> str:
        return f"ep-{self.episode}"


async def _unary_run(
    client: AsyncPolicyClient, run: _Run, envs: list[Any], prefix: str
) -> ReportSummary | None:
    cfg = run.config
    reports: asyncio.Queue[policy_pb2.ExperienceReport | None] = asyncio.Queue()

    async def report_stream() -> AsyncIterator[policy_pb2.ExperienceReport]:
        while (item := await reports.get()) is not None:
            yield item

    reporter = (
        asyncio.ensure_future(client.report_experience(report_stream(), timeout=None))
        if cfg.report_rewards
        else None
    )
    slots = [_Slot(env) for env in envs]

    def start(slot: _Slot) -> bool:
        index = run.claim_episode()
        if index is None:
            return False
        slot.episode, slot.episode_return, slot.length, slot.versions = index, 0.0, 0, set()
        slot.obs, _ = slot.env.reset(seed=cfg.seed + index)
        return True

    active = [s for s in slots if start(s)]
    request_no = 0
    try:
        while active and not run.aborted:
            obs = np.stack([np.asarray(s.obs) for s in active])
            started = time.perf_counter()
            try:
                result = await client.act(
                    cfg.task_id,
                    obs,
                    deterministic=cfg.deterministic,
                    seed=None if cfg.deterministic else (cfg.seed * 1_000_003 + request_no) % (1 << 63),
                    return_log_prob=cfg.report_rewards,
                    timeout=cfg.request_timeout_s,
                )
            except PolicyClientError as exc:
                run.fail(exc)
                continue
            finally:
                request_no += 1
            run.ok(started, result.head_version)
            still: list[_Slot] = []
            raw = _raw_actions(result, run.task)
            for i, (slot, action) in enumerate(zip(active, result.actions, strict=True)):
                slot_obs = slot.obs
                slot.obs, reward, terminated, truncated, _ = slot.env.step(_env_action(action, run.task))
                slot.episode_return += float(reward)
                slot.length += 1
                slot.versions.add(result.head_version)
                run.steps += 1
                done = bool(terminated or truncated)
                if cfg.report_rewards:
                    report = experience_report(
                        cfg.task_id,
                        f"{prefix}-{slot.episode_id}",
                        float(reward),
                        terminated=bool(terminated),
                        truncated=bool(truncated) and not terminated,
                    )
                    # A full transition, not a reward joined server-side with a recorded action: the
                    # next Act may overtake this report on the wire, and a transition needs no join.
                    report.observation.CopyFrom(encode_observations(slot_obs))
                    report.action.CopyFrom(to_proto(raw[i]))
                    report.log_prob = 0.0 if result.log_probs is None else float(result.log_probs[i])
                    report.head_version = result.head_version
                    report.step = slot.length - 1
                    # Mode actions are marked: the server records them, the updater never trains on them.
                    report.deterministic = cfg.deterministic
                    if truncated and not terminated:
                        # The state the time limit cut the episode in: the updater bootstraps from it.
                        report.final_observation.CopyFrom(encode_observations(slot.obs))
                    reports.put_nowait(report)
                if done:
                    run.finish_episode(
                        EpisodeRecord(
                            slot.episode,
                            cfg.seed + slot.episode,
                            slot.episode_return,
                            slot.length,
                            tuple(sorted(slot.versions)),
                        )
                    )
                    if start(slot):
                        still.append(slot)
                else:
                    still.append(slot)
            active = still
    finally:
        reports.put_nowait(None)
    if reporter is None:
        return None
    try:
        return await reporter
    except PolicyClientError as exc:
        run.fail(exc)
        return None


async def _stream_worker(client: AsyncPolicyClient, run: _Run, env: Any, prefix: str, worker: int) -> None:
    cfg = run.config
    session: AsyncSession | None = None
    reopened = 0
    try:
        while (index := run.claim_episode()) is not None:
            if session is None or session.closed:
                # A failed stream cannot be resumed (it is ordered and stateful): open a fresh one.
                session = await client.session(
                    cfg.task_id,
                    deterministic=cfg.deterministic,
                    seed=None
                    if cfg.deterministic
                    else (cfg.seed * 1_000_003 + worker * 1009 + reopened) % (1 << 63),
                    episode_prefix=f"{prefix}-w{worker}-{reopened}",
                )
                reopened += 1
            obs, _ = env.reset(seed=cfg.seed + index)
            reward: float | None = None
            episode_return, length, versions = 0.0, 0, set()
            while not run.aborted:
                started = time.perf_counter()
                try:
                    result = await session.step_result(obs, reward)
                except PolicyClientError as exc:
                    run.fail(exc)
                    if session.closed:
                        break
                    continue
                run.ok(started, result.head_version)
                versions.add(result.head_version)
                obs, r, terminated, truncated, _ = env.step(_env_action(result.action, run.task))
                reward = float(r)
                episode_return += reward
                length += 1
                run.steps += 1
                if terminated or truncated:
                    started = time.perf_counter()
                    try:
                        await session.end_episode(
                            reward,
                            terminated=bool(terminated),
                            truncated=bool(truncated) and not terminated,
                            final_observation=obs,
                        )
                        run.ok(started, result.head_version)
                    except PolicyClientError as exc:
                        run.fail(exc)
                    run.finish_episode(
                        EpisodeRecord(
                            index, cfg.seed + index, episode_return, length, tuple(sorted(versions))
                        )
                    )
                    break
    finally:
        if session is not None and not session.closed:
            await session.close()


async def arun_simulation(
    target: str | ChannelConfig | AsyncPolicyClient,
    config: SimulationConfig,
    *,
    progress: ProgressFn | None = None,
    retry: RetryPolicy | None = None,
) -> SimulationResult:
    """Run the simulation on the current event loop; see the module docstring for the contract."""
    own_client = not isinstance(target, AsyncPolicyClient)
    client = (
        AsyncPolicyClient(target, timeout=config.request_timeout_s, retry=retry)
        if not isinstance(target, AsyncPolicyClient)
        else target
    )
    envs: list[Any] = []
    try:
        task = await client.task(config.task_id)
        spec = config.task_spec or task.spec
        if spec is None:
            raise InvalidRequest(
                f"task {config.task_id}: the server's task spec cannot be built here; pass --task-spec"
            )
        envs = [_make_env(spec) for _ in range(min(config.envs, config.episodes))]
        _check_spaces(envs[0], task)
        run = _Run(config, task, progress)
        prefix = f"sim-{time.time_ns() % 10**12:x}"
        started = time.perf_counter()
        report: ReportSummary | None = None
        if config.mode == "unary":
            report = await _unary_run(client, run, envs, prefix)
        else:
            await asyncio.gather(*(_stream_worker(client, run, env, prefix, i) for i, env in enumerate(envs)))
        duration = time.perf_counter() - started
        records = sorted(run.records, key=lambda r: r.index)
        return SimulationResult(
            task_id=config.task_id,
            mode=config.mode,
            episodes=records,
            steps=run.steps,
            duration_s=duration,
            latencies_ms=run.latencies_ms,
            failed_requests=run.failed,
            errors=run.errors,
            head_versions=sorted(run.versions),
            completed=not run.aborted and len(records) == config.episodes,
            report=report,
            error_messages=run.messages,
            feeds_training=config.feeds_training,
        )
    finally:
        for env in envs:
            with contextlib.suppress(Exception):
                env.close()
        if own_client:
            await client.close()


def run_simulation(
    target: str | ChannelConfig,
    config: SimulationConfig,
    *,
    progress: ProgressFn | None = None,
    retry: RetryPolicy | None = None,
) -> SimulationResult:
    """Blocking entry point: runs :func:`arun_simulation` on a fresh event loop."""
    return asyncio.run(arun_simulation(target, config, progress=progress, retry=retry))
