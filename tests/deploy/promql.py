"""The PromQL of the shipped dashboard and alert rules, as Prometheus would receive it."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from .deployfiles import DEPLOY, load_yaml

DASHBOARD_FILE = DEPLOY / "grafana" / "dashboards" / "polyhead.json"
ALERTS_FILE = DEPLOY / "prometheus" / "alerts.yml"

# Grafana's variables, replaced as Grafana would for a 30-minute view scraped every few seconds.
# $__rate_interval is at least four scrape intervals; 30s covers the live test's 1 s scrapes comfortably.
GRAFANA_VARIABLES = {
    "$__rate_interval": "30s",
    "$__interval": "5s",
    "$__range": "30m",
    "${task}": ".*",
    "$task": ".*",
}
METRIC_NAME = re.compile(r"\bpolyhead_[a-z_]+\b")


@dataclass(frozen=True)
class Query:
    where: str
    expr: str
    must_return_data: bool


# Series exported only by `polyhead operate`, which the live Prometheus test does not run (its own end-to-end
# test, tests/updater/test_operate.py, checks those metrics on the controller's registry); queries over them
# must still be valid PromQL.
NOT_RUN_LIVE = frozenset({"polyhead_operate_decisions_total", "polyhead_operate_gave_up"})


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))
    return loaded


def panels() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for panel in dashboard()["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows hold their panels
    return out


def substitute(expr: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"unknown Grafana variable left in {expr!r}"
    return expr


def dashboard_queries() -> list[Query]:
    """Every panel target (must return data, unless its metrics come only from a process the live test
    does not run) and every annotation query (must be valid)."""
    queries = [
        Query(
            f"panel {p['title']!r} target {t['refId']}",
            substitute(t["expr"]),
            must_return_data=not metric_names(t["expr"]) & NOT_RUN_LIVE,
        )
        for p in panels()
        for t in p.get("targets", [])
    ]
    queries += [
        Query(f"annotation {a['name']!r}", substitute(a["expr"]), must_return_data=False)
        for a in dashboard()["annotations"]["list"]
        if "expr" in a
    ]
    return queries


def alert_queries() -> list[Query]:
    rules = load_yaml(ALERTS_FILE)
    return [
        Query(f"alert {rule['alert']}", rule["expr"], must_return_data=False)
        for group in rules["groups"]
        for rule in group["rules"]
    ]


def metric_names(expr: str) -> set[str]:
    return set(METRIC_NAME.findall(expr))
