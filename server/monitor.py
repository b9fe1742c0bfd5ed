"""Per-version live returns and the live-return monitor, fed by the experience hub's completed episodes.

For every completed episode played by one head version, the return is observed in
``polyhead_version_episode_return{task,version}`` (its ``_count`` is the version's episode count). Episodes
of the task's stable version also go to the task's :class:`polyhead.livewatch.TaskMonitor`; a significant
drop sets ``polyhead_task_regressed{task}`` to 1 (and a recovery, or a new stable version, back to 0),
counts ``polyhead_regression_events_total{task,kind}`` and logs the test's numbers. The test and its
false-alarm rate are those of :mod:`polyhead.livewatch`.

Runs on the event loop (the hub calls it); it reads the registry's lock-free snapshot.
"""

from __future__ import annotations

import logging
from typing import Any

from polyhead.livewatch import LiveMonitor, MonitorConfig, TaskMonitor
from polyhead.server.experience import EpisodeEnd
from polyhead.server.metrics import ServerMetrics
from polyhead.server.registry import HeadRegistry

log = logging.getLogger(__name__)


class LiveReturnWatch:
    """Episode listener: per-version return metrics and the regression monitor of every task."""

    def __init__(self, registry: HeadRegistry, metrics: ServerMetrics, config: MonitorConfig) -> None:
        self.registry = registry
        self.metrics = metrics
        self.monitor = LiveMonitor(config)
        self._returns: dict[tuple[str, int], Any] = {}

    def state(self, task_id: str) -> TaskMonitor | None:
        """The task's monitor when it watches the task's current stable version, else None."""
        entry = self.registry.tasks.get(task_id)
        found = self.monitor.tasks.get(task_id)
        if entry is None or found is None or found.version != entry.active:
            return None
        return found

    def regressed(self, task_id: str) -> bool:
        found = self.state(task_id)
        return found is not None and found.regressed

    def on_episode(self, end: EpisodeEnd) -> None:
        if len(end.versions) != 1:
            return  # a mixed episode judges no version
        (version,) = end.versions
        key = (end.task_id, version)
        child = self._returns.get(key)
        if child is None:
            child = self._returns[key] = self.metrics.version_episode_return.labels(
                task=end.task_id, version=str(version)
            )
        child.observe(end.episode_return)
        entry = self.registry.tasks.get(end.task_id)
        if entry is None:
            return
        task = self.monitor.task(end.task_id)
        was_regressed = task.regressed
        if task.version != entry.active:
            task.set_stable(entry.active, entry.active_head.eval_return)
            if was_regressed:
                self.metrics.task_regressed.labels(task=end.task_id).set(0)
                log.info(
                    "task %s: regression state cleared: version %d is stable now", end.task_id, entry.active
                )
        event = task.observe(version, end.episode_return)
        if event is None:
            return
        kind = "regressed" if event.regressed else "recovered"
        self.metrics.task_regressed.labels(task=end.task_id).set(int(event.regressed))
        self.metrics.regression_events.labels(task=end.task_id, kind=kind).inc()
        (log.warning if event.regressed else log.info)("%s", event.describe())
