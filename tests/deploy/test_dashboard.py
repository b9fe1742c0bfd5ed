"""The Grafana dashboard and provisioning load as-is, and every series they and the alerts name exists."""

from __future__ import annotations

import re

import pytest
from prometheus_client import CollectorRegistry

from polyhead.server.metrics import ServerMetrics

from .deployfiles import DEPLOY, load_yaml
from .promql import DASHBOARD_FILE, alert_queries, dashboard, dashboard_queries, metric_names, panels

PROVISIONING = DEPLOY / "grafana" / "provisioning"


def series_names(registry: CollectorRegistry) -> set[str]:
    """Every sample name ``registry`` can export (counters' _total, histograms' _bucket/_sum/_count...)."""
    names = set()
    for family in registry.collect():
        names.add(family.name)
        kind = family.type
        if kind == "counter":
            names.add(f"{family.name}_total")
        elif kind in ("histogram", "summary"):
            names.update(f"{family.name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
    return names


def server_series_names() -> set[str]:
    registry = CollectorRegistry()
    ServerMetrics(registry)
    return series_names(registry)


def updater_series_names() -> set[str]:
    from polyhead.trainer.updater.metrics import UpdaterMetrics

    return series_names(UpdaterMetrics().registry)


def test_datasource_uid_is_the_one_every_panel_uses() -> None:
    (datasource,) = load_yaml(PROVISIONING / "datasources" / "prometheus.yml")["datasources"]
    uid = datasource["uid"]
    text = DASHBOARD_FILE.read_text(encoding="utf-8")
    assert "${DS_" not in text and "__inputs" not in text, "the dashboard must load without an import step"
    for panel in panels():
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid
    for variable in dashboard()["templating"]["list"]:
        assert variable["datasource"]["uid"] == uid


def test_dashboard_layout_is_well_formed() -> None:
    board = dashboard()
    assert board["uid"] == "polyhead-overview"
    ids = [p["id"] for p in panels()]
    assert len(ids) == len(set(ids))
    for panel in panels():
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]


@pytest.mark.parametrize(
    "needle",
    [
        r"sum by \(task\) \(rate\(polyhead_requests_total",  # request rate by task
        r'code!="OK"',  # errors
        r"histogram_quantile\(0\.5, sum by \(task, le\) \(rate\(polyhead_request_duration_seconds_bucket",
        r"histogram_quantile\(0\.99, sum by \(task, le\) \(rate\(polyhead_request_duration_seconds_bucket",
        r"polyhead_batch_size_",
        r"polyhead_queue_depth",
        r"max by \(task\) \(polyhead_active_head_version",
        r"polyhead_head_swaps_total",
        r"polyhead_head_load_failures_total",
        r"polyhead_episode_return_sum",
        r"polyhead_updater_versions_published_total",
        r"max by \(task\) \(polyhead_task_regressed",
        r"polyhead_version_episode_return_sum",
    ],
)
def test_dashboard_shows_what_operators_need(needle: str) -> None:
    assert any(re.search(needle, q.expr) for q in dashboard_queries()), needle


def operate_series_names() -> set[str]:
    from polyhead.trainer.operate import OperateMetrics

    return series_names(OperateMetrics().registry)


def test_every_series_named_by_dashboard_and_alerts_exists() -> None:
    known = server_series_names() | updater_series_names() | operate_series_names()
    for query in dashboard_queries() + alert_queries():
        unknown = metric_names(query.expr) - known
        assert not unknown, f"{query.where} names series no component exports: {sorted(unknown)}"


def test_alerts_cover_the_failure_modes() -> None:
    names = {q.where.removeprefix("alert ") for q in alert_queries()}
    assert {
        "PolyheadHighErrorRatio",
        "PolyheadHighP99Latency",
        "PolyheadHeadLoadFailures",
        "PolyheadBundleUnreadable",
        "PolyheadReturnRegressionAfterSwap",
        "PolyheadNoExperience",
        "PolyheadTaskRegressed",
        "PolyheadOperateGaveUp",
    } <= names
