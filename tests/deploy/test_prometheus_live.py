"""A real Prometheus scrapes a real polyhead server under a simulator load, with deploy/'s scrape config
(targets and intervals rewritten to this test's ports), and then answers EVERY PromQL expression of the
shipped dashboard and alert rules through its HTTP API: each must be valid, the dashboard's must return
data (at least one finite value), and every alert rule must evaluate without error.

The load is a small operating day in under a minute, as the compose stack runs it: the real online updater
(`polyhead adapt --source remote`, its metrics scraped by deploy's updater job) learns a new task from the
experience of simulators acting on it and publishes versions the server swaps in live, while gymnasium
simulators drive every old task (batched Act and ActStream sessions, rewards reported); an operator rolls
a head version forward and back; two head loads are refused; invalid requests and experience for an
unknown episode arrive.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from polyhead.clients.admin import AdminClient
from polyhead.clients.errors import PolicyClientError
from polyhead.clients.policy_client import PolicyClient, experience_report
from polyhead.clients.simulator import SimulationConfig, run_simulation
from polyhead.server.app import BackgroundServer, task_health_name
from polyhead.server.settings import ServerSettings

from .conftest import PrometheusTools
from .deployfiles import DEPLOY, load_yaml
from .prometheus_server import PrometheusError, PrometheusServer, free_port, start_prometheus
from .promql import Query, alert_queries, dashboard_queries

pytestmark = pytest.mark.service

# The shared tiny bundle (tests/conftest.py): Discrete and Box actions, and Acrobot's negative returns.
TASKS = ["cartpole", "acrobot", "cartpole-continuous"]
SWAPPED_TASK = "cartpole"
STREAM_TASK = "cartpole-continuous"
# The online updater's new task (the same one docker-compose.yml adapts by default).
NEW_TASK_SPEC = "cartpole-family:cartpole-reversed"
NEW_TASK = "cartpole-reversed"
ADMIN_TOKEN = "deploy-test-token"
SCRAPE_INTERVAL_S = 1.0
LOAD_SECONDS = 7.0
# The updater imports torch, scores the old heads and needs a few hundred remote steps per version.
UPDATER_VERSIONS = 2
UPDATER_TIMEOUT_S = 240.0


@dataclass
class LoadReport:
    """What the load did, to compare with what Prometheus saw."""

    episodes: dict[str, int] = field(default_factory=dict)
    failed_requests: int = 0
    invalid_requests: int = 0
    refused_loads: int = 0
    swaps: int = 0
    errors: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def live_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the shared tiny bundle (tests/conftest.py): the updater publishes into it."""
    out = tmp_path_factory.mktemp("deploy-live") / "bundle"
    shutil.copytree(tiny_bundle, out)
    return out


@pytest.fixture(scope="module")
def live_server(live_bundle: Path) -> Iterator[BackgroundServer]:
    """A real server on the bundle, for the whole module."""
    settings = ServerSettings(
        bundle=live_bundle,
        host="127.0.0.1",
        port=0,
        admin_host="127.0.0.1",
        admin_port=0,
        admin_token=ADMIN_TOKEN,
        metrics_host="127.0.0.1",
        metrics_port=0,
        watch_bundle=False,
    )
    with BackgroundServer(settings) as srv:
        yield srv


def rewrite_scrape_config(metrics_port: int, updater_port: int, prometheus_port: int, out_dir: Path) -> Path:
    """deploy/prometheus/prometheus.yml with only targets and intervals changed, next to alerts.yml."""
    config: dict[str, Any] = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    config["global"]["scrape_interval"] = f"{SCRAPE_INTERVAL_S:g}s"
    config["global"]["evaluation_interval"] = f"{SCRAPE_INTERVAL_S:g}s"
    targets = {
        "polyhead-server": f"127.0.0.1:{metrics_port}",
        "polyhead-updater": f"127.0.0.1:{updater_port}",
        "prometheus": f"127.0.0.1:{prometheus_port}",
    }
    assert {job["job_name"] for job in config["scrape_configs"]} == set(targets)
    for job in config["scrape_configs"]:
        (static,) = job["static_configs"]
        static["targets"] = [targets[job["job_name"]]]
    path = out_dir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    (out_dir / "alerts.yml").write_bytes((DEPLOY / "prometheus" / "alerts.yml").read_bytes())
    return path


@pytest.fixture(scope="module")
def updater_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def prometheus(
    prometheus_tools: PrometheusTools,
    live_server: BackgroundServer,
    updater_port: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[PrometheusServer]:
    workdir = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    assert live_server.metrics_port is not None
    config = rewrite_scrape_config(live_server.metrics_port, updater_port, port, workdir)
    server = start_prometheus(prometheus_tools.prometheus, config, workdir, port)
    try:
        yield server
    finally:
        server.stop()


@dataclass
class NewTaskTraffic:
    """Simulators on the updater's new task: they retry until its first version is served, then play
    episodes (the experience the updater learns from) until stopped."""

    target: str
    stop: threading.Event = field(default_factory=threading.Event)
    episodes: int = 0
    failed_requests: int = 0
    errors: list[str] = field(default_factory=list)

    def run(self) -> None:
        give_up = time.monotonic() + UPDATER_TIMEOUT_S + 120
        runs = 0
        while not self.stop.is_set() and runs < 2_000 and time.monotonic() < give_up:
            try:
                result = run_simulation(
                    self.target, SimulationConfig(task_id=NEW_TASK, episodes=4, envs=4, seed=runs)
                )
            except PolicyClientError:  # not served yet: the updater publishes the first version
                time.sleep(0.5)
                continue
            runs += 1
            self.episodes += len(result.episodes)
            self.failed_requests += result.failed_requests
            self.errors.extend(result.error_messages)


@dataclass
class RunningUpdater:
    process: subprocess.Popen[bytes]
    log_path: Path
    traffic: NewTaskTraffic

    def log_tail(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-3000:]


@pytest.fixture(scope="module")
def updater(
    live_server: BackgroundServer,
    live_bundle: Path,
    updater_port: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningUpdater]:
    """`polyhead adapt --source remote` against the live server, as docker-compose.yml's updater runs it
    (small PPO steps, a budget it does not finish: it is stopped with the module), plus its new-task
    simulators."""
    log_path = tmp_path_factory.mktemp("updater") / "adapt.log"
    argv = [sys.executable, "-m", "polyhead", "adapt", "--bundle", str(live_bundle)]
    argv += ["--task-spec", NEW_TASK_SPEC, "--source", "remote", "--server", live_server.target]
    argv += ["--admin-target", live_server.admin_target, "--admin-token", ADMIN_TOKEN]
    argv += ["--metrics-port", str(updater_port), "--init", "scratch", "--exporter", "torchscript"]
    argv += ["--publish-every", "2", "--guard-episodes", "2", "--zero-shot-episodes", "2"]
    argv += ["--idle-timeout", "120", "--total-steps", "10000000", "--envs-per-task", "4"]
    argv += ["--num-steps", "64", "--update-epochs", "4", "--torch-threads", "1", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log_path.open("wb") as log:
        process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    traffic = NewTaskTraffic(live_server.target)
    thread = threading.Thread(target=traffic.run, daemon=True)
    thread.start()
    try:
        yield RunningUpdater(process, log_path, traffic)
    finally:
        traffic.stop.set()
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        thread.join(timeout=60)


def _wait_for_updater(prometheus: PrometheusServer, updater: RunningUpdater) -> None:
    """Block until Prometheus has seen the updater publish UPDATER_VERSIONS versions of the new task."""
    deadline = time.monotonic() + UPDATER_TIMEOUT_S
    expr = f'polyhead_updater_versions_published_total{{task="{NEW_TASK}"}} >= {UPDATER_VERSIONS}'
    while time.monotonic() < deadline:
        if updater.process.poll() is not None:
            code = updater.process.returncode
            raise AssertionError(f"the updater exited with {code}:\n{updater.log_tail()}")
        if prometheus.query(expr):
            return
        time.sleep(1.0)
    raise AssertionError(f"no {UPDATER_VERSIONS} versions in {UPDATER_TIMEOUT_S} s:\n{updater.log_tail()}")


@dataclass(frozen=True)
class SimulatorJob:
    target: str
    task: str
    mode: str
    deadline: float


def _simulate(job: SimulatorJob, report: LoadReport, lock: threading.Lock) -> None:
    """Run short simulations of one task until the deadline (bounded in count as well as time)."""
    runs = 0
    while time.monotonic() < job.deadline and runs < 200:
        result = run_simulation(
            job.target,
            SimulationConfig(task_id=job.task, episodes=4, envs=4, mode=job.mode, seed=runs),  # type: ignore[arg-type]
        )
        runs += 1
        with lock:
            report.episodes[job.task] = report.episodes.get(job.task, 0) + len(result.episodes)
            report.failed_requests += result.failed_requests
            report.errors.extend(result.error_messages)


def _wait_for_scrapes(prometheus: PrometheusServer, n: int = 2) -> None:
    """Block until Prometheus has scraped the server ``n`` more times."""
    first = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        result = prometheus.query('timestamp(up{job="polyhead-server"} == 1)')
        if result:
            stamp = float(result[0]["value"][1])
            first = stamp if first is None else first
            if stamp >= first + n * SCRAPE_INTERVAL_S:
                return
        time.sleep(0.2)
    raise AssertionError(f"no scrapes of the server for 30 s:\n{prometheus.log_tail()}")


@pytest.fixture(scope="module")
def scraped_load(
    live_server: BackgroundServer,
    live_bundle: Path,
    prometheus: PrometheusServer,
    updater: RunningUpdater,
) -> LoadReport:
    """Run the load while Prometheus scrapes, then wait until the last of it has been scraped. The updater
    keeps learning (and its simulators playing) until the module ends, so its series stay live."""
    _wait_for_scrapes(prometheus, 1)
    _wait_for_updater(prometheus, updater)
    report = LoadReport()
    lock = threading.Lock()
    end = time.monotonic() + LOAD_SECONDS
    simulators = [
        threading.Thread(
            target=_simulate,
            args=(
                SimulatorJob(live_server.target, task, "stream" if task == STREAM_TASK else "unary", end),
                report,
                lock,
            ),
            daemon=True,
        )
        for task in TASKS
    ]
    for thread in simulators:
        thread.start()
    head_dir = live_bundle / "heads" / SWAPPED_TASK / "1"
    with (
        PolicyClient(live_server.target) as client,
        AdminClient(live_server.admin_target, token=ADMIN_TOKEN) as admin,
    ):

        def invalid_request() -> None:
            # Five numbers for a six-number observation: INVALID_ARGUMENT, counted under code!="OK".
            with pytest.raises(PolicyClientError):
                client.act("acrobot", np.zeros(5, dtype=np.float32))
            report.invalid_requests += 1

        def refused_load() -> None:
            with pytest.raises(PolicyClientError):
                admin.load_head(
                    SWAPPED_TASK,
                    onnx=b"definitely not onnx",
                    head_json=(head_dir / "head.json").read_text(encoding="utf-8"),
                )
            report.refused_loads += 1

        def unknown_episode_report() -> None:
            client.report_experience([experience_report("acrobot", "never-acted", 1.0, terminated=True)])

        # Each event twice, a few scrapes apart, so its counter's rate is not just a first sample.
        for _ in range(2):
            invalid_request()
            refused_load()
            unknown_episode_report()
            _wait_for_scrapes(prometheus, 2)
        # Roll forward to version 2 (the same head bytes, a new version), then back to 1.
        loaded = admin.load_head_dir(SWAPPED_TASK, head_dir, activate=True)
        assert loaded.active_version == 2
        report.swaps += 1
        _wait_for_scrapes(prometheus, 2)
        swapped = admin.set_active_version(SWAPPED_TASK, 1)
        assert (swapped.previous_version, swapped.active_version) == (2, 1)
        report.swaps += 1
    for thread in simulators:
        thread.join(timeout=LOAD_SECONDS + 60)
        assert not thread.is_alive(), "a simulator did not finish"
    _wait_for_scrapes(prometheus, 2)
    return report


def _has_finite_value(result: list[dict[str, Any]]) -> bool:
    values = [sample["value"][1] for sample in result if "value" in sample]
    values += [v[1] for sample in result for v in sample.get("values", [])]
    return any(math.isfinite(float(v)) for v in values)


def test_updater_versions_are_served_live_without_failed_calls(
    prometheus: PrometheusServer, scraped_load: LoadReport, updater: RunningUpdater
) -> None:
    (published,) = prometheus.query(f'polyhead_updater_versions_published_total{{task="{NEW_TASK}"}}')
    assert float(published["value"][1]) >= UPDATER_VERSIONS
    # The server swapped each version in: its active version for the new task went past the first.
    (served,) = prometheus.query(f'max_over_time(polyhead_active_head_version{{task="{NEW_TASK}"}}[10m])')
    assert float(served["value"][1]) >= UPDATER_VERSIONS
    targets = prometheus.get("targets")["activeTargets"]
    (job,) = (t for t in targets if t["labels"]["job"] == "polyhead-updater")
    assert job["health"] == "up", job
    assert updater.traffic.episodes > 0
    assert updater.traffic.failed_requests == 0, updater.traffic.errors[:5]


def test_load_ran_cleanly(scraped_load: LoadReport) -> None:
    assert scraped_load.failed_requests == 0, scraped_load.errors[:5]
    assert all(scraped_load.episodes.get(task, 0) >= 4 for task in TASKS), scraped_load.episodes
    assert scraped_load.swaps == 2 and scraped_load.refused_loads == 2 and scraped_load.invalid_requests == 2


def test_prometheus_scrapes_the_server_with_deploys_job(
    prometheus: PrometheusServer, scraped_load: LoadReport
) -> None:
    targets = prometheus.get("targets")["activeTargets"]
    (server,) = (t for t in targets if t["labels"]["job"] == "polyhead-server")
    assert server["health"] == "up", server
    assert server["labels"]["service"] == "polyhead-server"


@pytest.mark.parametrize("query", dashboard_queries(), ids=lambda q: q.where)
def test_dashboard_query_is_valid_and_returns_data(
    prometheus: PrometheusServer, scraped_load: LoadReport, query: Query
) -> None:
    try:
        result = prometheus.query(query.expr)
    except PrometheusError as exc:
        pytest.fail(f"{query.where}: Prometheus refused {query.expr!r}: {exc}")
    if query.must_return_data:
        assert result, f"{query.where}: no data for {query.expr!r}"
        assert _has_finite_value(result), f"{query.where}: only NaN/Inf for {query.expr!r}: {result}"


@pytest.mark.parametrize("query", alert_queries(), ids=lambda q: q.where)
def test_alert_expression_is_valid(
    prometheus: PrometheusServer, scraped_load: LoadReport, query: Query
) -> None:
    try:
        prometheus.query(query.expr)
    except PrometheusError as exc:
        pytest.fail(f"{query.where}: Prometheus refused {query.expr!r}: {exc}")


def test_alert_rules_load_and_evaluate_without_errors(
    prometheus: PrometheusServer, scraped_load: LoadReport
) -> None:
    groups = prometheus.get("rules")["groups"]
    rules = {rule["name"]: rule for group in groups for rule in group["rules"]}
    assert set(rules) == {q.where.removeprefix("alert ") for q in alert_queries()}
    for name, rule in rules.items():
        assert rule["health"] == "ok", f"{name}: {rule.get('lastError')}"
    # A head load was refused a moment ago: that alert is pending or firing, and names the reason.
    failures = rules["PolyheadHeadLoadFailures"]["alerts"]
    assert any(alert["labels"]["task"] == SWAPPED_TASK for alert in failures), failures


def test_series_tell_what_happened(prometheus: PrometheusServer, scraped_load: LoadReport) -> None:
    def value(expr: str) -> float:
        (sample,) = prometheus.query(expr)
        return float(sample["value"][1])

    assert value(f'polyhead_active_head_version{{task="{SWAPPED_TASK}"}}') == 1
    assert value(f'max_over_time(polyhead_active_head_version{{task="{SWAPPED_TASK}"}}[5m])') == 2
    # Activating version 1 at start-up counts as a swap too: compare with a task left alone.
    swaps = value(f'polyhead_head_swaps_total{{task="{SWAPPED_TASK}"}}')
    assert swaps - value(f'polyhead_head_swaps_total{{task="{TASKS[2]}"}}') == scraped_load.swaps
    assert value(f'sum(polyhead_head_load_failures_total{{task="{SWAPPED_TASK}"}})') == 2
    assert value('sum(polyhead_requests_total{method="Act", code="INVALID_ARGUMENT"})') == 2
    assert value('sum(polyhead_requests_total{method="LoadHead", code="INVALID_ARGUMENT"})') == 2
    assert value('sum(polyhead_experience_dropped_total{reason="unknown_episode"})') >= 2
    for task in TASKS:
        assert value(f'polyhead_episode_return_count{{task="{task}"}}') >= scraped_load.episodes[task]
    assert value('sum(polyhead_requests_total{method="ActStream", code="OK"})') > 0
    # Acrobot's returns are negative; the dashboard's mean-return panel (delta, not rate) keeps the sign.
    (mean_return,) = (
        q for q in dashboard_queries() if "polyhead_episode_return_sum" in q.expr and "delta" in q.expr
    )
    by_task = {r["metric"]["task"]: float(r["value"][1]) for r in prometheus.query(mean_return.expr)}
    assert by_task["acrobot"] < 0 < by_task["cartpole"], by_task
    assert value("count(polyhead_server_info)") == 1


def test_container_healthcheck_script_reports_serving(live_server: BackgroundServer) -> None:
    script = DEPLOY / "docker" / "healthcheck.py"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(script), *args], capture_output=True, text=True, timeout=30, check=False
        )

    overall = run("--target", live_server.target)
    assert overall.returncode == 0, overall.stderr
    assert "SERVING" in overall.stderr
    per_task = run("--target", live_server.target, "--service", task_health_name(TASKS[0]))
    assert per_task.returncode == 0, per_task.stderr
    unknown = run("--target", live_server.target, "--service", task_health_name("no-such-task"))
    assert unknown.returncode == 1
    closed = run("--target", f"127.0.0.1:{free_port()}", "--timeout", "1")
    assert closed.returncode == 1, closed.stderr
