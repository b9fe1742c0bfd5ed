"""A fleet of simulator clients acting on one task until told to stop (tests, benchmarks, the demo).

Each client is a thread running :func:`polyhead.clients.simulator.run_simulation` (a real gRPC client of the
data
plane, sampled actions, rewards reported) in rounds of a few episodes, so it keeps acting while the
updater publishes versions. A client waits for the task to be served before its first round (the updater
registers the task when it publishes version 1). Failed requests and every head version seen are summed
over all rounds. ``task_spec`` makes the clients build their environments from another spec with the same
spaces (a world that changed under the served task: what the guarded rollout exists for).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from polyhead.clients.errors import PolicyClientError, TaskNotFound
from polyhead.clients.policy_client import PolicyClient
from polyhead.clients.simulator import SimulationConfig, run_simulation
from polyhead.taskspec import TaskSpec

log = logging.getLogger("polyhead.trainer.adapt")


@dataclass
class FleetStats:
    """Totals over every round of every client."""

    episodes: int = 0
    steps: int = 0
    failed_requests: int = 0
    requests: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    versions_seen: set[int] = field(default_factory=set)
    returns: list[tuple[float, tuple[int, ...], float]] = field(default_factory=list)  # (time, versions, R)


class SimulatorFleet:
    """``clients`` simulator threads on ``task_id`` at ``target``; a context manager that stops them."""

    def __init__(
        self,
        target: str,
        task_id: str,
        *,
        clients: int = 4,
        envs_per_client: int = 1,
        episodes_per_round: int = 4,
        mode: str = "unary",
        seed: int = 0,
        wait_s: float = 120.0,
        task_spec: TaskSpec | None = None,
    ) -> None:
        self.target = target
        self.task_id = task_id
        self.clients = clients
        self.envs_per_client = envs_per_client
        self.episodes_per_round = episodes_per_round
        self.mode = mode
        self.seed = seed
        self.wait_s = wait_s
        self.task_spec = task_spec
        self.stats = FleetStats()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.failures: list[BaseException] = []

    def _wait_served(self) -> bool:
        deadline = time.monotonic() + self.wait_s
        with PolicyClient(self.target, timeout=5.0) as client:
            while not self._stop.is_set() and time.monotonic() < deadline:
                try:
                    client.task(self.task_id)
                    return True
                except (TaskNotFound, PolicyClientError):
                    self._stop.wait(0.2)
        return False

    def _client(self, index: int) -> None:
        try:
            if not self._wait_served():
                return
            round_no = 0
            while not self._stop.is_set():
                config = SimulationConfig(
                    task_id=self.task_id,
                    episodes=self.episodes_per_round,
                    envs=self.envs_per_client,
                    deterministic=False,
                    seed=self.seed + 100_000 * index + self.episodes_per_round * round_no,
                    mode=self.mode,  # type: ignore[arg-type]
                    task_spec=self.task_spec,
                )
                result = run_simulation(self.target, config)
                round_no += 1
                now = time.monotonic()
                with self._lock:
                    s = self.stats
                    s.episodes += len(result.episodes)
                    s.steps += result.steps
                    s.failed_requests += result.failed_requests
                    s.requests += len(result.latencies_ms)
                    for code, n in result.errors.items():
                        s.errors[code] = s.errors.get(code, 0) + n
                    s.versions_seen.update(result.head_versions)
                    s.returns.extend((now, e.head_versions, e.episode_return) for e in result.episodes)
        except BaseException as exc:  # reported by stop(); a client thread must not die silently
            log.exception("simulator client %d failed", index)
            self.failures.append(exc)

    def start(self) -> SimulatorFleet:
        for i in range(self.clients):
            thread = threading.Thread(target=self._client, args=(i,), name=f"simulator-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self, timeout_s: float = 60.0) -> FleetStats:
        """Ask every client to stop after its current round and wait for them."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=timeout_s)
        return self.stats

    def __enter__(self) -> SimulatorFleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
