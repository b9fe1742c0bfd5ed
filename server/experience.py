"""Experience assembly: served actions joined with reported rewards into episodes, for metrics and the
online updater.

An action served with an episode id (``Act`` with ``episode_ids``, every ``ActStream`` step) is recorded as
one of the episode's *pending* steps under its step index: (observation, raw action, log-prob, head
version, whether it was deterministic). The index is the client's (``ActRequest.steps``) when given, so a
retried ``Act`` for an (episode, step) already recorded is not recorded twice; otherwise the server numbers
the episode's actions in arrival order.

Rewards (``ReportExperience`` or ``ActStream`` feedback) join pending steps *by step index*: a report that
names its step joins exactly that action; one that does not answers the step after the latest one
answered (rewards arrive in step order). Steps leave the pending set in index order, once every earlier
step has its reward, so a client that reports on a separate stream a few steps behind still gets every
reward onto the right action. At most ``MAX_PENDING_STEPS`` actions of an episode may wait; beyond that
the oldest is dropped (``missing_reward``), the completed steps before it are published as a truncated
segment, and the reward that arrives for it later is dropped too (``stale_step``) instead of being
shifted onto the next action. A reward for a step that was never served is ``no_action``.
Clients acting elsewhere may report full transitions instead (recorded and rewarded at once).

When an episode terminates or is truncated its last segment is published to the ``StreamExperience``
subscribers and its return becomes a metric; a truncated episode's segment carries the final observation
the client reported (for bootstrapping). A long episode is published in segments of ``max_segment_steps``
(each with the next observation). Every segment carries the per-step deterministic marker and the
episode's *ordinal*: the order in which it started among the task's episodes whose first action came from
the same version in the same mode (what the updater's guard samples versions by).

This module trusts its callers: the data plane validates every report first (finite rewards within the
bound, actions in the task's space, ...; :mod:`polyhead.server.dataplane`) and counts refusals through
:meth:`ExperienceHub.refuse`.

Memory is bounded: at most ``max_open_episodes`` episodes are assembled (the least recently used is
evicted), an episode idle for ``ttl_s`` expires, and each subscriber has a bounded queue (a slow subscriber
loses segments, counted, rather than growing the server). Dropped experience is counted in steps in
``polyhead_experience_dropped_total{task,reason}``.

Use from the event loop thread only (the servicers call it); nothing here blocks.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from polyhead.server.metrics import ServerMetrics

_SWEEP_EVERY_S = 1.0
# Actions of one episode that may await their rewards (a reporting client is at most a few steps behind).
MAX_PENDING_STEPS = 16


@dataclass(frozen=True)
class Segment:
    """Consecutive steps of one episode (the domain form of ``EpisodeSegment``)."""

    task_id: str
    episode_id: str
    observations: npt.NDArray[np.float32]  # [T, obs...]
    actions: npt.NDArray[np.generic]  # int64 [T] or float32 [T, act...]
    log_probs: npt.NDArray[np.float32]  # [T]
    rewards: npt.NDArray[np.float32]  # [T]
    head_versions: tuple[int, ...]
    terminated: bool
    truncated: bool
    start_step: int
    episode_return: float  # NaN unless the segment ends the episode
    episode_length: int  # 0 unless the segment ends the episode
    next_observation: npt.NDArray[np.float32] | None
    deterministic: tuple[bool, ...] = ()  # per step; empty: every step sampled
    episode_ordinal: int = 0


@dataclass(frozen=True)
class Transition:
    """A full step reported by a client that chose the action elsewhere."""

    observation: npt.NDArray[np.float32]
    action: npt.NDArray[np.generic]
    log_prob: float
    head_version: int
    deterministic: bool = False


@dataclass
class _Step:
    index: int
    obs: npt.NDArray[np.float32]
    action: npt.NDArray[np.generic]
    log_prob: float
    version: int
    deterministic: bool
    reward: float | None = None


@dataclass
class _Episode:
    task_id: str
    episode_id: str
    last_seen: float
    ordinal: int = -1  # set with the first recorded action
    steps: list[_Step] = field(default_factory=list)  # completed steps of the current segment
    pending: dict[int, _Step] = field(default_factory=dict)  # recorded, not yet moved into ``steps``
    served: int = 0  # the next step index the server assigns
    reported: int = 0  # the step a report without a step index answers: one past the latest answered
    done_below: int = 0  # every step index below this is completed or dropped
    total_return: float = 0.0
    length: int = 0
    first_version: int = 0  # the head version of the episode's first recorded action (canary stickiness)
    versions: set[int] = field(default_factory=set)  # versions of the steps that got their rewards


@dataclass(frozen=True)
class EpisodeEnd:
    """A completed episode, for episode listeners (per-version returns, the live-return monitor)."""

    task_id: str
    episode_id: str
    versions: frozenset[int]  # every head version that acted in it (one: a single-version episode)
    episode_return: float
    length: int


EpisodeListener = Callable[[EpisodeEnd], None]


@dataclass(frozen=True)
class ReportOutcome:
    accepted: bool
    completed: bool


class Subscription:
    """One ``StreamExperience`` call: an async iterator of segments for the chosen tasks."""

    def __init__(self, hub: ExperienceHub, task_ids: frozenset[str], maxsize: int) -> None:
        self._hub = hub
        self.task_ids = task_ids
        self.queue: asyncio.Queue[Segment | None] = asyncio.Queue(maxsize)

    def wants(self, task_id: str) -> bool:
        return not self.task_ids or task_id in self.task_ids

    async def __aiter__(self) -> AsyncIterator[Segment]:
        while True:
            item = await self.queue.get()
            if item is None:
                return
            yield item

    def close(self) -> None:
        self._hub.unsubscribe(self)


class ExperienceHub:
    """Assembles episodes and fans segments out to subscribers."""

    def __init__(
        self,
        metrics: ServerMetrics,
        *,
        ttl_s: float,
        max_open_episodes: int,
        max_segment_steps: int,
        subscriber_queue_size: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._metrics = metrics
        self.ttl_s = ttl_s
        self.max_open_episodes = max_open_episodes
        self.max_segment_steps = max_segment_steps
        self.subscriber_queue_size = subscriber_queue_size
        self._clock = clock
        self._episodes: collections.OrderedDict[tuple[str, str], _Episode] = collections.OrderedDict()
        self._subscribers: list[Subscription] = []
        self._episode_listeners: list[EpisodeListener] = []
        self._last_sweep = clock()
        # Episodes started per (task, first version, deterministic): the next ordinal to hand out.
        self._ordinals: dict[tuple[str, int, bool], int] = {}

    @property
    def open_episodes(self) -> int:
        return len(self._episodes)

    def sweep(self) -> None:
        """Expire idle episodes now (at most once a second). Recording sweeps too, but abandoned episodes
        must also be freed when no further experience call comes: the server calls this periodically."""
        self._maybe_sweep(self._clock())

    def add_episode_listener(self, listener: EpisodeListener) -> None:
        """Call ``listener(end)`` for every episode completed with every step rewarded (on the event loop;
        it must not block)."""
        self._episode_listeners.append(listener)

    def episode_version(self, task_id: str, episode_id: str) -> int:
        """The head version of an open episode's first recorded action; 0 when the episode is not open."""
        ep = self._episodes.get((task_id, episode_id))
        return 0 if ep is None else ep.first_version

    def refuse(self, task_id: str, reason: str) -> None:
        """Count one report (or action) refused at the edge, before it joined anything."""
        self._drop(task_id, reason, 1)

    # --- recording -------------------------------------------------------------------------------------
    def record_action(
        self,
        task_id: str,
        episode_id: str,
        *,
        obs: npt.NDArray[np.float32],
        action: npt.NDArray[np.generic],
        log_prob: float,
        version: int,
        deterministic: bool = False,
        step: int | None = None,
    ) -> int:
        """Record an action served for an episode; returns its step index within the episode.

        ``step`` is the client's index for it (``ActRequest.steps``); None: the next index. An (episode,
        step) already recorded (a retried ``Act``) is not recorded again (counted ``duplicate_action``).
        When more than ``MAX_PENDING_STEPS`` actions await their rewards the client is not reporting: the
        oldest pending step is dropped (reason ``missing_reward``) and the completed steps before it are
        published as a truncated segment, so every published step has its true reward.
        """
        now = self._clock()
        self._maybe_sweep(now)
        ep = self._touch(task_id, episode_id, now)
        index = ep.served if step is None else step
        if index < ep.done_below or index in ep.pending:
            self._drop(task_id, "duplicate_action", 1)
            return index
        self._start(ep, version, deterministic, index)
        while len(ep.pending) >= MAX_PENDING_STEPS:
            self._drop_oldest_pending(ep)
        ep.pending[index] = _Step(index, obs, action, float(log_prob), version, deterministic)
        ep.served = max(ep.served, index + 1)
        return index

    def report(
        self,
        task_id: str,
        episode_id: str,
        *,
        reward: float,
        terminated: bool,
        truncated: bool,
        transition: Transition | None = None,
        step: int | None = None,
        final_observation: npt.NDArray[np.float32] | None = None,
    ) -> ReportOutcome:
        """Join a reward with the episode's action of step ``step`` (None: the step after the latest one
        answered), or record a full ``transition`` (at ``step``, or the next index) with its reward.

        A truncation's ``final_observation`` becomes the last segment's ``next_observation``.
        """
        now = self._clock()
        self._maybe_sweep(now)
        key = (task_id, episode_id)
        if transition is not None:
            ep = self._touch(task_id, episode_id, now)
            index = ep.served if step is None else step
            if index < ep.done_below or index in ep.pending:
                self._drop(task_id, "stale_step", 1)
                return ReportOutcome(accepted=False, completed=False)
            self._start(ep, transition.head_version, transition.deterministic, index)
            while len(ep.pending) >= MAX_PENDING_STEPS:
                self._drop_oldest_pending(ep)
            ep.pending[index] = _Step(
                index,
                transition.observation,
                transition.action,
                float(transition.log_prob),
                transition.head_version,
                transition.deterministic,
            )
            ep.served = max(ep.served, index + 1)
            ep.reported = max(ep.reported, index + 1)
        else:
            found = self._episodes.get(key)
            if found is None:
                self._drop(task_id, "unknown_episode", 1)
                return ReportOutcome(accepted=False, completed=False)
            ep = found
            ep.last_seen = now
            self._episodes.move_to_end(key)
            index = ep.reported if step is None else step
            ep.reported = max(ep.reported, index + 1)
            if index not in ep.pending or ep.pending[index].reward is not None:
                # No action of that step awaits a reward: answered already or dropped (stale), or never
                # served. Either way the reward must not join another action.
                self._drop(task_id, "stale_step" if index < ep.served else "no_action", 1)
                return ReportOutcome(accepted=False, completed=False)
        ep.pending[index].reward = float(reward)
        self._metrics.experience_steps.labels(task=task_id).inc()
        self._advance(ep)
        if not (terminated or truncated):
            return ReportOutcome(accepted=True, completed=False)
        complete = ep.done_below == index + 1
        if complete:
            self._flush(
                ep,
                next_obs=final_observation if truncated and not terminated else None,
                terminated=terminated,
                truncated=truncated and not terminated,
                final=True,
            )
        else:
            # An earlier action never got its reward: publish what is complete, drop the rest.
            gap = ep.pending.get(ep.done_below)
            self._flush(
                ep, next_obs=None if gap is None else gap.obs, terminated=False, truncated=True, final=False
            )
        # Actions served after the episode's end (none for a well-behaved client) have no reward.
        self._drop(task_id, "missing_reward", sum(1 for s in ep.pending.values() if s.reward is None))
        ep.pending.clear()
        del self._episodes[key]
        self._metrics.episode_return.labels(task=task_id).observe(ep.total_return)
        self._metrics.episode_return_last.labels(task=task_id).set(ep.total_return)
        self._metrics.episode_length.labels(task=task_id).observe(ep.length)
        self._metrics.open_episodes.set(len(self._episodes))
        if complete:
            end = EpisodeEnd(task_id, episode_id, frozenset(ep.versions), ep.total_return, ep.length)
            for listener in self._episode_listeners:
                listener(end)
        return ReportOutcome(accepted=True, completed=True)

    # --- subscribers -----------------------------------------------------------------------------------
    def subscribe(self, task_ids: Iterable[str] = ()) -> Subscription:
        sub = Subscription(self, frozenset(task_ids), self.subscriber_queue_size)
        self._subscribers.append(sub)
        self._metrics.experience_subscribers.set(len(self._subscribers))
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if sub in self._subscribers:
            self._subscribers.remove(sub)
            self._metrics.experience_subscribers.set(len(self._subscribers))

    def close(self) -> None:
        """End every subscription (shutdown)."""
        for sub in list(self._subscribers):
            while True:
                try:
                    sub.queue.put_nowait(None)
                    break
                except asyncio.QueueFull:
                    sub.queue.get_nowait()
            self.unsubscribe(sub)

    # --- internals -------------------------------------------------------------------------------------
    def _touch(self, task_id: str, episode_id: str, now: float) -> _Episode:
        key = (task_id, episode_id)
        ep = self._episodes.get(key)
        if ep is None:
            ep = _Episode(task_id, episode_id, now)
            self._episodes[key] = ep
            while len(self._episodes) > self.max_open_episodes:
                _, old = self._episodes.popitem(last=False)
                self._drop(old.task_id, "evicted", len(old.steps) + len(old.pending))
            self._metrics.open_episodes.set(len(self._episodes))
        else:
            ep.last_seen = now
            self._episodes.move_to_end(key)
        return ep

    def _maybe_sweep(self, now: float) -> None:
        if now - self._last_sweep < _SWEEP_EVERY_S:
            return
        self._last_sweep = now
        limit = now - self.ttl_s
        # The dict is in least-recently-used order: stop at the first fresh episode.
        while self._episodes:
            key, ep = next(iter(self._episodes.items()))
            if ep.last_seen > limit:
                break
            del self._episodes[key]
            self._drop(ep.task_id, "expired", len(ep.steps) + len(ep.pending))
        self._metrics.open_episodes.set(len(self._episodes))

    def _start(self, ep: _Episode, version: int, deterministic: bool, index: int) -> None:
        """Give a new episode its ordinal among the episodes started under (version, mode); its first
        recorded step (``index``, 0 unless the client numbers from elsewhere) is where it begins."""
        if ep.ordinal >= 0:
            return
        ep.first_version = version
        ep.done_below = ep.reported = index
        key = (ep.task_id, version, deterministic)
        ep.ordinal = self._ordinals.get(key, 0)
        self._ordinals[key] = ep.ordinal + 1

    def _advance(self, ep: _Episode) -> None:
        """Move rewarded steps into the current segment in index order (publishing full segments)."""
        while (step := ep.pending.get(ep.done_below)) is not None and step.reward is not None:
            if len(ep.steps) >= self.max_segment_steps:
                # The observation after the segment's last step is the one this step acted on.
                self._flush(ep, next_obs=step.obs, terminated=False, truncated=False, final=False)
            del ep.pending[ep.done_below]
            ep.steps.append(step)
            ep.versions.add(step.version)
            ep.total_return += step.reward
            ep.length += 1
            ep.done_below += 1

    def _drop_oldest_pending(self, ep: _Episode) -> None:
        """The oldest pending step will never get its reward: drop it and publish the completed steps
        before it as a truncated segment (bootstrapped from the dropped step's observation). A reward
        reported for it later is ``stale_step``: it never shifts onto the next action."""
        oldest = min(ep.pending)
        dropped = ep.pending.pop(oldest)
        self._drop(ep.task_id, "missing_reward", 1)
        nxt = dropped.obs if oldest == ep.done_below else None
        self._flush(ep, next_obs=nxt, terminated=False, truncated=True, final=False)
        ep.done_below = oldest + 1
        self._advance(ep)

    def _drop(self, task_id: str, reason: str, steps: int) -> None:
        if steps:
            self._metrics.experience_dropped.labels(task=task_id, reason=reason).inc(steps)

    def _flush(
        self,
        ep: _Episode,
        *,
        next_obs: npt.NDArray[np.float32] | None,
        terminated: bool,
        truncated: bool,
        final: bool,
    ) -> None:
        steps, ep.steps = ep.steps, []
        if not steps or not self._subscribers:
            return
        deterministic = tuple(s.deterministic for s in steps)
        segment = Segment(
            task_id=ep.task_id,
            episode_id=ep.episode_id,
            observations=np.stack([s.obs for s in steps]).astype(np.float32, copy=False),
            actions=np.stack([s.action for s in steps]),
            log_probs=np.asarray([s.log_prob for s in steps], dtype=np.float32),
            rewards=np.asarray([s.reward for s in steps], dtype=np.float32),
            head_versions=tuple(s.version for s in steps),
            terminated=terminated,
            truncated=truncated,
            start_step=steps[0].index,
            episode_return=ep.total_return if final else math.nan,
            episode_length=ep.length if final else 0,
            next_observation=next_obs,
            deterministic=deterministic if any(deterministic) else (),
            episode_ordinal=max(ep.ordinal, 0),
        )
        for sub in self._subscribers:
            if not sub.wants(ep.task_id):
                continue
            try:
                sub.queue.put_nowait(segment)
                self._metrics.experience_segments.labels(task=ep.task_id).inc()
            except asyncio.QueueFull:
                self._drop(ep.task_id, "subscriber_full", len(steps))
