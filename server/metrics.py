"""The server's Prometheus metrics, built on an injected ``CollectorRegistry`` (never the global one).

Names and labels are a contract with the dashboards and alerts in ``deploy/`` and are listed with their
meaning in ``docs/metrics.md``. Every metric about a task carries the ``task`` label.

The metrics observed on every request or pass (request counts and durations, queue wait, trunk and head
pass times, batch sizes, per-version act time) are :class:`HotHistogram` / :class:`HotCounter`: plain
Python counts and sums, no lock, exported under the same names, labels and buckets by one collector
(:class:`HotMetrics`). Each of their label children is written by one thread at a time: request metrics on
the event-loop thread, pass metrics by whichever thread runs the pass, and one pass runs at a time. A scrape
reads them from the HTTP thread; it may see an observation's bucket before its sum, never a torn number.

The per-task metrics (head loads and swaps, rejections, experience, episode summaries, the head gauges)
are the same kind of entries with ``locked=True``: a series costs a slotted object in a dict rather than
prometheus_client's child with its own locks and value objects, which at 10,000 tasks was most of a
head's load time and memory beyond its weights. Their writers are several threads (head loads run in
executor threads), so each family's writes share one lock; a gauge's ``set`` is one assignment and takes none.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

# 50 µs .. 2.5 s: a small policy's inference is tens of µs, a gRPC round trip hundreds.
LATENCY_BUCKETS = (
    0.00005,
    0.0001,
    0.0002,
    0.0003,
    0.0005,
    0.00075,
    0.001,
    0.0015,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
SWAP_BUCKETS = (0.000001, 0.00001, 0.0001, 0.001, 0.01, 0.1, 1.0)


class _HistogramChild:
    __slots__ = ("_bounds", "counts", "created", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket (not cumulative); the last is +Inf
        self.sum = 0.0
        self.created = time.time()

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self._bounds, value)] += 1  # bucket ``le`` holds values <= le
        self.sum += value


class _CounterChild:
    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class _LockedHistogramChild(_HistogramChild):
    __slots__ = ("_lock",)

    def __init__(self, bounds: Sequence[float], lock: threading.Lock) -> None:
        super().__init__(bounds)
        self._lock = lock

    def observe(self, value: float) -> None:
        with self._lock:
            super().observe(value)


class _LockedCounterChild(_CounterChild):
    __slots__ = ("_lock",)

    def __init__(self, lock: threading.Lock) -> None:
        super().__init__()
        self._lock = lock

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:  # prometheus_client's contract: a counter never goes down
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        with self._lock:
            self.value += amount


class _GaugeChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def set(self, value: float) -> None:
        self.value = float(value)


class _SummaryChild:
    __slots__ = ("_lock", "count", "created", "sum")

    def __init__(self, lock: threading.Lock) -> None:
        self.count = 0
        self.sum = 0.0
        self.created = time.time()
        self._lock = lock

    def observe(self, value: float) -> None:
        with self._lock:
            self.count += 1
            self.sum += value


class HotHistogram:
    """A histogram with prometheus_client's ``labels(...).observe(v)`` / ``observe(v)`` interface and
    exposition, without its per-observation lock (see the module docstring for who may write)."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float],
        locked: bool = False,
    ):
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._bounds = tuple(float(b) for b in buckets)
        self._les = [*(floatToGoString(b) for b in self._bounds), "+Inf"]  # type: ignore[no-untyped-call]
        self._lock = threading.Lock() if locked else None
        self._children: dict[tuple[str, ...], _HistogramChild] = {}
        if not self.labelnames:
            self._children[()] = self._new_child()

    def _new_child(self) -> _HistogramChild:
        if self._lock is None:
            return _HistogramChild(self._bounds)
        return _LockedHistogramChild(self._bounds, self._lock)

    def labels(self, **labels: str) -> _HistogramChild:
        key = tuple(str(labels[n]) for n in self.labelnames)
        child = self._children.get(key)
        if child is None:
            child = self._children.setdefault(key, self._new_child())
        return child

    def observe(self, value: float) -> None:
        self._children[()].observe(value)

    def family(self, *, with_samples: bool = True) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        if not with_samples:
            return family
        for key, child in list(self._children.items()):
            counts = list(child.counts)  # a copy: an observation may land while we sum
            cumulative = 0
            buckets = []
            for le, n in zip(self._les, counts, strict=True):
                cumulative += n
                buckets.append((le, float(cumulative)))
            family.add_metric(list(key), buckets, child.sum)
            family.samples.append(
                Sample(f"{self.name}_created", dict(zip(self.labelnames, key, strict=True)), child.created)
            )
        return family


class HotCounter:
    """A counter with prometheus_client's ``labels(...).inc()`` interface and exposition, lock-free."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], *, locked: bool = False):
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock() if locked else None
        self._children: dict[tuple[str, ...], _CounterChild] = {}

    def labels(self, **labels: str) -> _CounterChild:
        key = tuple(str(labels[n]) for n in self.labelnames)
        child = self._children.get(key)
        if child is None:
            new = _CounterChild() if self._lock is None else _LockedCounterChild(self._lock)
            child = self._children.setdefault(key, new)
        return child

    def family(self, *, with_samples: bool = True) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        if with_samples:
            for key, child in list(self._children.items()):
                family.add_metric(list(key), child.value, created=child.created)
        return family


class HotGauge:
    """A labelled gauge with prometheus_client's ``labels(...).set(v)`` / ``remove(...)`` interface and
    exposition (only ``set``: what the server's per-task gauges need)."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str]):
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], _GaugeChild] = {}

    def labels(self, **labels: str) -> _GaugeChild:
        key = tuple(str(labels[n]) for n in self.labelnames)
        child = self._children.get(key)
        if child is None:
            child = self._children.setdefault(key, _GaugeChild())
        return child

    def remove(self, *labelvalues: str) -> None:
        """Drop a series; one that does not exist is no error (as in prometheus_client)."""
        self._children.pop(tuple(str(v) for v in labelvalues), None)

    def family(self, *, with_samples: bool = True) -> Metric:
        family = GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)
        if with_samples:
            for key, child in list(self._children.items()):
                family.add_metric(list(key), child.value)
        return family


class HotSummary:
    """A labelled summary (count and sum, no quantiles: prometheus_client's ``Summary``) with its
    ``labels(...).observe(v)`` interface and exposition."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str]):
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()
        self._children: dict[tuple[str, ...], _SummaryChild] = {}

    def labels(self, **labels: str) -> _SummaryChild:
        key = tuple(str(labels[n]) for n in self.labelnames)
        child = self._children.get(key)
        if child is None:
            child = self._children.setdefault(key, _SummaryChild(self._lock))
        return child

    def family(self, *, with_samples: bool = True) -> Metric:
        family = SummaryMetricFamily(self.name, self.documentation, labels=self.labelnames)
        if with_samples:
            for key, child in list(self._children.items()):
                with self._lock:  # count and sum of the same observations
                    count, total = child.count, child.sum
                family.add_metric(list(key), count, total)
                family.samples.append(
                    Sample(
                        f"{self.name}_created", dict(zip(self.labelnames, key, strict=True)), child.created
                    )
                )
        return family


class HotMetrics:
    """The collector that exports every hot metric (registered once on the server's registry)."""

    def __init__(self, metrics: Sequence[HotHistogram | HotCounter | HotGauge | HotSummary]) -> None:
        self._metrics = tuple(metrics)

    def describe(self) -> Iterator[Metric]:
        for metric in self._metrics:
            yield metric.family(with_samples=False)

    def collect(self) -> Iterator[Metric]:
        for metric in self._metrics:
            yield metric.family()


class ServerMetrics:
    """Every metric the server exports, registered on ``registry`` at construction."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        r = registry
        # --- requests ---
        self.requests = HotCounter(
            "polyhead_requests",
            "RPCs (and ActStream messages) by method, task and gRPC status code",
            ["method", "task", "code"],
        )
        self.request_duration = HotHistogram(
            "polyhead_request_duration_seconds",
            "End-to-end handling time of an RPC / stream message",
            ["method", "task"],
            buckets=LATENCY_BUCKETS,
        )
        self.queue_wait = HotHistogram(
            "polyhead_queue_wait_seconds",
            "Time a request waited in the batch queue before inference",
            ["task"],
            buckets=LATENCY_BUCKETS,
        )
        self.trunk_seconds = HotHistogram(
            "polyhead_trunk_seconds", "Duration of one trunk pass", buckets=LATENCY_BUCKETS
        )
        self.head_seconds = HotHistogram(
            "polyhead_head_seconds",
            "Duration of one head pass (one task's rows of a batch)",
            ["task"],
            buckets=LATENCY_BUCKETS,
        )
        self.batch_size = HotHistogram(
            "polyhead_batch_size", "Observations per trunk pass", buckets=BATCH_BUCKETS
        )
        self.batch_requests = HotHistogram(
            "polyhead_batch_requests", "Requests per trunk pass", buckets=BATCH_BUCKETS
        )
        self.batch_encoders = HotHistogram(
            "polyhead_batch_encoders",
            "Distinct task encoders run before one trunk pass (0 for a format-1 bundle)",
            buckets=BATCH_BUCKETS,
        )
        self.queue_depth = Gauge(
            "polyhead_queue_depth",
            "Requests waiting for inference",
            registry=r,
        )
        self.expired = HotCounter(
            "polyhead_expired_requests",
            "Requests dropped before inference because their deadline passed",
            ["task"],
            locked=True,
        )
        self.rejected = HotCounter(
            "polyhead_rejected_requests",
            "Requests refused with RESOURCE_EXHAUSTED: the queue was full or too many calls were in progress",
            ["task"],
            locked=True,
        )
        # --- heads ---
        self.active_head_version = HotGauge(
            "polyhead_active_head_version",
            "Head version serving the task",
            ["task"],
        )
        self.loaded_heads = HotGauge(
            "polyhead_loaded_heads",
            "Head versions loaded for the task",
            ["task"],
        )
        self.canary_version = HotGauge(
            "polyhead_canary_version",
            "Canary head version of the task (0: no canary)",
            ["task"],
        )
        self.canary_percent = HotGauge(
            "polyhead_canary_percent",
            "Share of the task's traffic routed to its canary, in percent",
            ["task"],
        )
        self.head_loads = HotCounter(
            "polyhead_head_loads",
            "Head versions loaded, by source (bundle, upload, watch)",
            ["task", "source"],
            locked=True,
        )
        self.head_load_failures = HotCounter(
            "polyhead_head_load_failures",
            "Head loads refused, by reason (the error class)",
            ["task", "reason"],
            locked=True,
        )
        self.watch_failures = Counter(
            "polyhead_bundle_watch_failures",
            "Bundle watch polls that failed (the bundle directory unreadable: a lost volume, permissions)",
            registry=r,
        )
        self.watch_failing = Gauge(
            "polyhead_bundle_watch_failing",
            "1 while the bundle watch's last poll failed, else 0",
            registry=r,
        )
        self.head_load_seconds = HotHistogram(
            "polyhead_head_load_seconds",
            "Validate + session build + warm-up time of a head load",
            ["task"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
            locked=True,
        )
        self.head_swaps = HotCounter(
            "polyhead_head_swaps",
            "Changes of the active head version",
            ["task"],
            locked=True,
        )
        self.head_swap_seconds = HotHistogram(
            "polyhead_head_swap_seconds",
            "Time to switch the active version (lock + reference swap)",
            ["task"],
            buckets=SWAP_BUCKETS,
            locked=True,
        )
        # --- experience ---
        self.episode_return = HotSummary(
            "polyhead_episode_return",
            "Returns of completed episodes reported to the server",
            ["task"],
        )
        self.episode_return_last = HotGauge(
            "polyhead_episode_return_last",
            "Return of the latest completed episode",
            ["task"],
        )
        self.episode_length = HotSummary(
            "polyhead_episode_length",
            "Steps of completed episodes reported to the server",
            ["task"],
        )
        self.experience_steps = HotCounter(
            "polyhead_experience_steps",
            "Rewarded steps assembled into episodes",
            ["task"],
            locked=True,
        )
        self.experience_dropped = HotCounter(
            "polyhead_experience_dropped",
            "Experience refused at the edge (invalid_reward, invalid_action, invalid_log_prob, "
            "unknown_version, invalid_observation, invalid_step) or not assembled or delivered "
            "(unknown_episode, no_action, stale_step, duplicate_action, missing_reward, expired, evicted, "
            "subscriber_full)",
            ["task", "reason"],
            locked=True,
        )
        self.experience_segments = HotCounter(
            "polyhead_experience_segments",
            "Episode segments published to StreamExperience subscribers",
            ["task"],
            locked=True,
        )
        self.version_episode_return = HotSummary(
            "polyhead_version_episode_return",
            "Returns of completed episodes played entirely by one head version (_count: their number)",
            ["task", "version"],
        )
        self.version_act_seconds = HotHistogram(
            "polyhead_version_act_seconds",
            "Inference time (queue, trunk and head) of requests served by one head version",
            ["task", "version"],
            buckets=LATENCY_BUCKETS,
        )
        self.task_regressed = HotGauge(
            "polyhead_task_regressed",
            "1 while the live-return monitor finds the task's stable version worse than its own reference",
            ["task"],
        )
        self.regression_events = HotCounter(
            "polyhead_regression_events",
            "Live-return monitor state changes, by kind (regressed, recovered)",
            ["task", "kind"],
            locked=True,
        )
        self.open_episodes = Gauge(
            "polyhead_open_episodes",
            "Episodes being assembled",
            registry=r,
        )
        self.experience_subscribers = Gauge(
            "polyhead_experience_subscribers",
            "Open StreamExperience calls",
            registry=r,
        )
        registry.register(
            HotMetrics(
                [
                    self.requests,
                    self.request_duration,
                    self.queue_wait,
                    self.trunk_seconds,
                    self.head_seconds,
                    self.batch_size,
                    self.batch_requests,
                    self.batch_encoders,
                    self.version_act_seconds,
                ]
            )
        )
        registry.register(
            HotMetrics(
                [
                    self.expired,
                    self.rejected,
                    self.active_head_version,
                    self.loaded_heads,
                    self.canary_version,
                    self.canary_percent,
                    self.head_loads,
                    self.head_load_failures,
                    self.head_load_seconds,
                    self.head_swaps,
                    self.head_swap_seconds,
                    self.episode_return,
                    self.episode_return_last,
                    self.episode_length,
                    self.experience_steps,
                    self.experience_dropped,
                    self.experience_segments,
                    self.version_episode_return,
                    self.task_regressed,
                    self.regression_events,
                ]
            )
        )
        # --- identity ---
        self.server_info = Gauge(
            "polyhead_server_info",
            "Always 1; labels name the polyhead version and the serving trunk",
            ["version", "trunk_sha256"],
            registry=r,
        )

    def init_task(self, task_id: str) -> None:
        """Create a task's counters at 0, so its series exist before the first event."""
        for counter in (
            self.rejected,
            self.expired,
            self.head_swaps,
            self.experience_steps,
            self.experience_segments,
        ):
            counter.labels(task=task_id)
        self.episode_return.labels(task=task_id)
        self.episode_length.labels(task=task_id)
        self.task_regressed.labels(task=task_id).set(0)
        for kind in ("regressed", "recovered"):
            self.regression_events.labels(task=task_id, kind=kind)


@dataclass
class MetricsHTTPServer:
    """The /metrics HTTP endpoint, running in its own daemon thread."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> MetricsHTTPServer:
    """Start the /metrics endpoint for ``registry`` on ``host:port`` (0: a free port)."""
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsHTTPServer(server=server, thread=thread)
