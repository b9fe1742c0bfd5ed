"""The bundle watch: replicas sharing one bundle follow what the online updater publishes there.

Every ``interval_s`` it polls the bundle (a directory listing and one small JSON read per task) and, through
the registry's ordinary load path (same validation, warm-up and metrics, source ``"watch"``):

* stages every complete version directory that appeared since the last poll;
* when ``heads/<task>/active.json`` names another version than at the last poll, loads it if needed and
  activates it (so an admin's ``SetActiveVersion`` on one replica is not undone until the bundle's
  pointer itself changes);
* a task directory that appears is loaded like at startup.

A version that fails to load is counted in ``polyhead_head_load_failures_total`` and not retried.
"""

from __future__ import annotations

import functools
import logging
import threading

from prometheus_client import Counter, Gauge

from polyhead.bundle import MANIFEST
from polyhead.errors import BundleNotFound, PolyheadError
from polyhead.server.registry import HeadRegistry

log = logging.getLogger(__name__)


class BundleWatcher:
    """Polls ``registry.bundle`` in a daemon thread; :meth:`poll` is also callable directly (tests).

    A poll that fails (the bundle directory unreadable) counts in ``failures`` and sets ``failing`` to 1
    until a poll succeeds (both optional); its error is logged with a traceback once, repeats of the same
    error only at DEBUG, and the recovery once.
    """

    def __init__(
        self,
        registry: HeadRegistry,
        *,
        interval_s: float,
        failures: Counter | None = None,
        failing: Gauge | None = None,
    ) -> None:
        self.registry = registry
        self.interval_s = interval_s
        self._failures = failures
        self._failing_gauge = failing
        self._failing: str | None = None  # the error of the last poll, while polls fail
        self._seen: dict[str, set[int]] = {}
        self._pointer: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._poll_lock = threading.Lock()
        self.prime()

    def _unchanged(self, task_id: str, activations: int) -> bool:
        return self.registry.activations(task_id) == activations

    def prime(self) -> None:
        """Record what is on disk now, so only later changes are acted on."""
        bundle = self.registry.bundle
        for task_id in bundle.task_ids():
            versions = bundle.versions(task_id)
            if versions:
                self._seen[task_id] = set(versions)
                self._pointer[task_id] = bundle.active_version(task_id)

    def poll(self) -> int:
        """One pass over the bundle; returns how many load/activate actions it took."""
        with self._poll_lock:
            return self._poll()

    def _poll(self) -> int:
        bundle = self.registry.bundle
        if not (bundle.root / MANIFEST).is_file():
            # A lost volume or a replaced directory reads as "no heads": say so instead of seeing nothing.
            raise BundleNotFound(
                f"bundle {bundle.root} has no {MANIFEST} any more (volume unmounted or directory replaced?); "
                "serving what is loaded"
            )
        actions = 0
        for task_id in bundle.task_ids():
            versions = bundle.versions(task_id)
            if not versions:
                continue
            seen = self._seen.setdefault(task_id, set())
            loaded = self.registry.tasks.get(task_id)
            for version in sorted(set(versions) - seen):
                seen.add(version)
                if loaded is not None and version in loaded.versions:
                    continue
                try:
                    self.registry.load_from_bundle(task_id, version, activate=False, source="watch")
                    actions += 1
                except PolyheadError as exc:
                    log.warning(
                        "watch: task %s version %d not loaded: %s: %s",
                        task_id,
                        version,
                        type(exc).__name__,
                        exc,
                    )
            # What this server has activated so far, read before the pointer: a writer that activates
            # something after our read (an updater rolling back moves the pointer, then calls the server)
            # makes the swap below stand down instead of reinstating the pointer we read.
            activations = self.registry.activations(task_id)
            pointer = bundle.active_version(task_id)
            if self._pointer.get(task_id) == pointer:
                continue
            self._pointer[task_id] = pointer
            entry = self.registry.tasks.get(task_id)
            try:
                if entry is None:
                    self.registry.load_from_bundle(task_id, pointer, activate=True, source="watch")
                else:
                    if pointer not in entry.versions:
                        self.registry.load_from_bundle(task_id, pointer, activate=False, source="watch")
                    swapped = self.registry.set_active_if(
                        task_id, pointer, functools.partial(self._unchanged, task_id, activations)
                    )
                    if swapped is None:
                        self._pointer.pop(task_id, None)  # re-read on the next poll
                        continue
                actions += 1
                log.info("watch: task %s now serves version %d (bundle pointer)", task_id, pointer)
            except PolyheadError as exc:
                # A version that cannot be loaded or activated is not retried (until the pointer moves).
                log.warning(
                    "watch: task %s: could not activate version %d: %s: %s",
                    task_id,
                    pointer,
                    type(exc).__name__,
                    exc,
                )
            except BaseException:
                self._pointer.pop(task_id, None)  # a filesystem error: try this pointer again next poll
                raise
        return actions

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="polyhead-bundle-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception as exc:  # a transient filesystem error must not end the watch
                self._poll_failed(exc)
            else:
                if self._failing is not None:
                    log.info("watch: bundle %s readable again", self.registry.bundle.root)
                    self._failing = None
                    if self._failing_gauge is not None:
                        self._failing_gauge.set(0)

    def _poll_failed(self, exc: Exception) -> None:
        if self._failures is not None:
            self._failures.inc()
        if self._failing_gauge is not None:
            self._failing_gauge.set(1)
        error = f"{type(exc).__name__}: {exc}"
        if error == self._failing:
            log.debug("watch: poll failed again: %s", error)
            return
        self._failing = error
        log.error(
            "watch: polling bundle %s failed (retried every %.1f s; repeats of this error are logged at "
            "DEBUG)",
            self.registry.bundle.root,
            self.interval_s,
            exc_info=exc,
        )

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
