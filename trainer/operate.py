"""``polyhead operate``: the long-running controller that re-adapts tasks that regress under live traffic.

It watches every task of one server or of several replicas (``ListTasks``: the stable version, the canary
and the server's live-return monitor, :mod:`polyhead.livewatch`). For a task whose stable version is marked
*regressed* it runs a **recovery**, one per task, several at once:

1. **Choose the start** (``choosing``). The current head's live returns are the stable version's; a fresh
   head (the same initialisation ``adapt`` uses) is published as a canary at the first share. After
   ``judge_episodes`` episodes of each, training starts from the better of the two (the stable head's
   torch parameters when this controller knows them: the bundle's trunk checkpoint for the version that
   shipped with it, or a version it published itself; else the fresh head).
2. **Train** (``training``). Head-only PPO on the frozen trunk from the server's experience feed
   (:class:`polyhead.trainer.updater.head_ppo.HeadLearner`, :func:`rollout_from_segments`): steps acted by
   the candidate versions (and, when it started from the current head, by the stable version) are
   trained on. Every ``publish_every`` updates a candidate is published
   (:class:`polyhead.trainer.updater.publisher.HeadPublisher`, staged, not activated) and made the canary
   at the first share, replacing the previous candidate.
3. **Judge, widen, promote, roll back.** A canary is compared with the stable version on episodes that
   both played in the same period (``judge_episodes`` counted as the effective size of the two samples,
   :func:`effective_episodes`), by the one-sided Mann-Whitney tests of :mod:`polyhead.stats` at level
   ``alpha``: significantly **better** widens its share to the next of ``shares`` (``widening``; training
   goes on, no new candidate is published); better again at the last share **promotes** it
   (bundle pointer first, then every replica); significantly **worse** (by more than ``worse_margin`` of
   the stable mean) **rolls it back** (canary cleared, training resumes from the last candidate). Neither
   after ``3 x judge_episodes``: inconclusive (a rollback while widening; at the first share the canary is
   retired so that the next candidate can be judged). A new candidate is published only when no canary
   awaits its verdict.
   A promoted candidate whose live mean is still below ``recover_fraction`` of the regressed version's
   reference return (``ListTasks.reference_return``) becomes the new stable and training goes on from it,
   now on all of the task's traffic.
4. **Give up** after ``budget_steps`` trained samples or ``max_candidates`` candidates: the canary is
   cleared, ``polyhead_operate_gave_up{task}`` is 1 (alert ``PolyheadOperateGaveUp``) and the task is left
   alone until its stable version changes.

Every decision is logged with its numbers, appended to ``decisions.jsonl`` in the state directory and
counted in ``polyhead_operate_decisions_total{task,decision}``.

**Restartable.** The state directory holds ``state.json`` (per task: phase, start, candidate versions,
canary and share, samples, the episode returns counted for the current verdict) and the torch parameters
of every version published (``<task>/v<N>.pt``). A controller started again reads them, checks the
servers' canaries against them, and carries on from the same share and counts.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from polyhead.bundle import Bundle
from polyhead.clients.catalog import RemoteTask
from polyhead.clients.policy_client import PolicyClient
from polyhead.errors import PolyheadError
from polyhead.stats import better_than, relative_margin, worse_than
from polyhead.trainer.config import PPOConfig
from polyhead.trainer.export import DEFAULT_EXPORTER, Exporter, sample_observations
from polyhead.trainer.policy import MultiTaskPolicy, TaskHead, load_policy
from polyhead.trainer.running_stats import RunningMeanStd
from polyhead.trainer.updater.config import ADAPT_PPO
from polyhead.trainer.updater.control import ExperienceFeed, ServerControl
from polyhead.trainer.updater.frozen import freeze_trunk
from polyhead.trainer.updater.head_ppo import HeadLearner, SegmentData, rollout_from_segments
from polyhead.trainer.updater.metrics import UpdaterMetrics
from polyhead.trainer.updater.publisher import HeadPublisher

log = logging.getLogger("polyhead.trainer.operate")

Phase = Literal["choosing", "training", "widening", "gave_up"]
STATE_FILE = "state.json"
DECISIONS_FILE = "decisions.jsonl"


@dataclass(frozen=True)
class OperateConfig:
    """Settings of one ``polyhead operate`` run (field help is ``--help``)."""

    bundle: Path
    servers: tuple[str, ...] = field(metadata={"help": "data-plane HOST:PORT of every replica"})
    admin_targets: tuple[str, ...] = field(
        default=(),
        metadata={"help": "HeadAdmin HOST:PORT per replica (default: each server's host, port 50052)"},
    )
    admin_token: str | None = field(default=None, metadata={"help": "bearer token for HeadAdmin calls"})
    state_dir: Path | None = field(
        default=None,
        metadata={"help": "where the controller keeps its state and decision log (default: "
                  "<bundle>.operate next to the bundle)"},
    )  # fmt: skip
    tasks: tuple[str, ...] = field(
        default=(), metadata={"help": "tasks to watch (default: every served task)"}
    )
    poll_s: float = field(default=2.0, metadata={"help": "seconds between looks at the servers"})
    shares: tuple[float, ...] = field(
        default=(10.0, 25.0, 50.0),
        metadata={"help": "canary shares in percent: a candidate starts at the first and is widened "
                  "through the others while significantly better, then promoted"},
    )  # fmt: skip
    judge_episodes: int = field(
        default=20,
        metadata={
            "help": "episodes before each verdict, as the equal-split size of the same power: "
            "2 n_canary n_stable / (n_canary + n_stable) (20 means 20 and 20, or 14 and 42)"
        },
    )
    alpha: float = field(
        default=0.01, metadata={"help": "level of each canary test (better: widen/promote; worse: roll back)"}
    )
    worse_margin: float = field(
        default=0.1,
        metadata={"help": "a canary is rolled back when worse than stable by more than this fraction of "
                  "the stable mean return"},
    )  # fmt: skip
    publish_every: int = field(default=4, metadata={"help": "PPO updates between published candidates"})
    budget_steps: int = field(
        default=200_000, metadata={"help": "live samples one recovery may train on before giving up"}
    )
    max_candidates: int = field(
        default=24, metadata={"help": "candidates one recovery may publish before giving up"}
    )
    supersede: bool = field(
        default=True,
        metadata={"help": "replace a canary at the first share that had its episodes without proving "
                  "better or worse by the newer candidate the learner has trained meanwhile, instead of "
                  "waiting for its inconclusive verdict (3x the episodes)"},
    )  # fmt: skip
    recover_fraction: float = field(
        default=0.9,
        metadata={"help": "a promoted candidate below this fraction of the regressed version's reference "
                  "return keeps training (as the new stable) until it gets there or the budget ends"},
    )  # fmt: skip
    max_version_lag: int = field(
        default=2,
        metadata={"help": "train on steps of the newest candidate and this many before it"},
    )
    ppo: PPOConfig = ADAPT_PPO
    exporter: Exporter = DEFAULT_EXPORTER
    metrics_port: int | None = field(
        default=None, metadata={"help": "serve the controller's Prometheus /metrics on this port (0: any)"}
    )
    max_runtime_s: float | None = field(
        default=None, metadata={"help": "stop after this many seconds (default: run until interrupted)"}
    )

    def __post_init__(self) -> None:
        if not self.servers:
            raise ValueError("operate needs at least one --server")
        if self.admin_targets and len(self.admin_targets) != len(self.servers):
            raise ValueError("give one --admin-target per --server (or none)")
        if (
            not self.shares
            or any(not 0.0 < s <= 100.0 for s in self.shares)
            or list(self.shares) != sorted(self.shares)
        ):
            raise ValueError(f"shares must be increasing percentages in (0, 100], got {self.shares}")
        if self.judge_episodes < 3 or not 0.0 < self.alpha < 1.0 or self.publish_every < 1:
            raise ValueError("judge_episodes must be >= 3, alpha in (0, 1), publish_every >= 1")

    @property
    def resolved_admin_targets(self) -> tuple[str, ...]:
        if self.admin_targets:
            return self.admin_targets
        return tuple(f"{s.rpartition(':')[0] or '127.0.0.1'}:50052" for s in self.servers)

    @property
    def resolved_state_dir(self) -> Path:
        return self.state_dir or self.bundle.parent / f"{self.bundle.name}.operate"


def effective_episodes(n_canary: int, n_stable: int) -> float:
    """The equal-split sample size with the same rank-test power: the harmonic mean ``2 n1 n2 / (n1 + n2)``.

    The Mann-Whitney statistic's standard error depends on the counts through ``n1 n2 / (n1 + n2)``, so
    14 canary episodes against 42 stable ones (a 25 % canary) judge as well as 21 against 21. Waiting for
    ``judge_episodes`` of the *smaller* side instead made every verdict at a small share wait for the
    canary's episodes while the stable's piled up (the recovery's slowest step in
    benchmarks/operate_drift.py). 0 when either side has none.
    """
    if n_canary <= 0 or n_stable <= 0:
        return 0.0
    return 2.0 * n_canary * n_stable / (n_canary + n_stable)


# ============================================================================================================
# Persistent state
# ============================================================================================================
@dataclass
class Recovery:
    """One task's recovery; everything here is persisted (``state.json``)."""

    task_id: str
    stable_version: int  # the regressed stable version this recovery replaces
    target: float = math.nan  # the regressed version's live reference mean: what to get back to
    phase: Phase = "choosing"
    start: str = ""  # "current" or "scratch" once chosen
    candidates: list[int] = field(default_factory=list)  # published versions, oldest first
    rolled_back: list[int] = field(default_factory=list)
    canary: int = 0
    share_index: int = 0
    samples: int = 0
    updates: int = 0
    started_at: float = field(default_factory=time.time)
    # Episode returns counted for the current verdict (since the canary or its share last changed).
    canary_returns: list[float] = field(default_factory=list)
    stable_returns: list[float] = field(default_factory=list)

    def reset_counts(self) -> None:
        self.canary_returns = []
        self.stable_returns = []


@dataclass
class OperateState:
    recoveries: dict[str, Recovery] = field(default_factory=dict)
    gave_up: dict[str, int] = field(default_factory=dict)  # task -> stable version given up on
    recovered: dict[str, int] = field(default_factory=dict)  # task -> promoted version

    @classmethod
    def load(cls, path: Path) -> OperateState:
        if not path.is_file():
            return cls()
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(
            recoveries={k: Recovery(**v) for k, v in data.get("recoveries", {}).items()},
            gave_up={k: int(v) for k, v in data.get("gave_up", {}).items()},
            recovered={k: int(v) for k, v in data.get("recovered", {}).items()},
        )

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1), encoding="utf-8")
        tmp.replace(path)  # atomic: a killed controller leaves the old or the new state, never half


# ============================================================================================================
# Metrics
# ============================================================================================================
class OperateMetrics:
    """``polyhead_operate_*`` on an injected registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.decisions = Counter(
            "polyhead_operate_decisions_total",
            "Controller decisions by kind (recover, start, publish, widen, promote, rollback, give_up, "
            "abandon)",
            ["task", "decision"],
            registry=r,
        )
        self.recovering = Gauge(
            "polyhead_operate_recovering", "1 while a recovery of the task runs", ["task"], registry=r
        )
        self.gave_up = Gauge(
            "polyhead_operate_gave_up",
            "1 while the controller has given up on the task's regressed stable version",
            ["task"],
            registry=r,
        )
        self.canary_percent = Gauge(
            "polyhead_operate_canary_percent",
            "Share the controller gave the task's canary",
            ["task"],
            registry=r,
        )
        self._server: Any = None

    def serve(self, port: int) -> int:
        server, _ = start_http_server(port, registry=self.registry)
        self._server = server
        return int(server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


# ============================================================================================================
# The controller
# ============================================================================================================
@dataclass
class _Live:
    """In-memory companions of a recovery (rebuilt on restart)."""

    publisher: HeadPublisher
    learner: HeadLearner | None = None
    return_rms: RunningMeanStd = field(default_factory=RunningMeanStd)
    pending: list[SegmentData] = field(default_factory=list)
    feeds: list[ExperienceFeed] = field(default_factory=list)
    updates_since_publish: int = 0


@dataclass
class Decision:
    task: str
    decision: str
    version: int
    detail: str
    at: float = field(default_factory=time.time)


class Operator:
    """The controller; :meth:`poll` is one look at the servers, :meth:`run` loops it."""

    def __init__(
        self,
        config: OperateConfig,
        *,
        metrics: OperateMetrics | None = None,
        on_decision: Callable[[Decision], None] | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics or OperateMetrics()
        self.on_decision = on_decision
        self.state_dir = config.resolved_state_dir
        self.state = OperateState.load(self.state_dir / STATE_FILE)
        self.bundle = Bundle.open(config.bundle)
        self.policy: MultiTaskPolicy = load_policy(self.bundle)
        freeze_trunk(self.policy)
        # The torch adapters (head, and own encoder) the trunk checkpoint shipped with, by task: the
        # bundle's first versions.
        self._shipped = {t: {k: v.clone() for k, v in self.policy.adapter(t).state_dict().items()}
                         for t in self.policy.task_ids}  # fmt: skip
        self.controls = [ServerControl(a, token=config.admin_token) for a in config.resolved_admin_targets]
        self.clients = [PolicyClient(s, timeout=10.0) for s in config.servers]
        self.updater_metrics = UpdaterMetrics()
        self.live: dict[str, _Live] = {}
        self.decisions: list[Decision] = []
        for task_id, rec in self.state.recoveries.items():
            log.info(
                "resuming the recovery of %s: %s, candidates %s, canary %d at %g%%, %d samples",
                task_id,
                rec.phase,
                rec.candidates,
                rec.canary,
                config.shares[rec.share_index] if rec.canary else 0.0,
                rec.samples,
            )
            self.metrics.recovering.labels(task=task_id).set(1)
        for task_id in self.state.gave_up:
            self.metrics.gave_up.labels(task=task_id).set(1)

    # --- the loop -------------------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None) -> dict[str, Any]:
        """Poll until ``stop`` is set (or ``max_runtime_s`` passes); returns the summary."""
        stop = stop or threading.Event()
        deadline = None if self.config.max_runtime_s is None else time.monotonic() + self.config.max_runtime_s
        try:
            while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
                started = time.monotonic()
                self.poll()
                stop.wait(max(0.0, self.config.poll_s - (time.monotonic() - started)))
        finally:
            self.close()
        return self.summary()

    def poll(self) -> None:
        """One look: read every replica's tasks, start recoveries, advance the running ones, save state."""
        tasks = self._tasks()
        for task_id, views in sorted(tasks.items()):
            if self.config.tasks and task_id not in self.config.tasks:
                continue
            stable = views[0].active_version
            rec = self.state.recoveries.get(task_id)
            if rec is None:
                if self.state.gave_up.get(task_id) not in (None, stable):
                    self.state.gave_up.pop(task_id)  # a new stable version: judged afresh
                    self.metrics.gave_up.labels(task=task_id).set(0)
                regressed = [v for v in views if v.regressed]
                if regressed and task_id not in self.state.gave_up:
                    first = regressed[0]
                    self._begin(task_id, stable, first.regression_detail, first.reference_return)
                continue
            if stable != rec.stable_version:
                self._end(task_id, "abandon", stable, f"the stable version changed to {stable} meanwhile")
                continue
            self._advance(rec)
        self.state.save(self.state_dir / STATE_FILE)

    # --- phases ---------------------------------------------------------------------------------------
    def _begin(self, task_id: str, stable: int, detail: str, target: float = math.nan) -> None:
        rec = Recovery(task_id=task_id, stable_version=stable, target=target)
        self.state.recoveries[task_id] = rec
        self.metrics.recovering.labels(task=task_id).set(1)
        self._decide(task_id, "recover", stable, f"stable version {stable} regressed: {detail}")
        live = self._live(rec)
        self.policy.adapter(task_id).load_state_dict(self._fresh_state(task_id))
        self._publish_candidate(rec, live, note="fresh head, to compare with the current one")

    def _advance(self, rec: Recovery) -> None:
        live = self._live(rec)
        segments = [s for feed in live.feeds for s in feed.drain(timeout_s=0.0)]
        self._count_returns(rec, segments)
        cfg = self.config
        if rec.phase == "choosing":
            if min(len(rec.canary_returns), len(rec.stable_returns)) < cfg.judge_episodes:
                return
            fresh, current = np.mean(rec.canary_returns), np.mean(rec.stable_returns)
            known = self._known_state(rec.task_id, rec.stable_version)
            rec.start = "scratch" if fresh >= current or known is None else "current"
            adapter = self.policy.adapter(rec.task_id)
            if rec.start == "current":
                assert known is not None
                adapter.load_state_dict(known)
                self._clear_canary(rec)
            else:
                adapter.load_state_dict(self._load_version(rec.task_id, rec.candidates[-1]))
            self._decide(
                rec.task_id,
                "start",
                rec.stable_version,
                f"training from the {rec.start} head: fresh head {fresh:.1f} vs current head {current:.1f} "
                f"over {len(rec.canary_returns)}/{len(rec.stable_returns)} live episodes"
                + ("" if known is not None or fresh >= current else " (current head's parameters unknown)"),
            )
            rec.phase = "training"
            rec.reset_counts()
            return
        if rec.phase in ("training", "widening") and not self._exhausted(rec):
            # Training goes on while a canary is widened: the verdict is about the published snapshot,
            # and the steps played meanwhile are the next candidate's data (pausing wasted a third of
            # the recovery's traffic in benchmarks/operate_drift.py).
            self._train(rec, live, segments)
        if rec.canary:
            self._judge(rec)
        if rec.phase == "training" and self._exhausted(rec) and not rec.canary:
            self._give_up(rec)

    def _exhausted(self, rec: Recovery) -> bool:
        """The recovery's budget is spent: no more training or candidates (the last canary is judged)."""
        return rec.samples >= self.config.budget_steps or len(rec.candidates) >= self.config.max_candidates

    def _train(self, rec: Recovery, live: _Live, segments: list[SegmentData]) -> None:
        cfg, ppo = self.config, self.config.ppo
        if live.learner is None:
            live.learner = HeadLearner(self.policy, rec.task_id, ppo, seed=ppo.seed)
        live.pending.extend(segments)
        if sum(len(s) for s in live.pending) < ppo.envs_per_task * ppo.num_steps:
            return
        recent = [v for v in rec.candidates if v not in rec.rolled_back][-(cfg.max_version_lag + 1) :]
        allowed = {v: v in recent for v in rec.candidates}
        if rec.start == "current" or rec.stable_version in rec.candidates:
            allowed[rec.stable_version] = True  # the head we started from acted these steps
        batch = rollout_from_segments(
            self.policy,
            rec.task_id,
            live.pending,
            allowed_versions=allowed,
            return_rms=live.return_rms,
            config=ppo,
        )
        live.pending = []
        if batch.steps < 2:
            return
        live.learner.set_lr_fraction(1.0 - rec.samples / max(cfg.budget_steps, 1))
        live.learner.update(batch.rollout, advantages_ready=True)
        rec.samples += batch.steps
        rec.updates += 1
        live.updates_since_publish += 1
        self.updater_metrics.samples.labels(task=rec.task_id).inc(batch.steps)
        # A new candidate waits until the canary in place has its verdict (a replaced canary is never
        # judged, and a good one would be discarded before it could be widened).
        if live.updates_since_publish >= cfg.publish_every and not rec.canary and not self._exhausted(rec):
            live.updates_since_publish = 0
            self._publish_candidate(rec, live, note=f"after {rec.updates} updates, {rec.samples} samples")

    def _judge(self, rec: Recovery) -> None:
        cfg = self.config
        n = effective_episodes(len(rec.canary_returns), len(rec.stable_returns))
        if n < cfg.judge_episodes:
            return
        canary, stable = rec.canary_returns, rec.stable_returns
        better = better_than(canary, stable, margin=0.0, alpha=cfg.alpha)
        worse = worse_than(canary, stable, margin=relative_margin(stable, cfg.worse_margin), alpha=cfg.alpha)
        share = cfg.shares[rec.share_index]
        if better.rejected:
            if rec.share_index + 1 < len(cfg.shares):
                rec.share_index += 1
                rec.phase = "widening"
                self._set_canary(rec, rec.canary)
                self._decide(
                    rec.task_id,
                    "widen",
                    rec.canary,
                    f"canary v{rec.canary} better than stable v{rec.stable_version} at {share:g}%: "
                    f"{better.describe()}; share -> {cfg.shares[rec.share_index]:g}%",
                )
            else:
                self._promote(rec, better.describe())
            return
        inconclusive = n >= 3 * cfg.judge_episodes
        if worse.rejected or (inconclusive and (rec.phase == "widening" or self._exhausted(rec))):
            why = (
                worse.describe()
                if worse.rejected
                else f"inconclusive after {n} episodes: {better.describe()}"
            )
            self._rollback(rec, why)
        elif (
            cfg.supersede
            and rec.phase == "training"
            and self._live(rec).updates_since_publish >= cfg.publish_every
            and not self._exhausted(rec)
        ):
            # Not better yet at the first share, and the learner has trained a newer snapshot on the
            # episodes played meanwhile: judge that one instead. While the head is still improving, the
            # canary in place is stale by the time its 3x-longer inconclusive verdict would come (the
            # slowest recovery in benchmarks/operate_drift.py spent most of its time on such waits).
            version = rec.canary
            self._clear_canary(rec)
            self._decide(
                rec.task_id,
                "supersede",
                version,
                f"canary v{version} not better after {n:.0f} episodes ({better.describe()}); "
                "replaced by a newer candidate",
            )
            live = self._live(rec)
            live.updates_since_publish = 0
            self._publish_candidate(rec, live, note=f"after {rec.updates} updates, {rec.samples} samples")
        elif inconclusive:
            # Neither better nor worse at the first share: retire it, so the next candidate can be judged.
            version = rec.canary
            self._clear_canary(rec)
            self._decide(
                rec.task_id,
                "retire",
                version,
                f"canary v{version} inconclusive after {n} episodes: {better.describe()}",
            )

    # --- actions --------------------------------------------------------------------------------------
    def _publish_candidate(self, rec: Recovery, live: _Live, *, note: str) -> None:
        published = live.publisher.publish(
            eval_return=math.nan,  # the changed environment is known only live: judged there
            training={
                "algorithm": "head-only PPO on a frozen trunk from live experience (polyhead operate)",
                "start": rec.start or "scratch",
                "steps": rec.samples,
                "recovering_from": rec.stable_version,
            },
            parent=None,
            note=note,
            activate=False,
        )
        version = published.version
        path = self.state_dir / rec.task_id / f"v{version}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(published.state, path)
        body = published.record.path.joinpath("head.onnx").read_bytes()
        head_json = published.record.path.joinpath("head.json").read_text(encoding="utf-8")
        encoder = published.record.read_encoder()
        for control in self.controls:
            control.load(rec.task_id, version, body, head_json, encoder=encoder, activate=False)
        rec.candidates.append(version)
        rec.share_index = 0
        self._set_canary(rec, version)
        self._decide(
            rec.task_id,
            "publish",
            version,
            f"candidate v{version} ({note}) as canary at {self.config.shares[0]:g}%",
        )

    def _set_canary(self, rec: Recovery, version: int) -> None:
        share = self.config.shares[rec.share_index]
        for control in self.controls:
            control.set_canary(rec.task_id, version, share)
        rec.canary = version
        rec.reset_counts()
        self.metrics.canary_percent.labels(task=rec.task_id).set(share)

    def _clear_canary(self, rec: Recovery) -> None:
        for control in self.controls:
            control.clear_canary(rec.task_id)
        rec.canary = 0
        rec.share_index = 0
        rec.reset_counts()
        self.metrics.canary_percent.labels(task=rec.task_id).set(0)

    def _promote(self, rec: Recovery, detail: str) -> None:
        version = rec.canary
        # The bundle's pointer first, then the servers: a bundle watch that read the old pointer cannot
        # undo the promotion (it stands down when the server activated something after its read).
        self.bundle.set_active_version(rec.task_id, version)
        for control in self.controls:
            try:
                control.promote_canary(rec.task_id, version)
            except PolyheadError:
                # A server watching the bundle may have followed the new pointer first: activating the
                # canary promoted it there already. Anything else is a real refusal.
                if control.versions(rec.task_id)[1] != version:
                    raise
        self.state.recovered[rec.task_id] = version
        promoted_mean = float(np.mean(rec.canary_returns)) if rec.canary_returns else math.nan
        bar = self.config.recover_fraction * rec.target
        if math.isfinite(bar) and promoted_mean < bar and not self._exhausted(rec):
            # Better than the broken head, not yet back: it serves now, and training goes on from it with
            # all of the task's traffic (its own episodes) instead of a canary's share.
            previous = rec.stable_version
            self._decide(
                rec.task_id,
                "promote",
                version,
                f"canary v{version} promoted over v{previous}: {detail}; {promoted_mean:.1f} is below "
                f"{self.config.recover_fraction:g} x the pre-change reference {rec.target:.1f}: training "
                "goes on",
            )
            rec.stable_version = version
            rec.canary = 0
            rec.share_index = 0
            rec.phase = "training"
            rec.reset_counts()
            self.metrics.canary_percent.labels(task=rec.task_id).set(0)
            return
        self._end(
            rec.task_id,
            "promote",
            version,
            f"canary v{version} promoted over v{rec.stable_version}: {detail}",
        )

    def _rollback(self, rec: Recovery, detail: str) -> None:
        version = rec.canary
        self._clear_canary(rec)
        rec.rolled_back.append(version)
        rec.phase = "training"
        self._decide(rec.task_id, "rollback", version, f"canary v{version} rolled back: {detail}")
        self.updater_metrics.rollbacks.labels(task=rec.task_id).inc()

    def _give_up(self, rec: Recovery) -> None:
        if rec.canary:
            self._clear_canary(rec)
        self.state.gave_up[rec.task_id] = rec.stable_version
        self.metrics.gave_up.labels(task=rec.task_id).set(1)
        self._end(
            rec.task_id,
            "give_up",
            rec.stable_version,
            f"budget spent with stable v{rec.stable_version} serving ({rec.samples} samples, "
            f"{len(rec.candidates)} candidates, {len(rec.rolled_back)} rolled back"
            + (
                f"; v{rec.stable_version} was promoted but stays below {self.config.recover_fraction:g} x "
                f"the pre-change reference {rec.target:.1f})"
                if rec.stable_version in rec.candidates
                else "; no candidate beat it)"
            ),
        )

    def _end(self, task_id: str, decision: str, version: int, detail: str) -> None:
        rec = self.state.recoveries.pop(task_id)
        if decision == "abandon" and rec.canary:
            self._clear_canary(rec)
        live = self.live.pop(task_id, None)
        if live is not None:
            for feed in live.feeds:
                feed.close()
        self.metrics.recovering.labels(task=task_id).set(0)
        self.metrics.canary_percent.labels(task=task_id).set(0)
        self._decide(task_id, decision, version, detail)

    def _decide(self, task_id: str, decision: str, version: int, detail: str) -> None:
        d = Decision(task_id, decision, version, detail)
        self.decisions.append(d)
        self.metrics.decisions.labels(task=task_id, decision=decision).inc()
        log.warning("%s: %s v%d: %s", task_id, decision, version, detail)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with (self.state_dir / DECISIONS_FILE).open("a", encoding="utf-8") as out:
            out.write(json.dumps(asdict(d)) + "\n")
        if self.on_decision is not None:
            self.on_decision(d)

    # --- helpers --------------------------------------------------------------------------------------
    def _tasks(self) -> dict[str, list[RemoteTask]]:
        """Every task's view on every replica that answers (a replica down is skipped this poll)."""
        out: dict[str, list[RemoteTask]] = {}
        for client in self.clients:
            try:
                catalog = client.list_tasks(refresh=True)
            except Exception as exc:  # a replica down or restarting: the others still count
                log.warning("ListTasks on %s failed: %s", client, exc)
                continue
            for task_id, task in catalog.tasks.items():
                out.setdefault(task_id, []).append(task)
        return out

    def _live(self, rec: Recovery) -> _Live:
        found = self.live.get(rec.task_id)
        if found is not None:
            return found
        task_id = rec.task_id
        record = self.bundle.head(task_id)
        meta = record.meta
        # A task that shares its encoder with others publishes that encoder unchanged (it stays frozen).
        shared = None if self.policy.owns_encoder(task_id) else self._first_encoder(task_id)
        publisher = HeadPublisher(
            bundle=self.bundle,
            policy=self.policy,
            task=meta.task,
            observation_space=meta.observation_space,
            parity_observations=sample_observations(
                [meta.task], self.policy.observation_size, steps_per_task=64, seed=self.config.ppo.seed
            ),
            metrics=self.updater_metrics,
            control=None,
            exporter=self.config.exporter,
            shared_encoder=shared,
        )
        live = _Live(publisher=publisher)
        live.feeds = [control.experience(task_id) for control in self.controls]
        if rec.candidates:
            # Restarted: the learner continues from the newest candidate that was not rolled back.
            kept = [v for v in rec.candidates if v not in rec.rolled_back] or rec.candidates
            self.policy.adapter(task_id).load_state_dict(self._load_version(task_id, kept[-1]))
            self._check_servers(rec)
        self.live[task_id] = live
        return live

    def _check_servers(self, rec: Recovery) -> None:
        """On resume: the servers' canary must be the one the state names; a server restarted meanwhile
        (its canary lost) gets it back at the recorded share."""
        if not rec.canary:
            return
        for task in self._tasks().get(rec.task_id, []):
            if (
                task.canary_version != rec.canary
                or task.canary_percent != self.config.shares[rec.share_index]
            ):
                log.warning(
                    "%s: a server has canary v%d at %g%%; restoring v%d at %g%%",
                    rec.task_id,
                    task.canary_version,
                    task.canary_percent,
                    rec.canary,
                    self.config.shares[rec.share_index],
                )
                counts = (rec.canary_returns, rec.stable_returns)
                self._set_canary(rec, rec.canary)
                rec.canary_returns, rec.stable_returns = counts
                break

    def _count_returns(self, rec: Recovery, segments: list[SegmentData]) -> None:
        for seg in segments:
            if math.isnan(seg.episode_return) or seg.head_versions[0] != seg.head_versions[-1]:
                continue
            if len(set(seg.head_versions)) != 1:
                continue
            version = seg.head_versions[0]
            if rec.canary and version == rec.canary:
                rec.canary_returns.append(float(seg.episode_return))
            elif version == rec.stable_version:
                rec.stable_returns.append(float(seg.episode_return))

    def _fresh_state(self, task_id: str) -> dict[str, torch.Tensor]:
        """A fresh head (seeded as adapt seeds it) on the task's shipped encoder, as an adapter state."""
        with torch.random.fork_rng():
            torch.manual_seed(self.config.ppo.seed)
            critic_input = self.policy.encoder_of(task_id).input_size
            fresh = TaskHead(self.policy.action_spaces[task_id], critic_input, self.policy.config)
        state = {f"head.{k}": v for k, v in fresh.state_dict().items()}
        state.update({k: v.clone() for k, v in self._shipped[task_id].items() if k.startswith("encoder.")})
        return state

    def _first_encoder(self, task_id: str) -> bytes | None:
        return self.bundle.head(task_id, self.bundle.versions(task_id)[0]).read_encoder()

    def _known_state(self, task_id: str, version: int) -> dict[str, torch.Tensor] | None:
        """The torch parameters of a served version: one this controller published, or the version the
        bundle's trunk checkpoint shipped with (version 1). None when unknown."""
        path = self.state_dir / task_id / f"v{version}.pt"
        if path.is_file():
            return self._load_version(task_id, version)
        if version == 1 and task_id in self._shipped:
            return self._shipped[task_id]
        return None

    def _load_version(self, task_id: str, version: int) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = torch.load(
            self.state_dir / task_id / f"v{version}.pt", weights_only=True
        )
        return state

    def summary(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for d in self.decisions:
            counts[d.decision] = counts.get(d.decision, 0) + 1
        return {
            "state_dir": str(self.state_dir),
            "decisions": counts,
            "recovering": {
                t: {"phase": r.phase, "candidates": r.candidates, "canary": r.canary, "samples": r.samples}
                for t, r in self.state.recoveries.items()
            },
            "recovered": self.state.recovered,
            "gave_up": self.state.gave_up,
        }

    def close(self) -> None:
        self.state.save(self.state_dir / STATE_FILE)
        for live in self.live.values():
            for feed in live.feeds:
                feed.close()
        self.live.clear()
        for control in self.controls:
            control.close()
        for client in self.clients:
            client.close()


def default_config(**changes: Any) -> OperateConfig:
    """An OperateConfig from keyword arguments, with ``ppo`` given as a dict of PPOConfig changes."""
    ppo_changes = changes.pop("ppo", {})
    return OperateConfig(ppo=replace(ADAPT_PPO, **ppo_changes), **changes)
