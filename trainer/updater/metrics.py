"""The online updater's Prometheus metrics, built on an injected registry (never the global one).

Names are fixed: deploy/'s dashboard and alert rules query them.

* ``polyhead_updater_versions_published_total{task}``: head versions published (bundle + server);
* ``polyhead_updater_rollbacks_total{task}``: automatic rollbacks by the guarded rollout;
* ``polyhead_updater_eval_return{task}``: deterministic evaluation return of the last published version;
* ``polyhead_updater_last_publish_timestamp_seconds{task}``: when the last version was published;
* ``polyhead_updater_samples_total{task}``: new-task environment steps trained on;
* ``polyhead_updater_dropped_samples_total{task,reason}``: remote steps not trained on (``stale``: from a
  version older than the allowed lag or rolled back; ``unknown_version``: from a version this updater did
  not publish; ``deterministic``: mode actions, not samples; ``non_finite``, ``invalid_action``,
  ``malformed``: experience the server should have refused, skipped by the updater's own check);
* ``polyhead_updater_updates_total{task}``: PPO updates of the head.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from polyhead.errors import UsageError


class UpdaterMetrics:
    """Every updater metric, registered on ``registry``; children are created (at 0) per task."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.versions_published = Counter(
            "polyhead_updater_versions_published_total",
            "Head versions published by the online updater",
            ["task"],
            registry=r,
        )
        self.rollbacks = Counter(
            "polyhead_updater_rollbacks_total",
            "Automatic rollbacks to the previous head version after a live-return regression",
            ["task"],
            registry=r,
        )
        self.eval_return = Gauge(
            "polyhead_updater_eval_return",
            "Deterministic evaluation return of the last published head version",
            ["task"],
            registry=r,
        )
        self.last_publish = Gauge(
            "polyhead_updater_last_publish_timestamp_seconds",
            "Unix time of the last head version the updater published",
            ["task"],
            registry=r,
        )
        self.samples = Counter(
            "polyhead_updater_samples_total", "New-task environment steps trained on", ["task"], registry=r
        )
        self.dropped = Counter(
            "polyhead_updater_dropped_samples_total",
            "Remote experience steps not trained on, by reason",
            ["task", "reason"],
            registry=r,
        )
        self.updates = Counter(
            "polyhead_updater_updates_total", "PPO updates of the new task's head", ["task"], registry=r
        )
        self._http: object | None = None
        self._http_thread: threading.Thread | None = None

    def init_task(self, task_id: str) -> None:
        """Create every child of ``task_id`` at 0 so dashboards see the series before the first event."""
        for metric in (self.versions_published, self.rollbacks, self.samples, self.updates):
            metric.labels(task=task_id)
        for reason in (
            "stale",
            "unknown_version",
            "deterministic",
            "non_finite",
            "invalid_action",
            "malformed",
        ):
            self.dropped.labels(task=task_id, reason=reason)

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Serve ``/metrics`` over HTTP on ``port`` (0: a free one); returns the bound port. UsageError
        (naming --metrics-port) when the port is taken."""
        try:
            server, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise UsageError(
                f"cannot listen on {host}:{port} (--metrics-port): {exc.strerror or exc}; stop what holds "
                "the port or choose another (0 picks a free port)"
            ) from exc
        self._http, self._http_thread = server, thread
        return int(server.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()  # type: ignore[attr-defined]
            self._http.server_close()  # type: ignore[attr-defined]
            self._http = None
