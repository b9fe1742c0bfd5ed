"""deploy/prometheus passes promtool: scrape configs, alert rules, and the rules' behaviour on series."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import PrometheusTools
from .deployfiles import DEPLOY, load_yaml

PROM_DIR = DEPLOY / "prometheus"


def promtool(tools: PrometheusTools, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(tools.promtool), *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def test_alert_rules_pass_promtool(prometheus_tools: PrometheusTools) -> None:
    result = promtool(prometheus_tools, "check", "rules", "alerts.yml", cwd=PROM_DIR)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_scrape_config_passes_promtool(prometheus_tools: PrometheusTools) -> None:
    # `check config` also loads and checks the rule files the config names.
    result = promtool(prometheus_tools, "check", "config", "prometheus.yml", cwd=PROM_DIR)
    assert result.returncode == 0, result.stdout + result.stderr


def _replace_kubernetes_sd(config: dict[str, Any]) -> int:
    replaced = 0
    for job in config["scrape_configs"]:
        if "kubernetes_sd_configs" in job:
            del job["kubernetes_sd_configs"]
            job["file_sd_configs"] = [{"files": ["targets/*.json"]}]
            replaced += 1
    return replaced


def test_kubernetes_scrape_config_passes_promtool(prometheus_tools: PrometheusTools, tmp_path: Path) -> None:
    result = promtool(prometheus_tools, "check", "config", "prometheus-k8s.yml", cwd=PROM_DIR)
    if result.returncode == 0:
        return
    # Debian builds Prometheus without the Kubernetes service discovery (its client library is not
    # packaged), so kubernetes_sd_configs is an unknown field there. Check everything else, the
    # relabelling rules included, with the discovery swapped for file discovery.
    assert "kubernetes_sd_configs not found" in result.stdout + result.stderr, result.stdout + result.stderr
    config = load_yaml(PROM_DIR / "prometheus-k8s.yml")
    assert _replace_kubernetes_sd(config) == 2
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    (tmp_path / "alerts.yml").write_bytes((PROM_DIR / "alerts.yml").read_bytes())
    result = promtool(prometheus_tools, "check", "config", "prometheus.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_fire_on_the_situations_they_describe(prometheus_tools: PrometheusTools) -> None:
    """promtool's rule unit tests: synthetic series in, expected alerts out (tests/deploy/alerts_test.yml)."""
    test_file = Path(__file__).with_name("alerts_test.yml")
    result = promtool(prometheus_tools, "test", "rules", str(test_file), cwd=test_file.parent)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("config", ["prometheus.yml", "prometheus-k8s.yml"])
def test_scrape_configs_load_the_alert_rules(config: str) -> None:
    loaded = load_yaml(PROM_DIR / config)
    assert loaded["rule_files"] == ["alerts.yml"]
    jobs = {job["job_name"] for job in loaded["scrape_configs"]}
    assert {"polyhead-server", "polyhead-updater"} <= jobs
