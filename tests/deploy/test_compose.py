"""deploy/docker-compose.yml parses and agrees with the server's settings, the CLI and the other deploy files.

There is no docker engine here, so the stack is not started; what can be checked without one is: every
command line parses with the real `polyhead` parser, the server's flags and POLYHEAD_* variables resolve to
valid ServerSettings whose ports are the published ones and the ones Prometheus scrapes, and every file the
stack mounts or builds from exists.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from polyhead.cli import _load_registrars, build_parser
from polyhead.server.settings import ServerSettings

from .compose import COMPOSE_FILE, compose, environment, published_ports, service
from .deployfiles import DEPLOY, REPO, load_yaml
from .settings_env import serve_settings, unknown_settings

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
BUNDLE = "/bundles/polyhead"


def server_settings() -> ServerSettings:
    return serve_settings(service("server")["command"], environment("server"))


def parse_polyhead(argv: list[str]) -> argparse.Namespace:
    """Parse a service's command with the real `polyhead` parser (every part is installed for the tests:
    a part that does not load is a failure, not a skip)."""
    registrar = _load_registrars().get(argv[0])
    assert callable(registrar), f"`polyhead {argv[0]}` does not load: {registrar}"
    return build_parser().parse_args(argv)


def test_compose_file_has_the_whole_stack() -> None:
    services = compose()["services"]
    expected = {"trainer", "server", "updater", "simulator", "simulator-new-task", "prometheus", "grafana"}
    assert expected <= set(services)
    assert compose()["name"] == "polyhead"


def test_server_environment_names_are_server_settings() -> None:
    assert unknown_settings(environment("server")) == []
    assert unknown_settings(environment("updater")) == []


def test_server_ports_are_published_and_scraped() -> None:
    settings = server_settings()
    ports = published_ports("server")
    assert ports == {settings.port: settings.port, settings.metrics_port: settings.metrics_port}
    # HeadAdmin stays inside the compose network.
    assert settings.admin_port not in ports
    scrape = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    (job,) = (j for j in scrape["scrape_configs"] if j["job_name"] == "polyhead-server")
    assert job["static_configs"][0]["targets"] == [f"server:{settings.metrics_port}"]
    assert settings.metrics_host not in LOOPBACK and settings.host not in LOOPBACK


def test_admin_reachable_by_the_updater_only_with_a_token() -> None:
    settings = server_settings()
    assert settings.admin_mode == "separate"
    assert settings.admin_host not in LOOPBACK, "the updater runs in another container"
    assert settings.admin_token, "an admin port open to the network needs a token"
    command = service("updater")["command"]
    assert command[command.index("--admin-token") + 1] == settings.admin_token
    assert command[command.index("--admin-target") + 1] == f"server:{settings.admin_port}"


def test_server_healthcheck_asks_the_data_plane() -> None:
    settings = server_settings()
    test = service("server")["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "/opt/polyhead/healthcheck.py"]
    assert test[test.index("--target") + 1] == f"127.0.0.1:{settings.port}"
    for dependent in ("updater", "simulator", "simulator-new-task"):
        assert service(dependent)["depends_on"]["server"]["condition"] == "service_healthy"


def test_bundle_volume_is_shared_by_trainer_server_and_updater() -> None:
    assert str(server_settings().bundle) == BUNDLE
    for name in ("trainer", "server", "updater"):
        assert "bundles:/bundles" in service(name)["volumes"]
    assert "bundles" in compose()["volumes"]
    assert f"--out {BUNDLE}" in service("trainer")["command"][0]
    assert f"test -f {BUNDLE}/manifest.json" in service("trainer")["command"][0]
    assert service("server")["depends_on"]["trainer"]["condition"] == "service_completed_successfully"


def test_updater_command_parses_and_targets_the_server() -> None:
    command = service("updater")["command"]
    assert command[command.index("--bundle") + 1] == BUNDLE
    assert command[command.index("--source") + 1] == "remote"
    assert command[command.index("--server") + 1] == f"server:{server_settings().port}"
    args = parse_polyhead(command)
    assert args.command == "adapt"


@pytest.mark.parametrize("name", ["simulator", "simulator-new-task"])
def test_simulator_commands_parse_and_target_the_server(name: str) -> None:
    command = service(name)["command"]
    args = parse_polyhead(command)
    assert args.command == "simulate"
    assert args.target == f"server:{server_settings().port}"


def test_trainer_command_parses() -> None:
    line = service("trainer")["command"][0]
    argv = line.split("||", 1)[1].split()
    assert argv[0] == "polyhead"
    parse_polyhead(argv[1:])


def test_updater_metrics_port_is_scraped() -> None:
    command = service("updater")["command"]
    port = int(command[command.index("--metrics-port") + 1])
    scrape = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    (job,) = (j for j in scrape["scrape_configs"] if j["job_name"] == "polyhead-updater")
    assert job["static_configs"][0]["targets"] == [f"updater:{port}"]


def test_images_build_from_files_that_exist() -> None:
    base = COMPOSE_FILE.parent
    for name, svc in compose()["services"].items():
        build = svc.get("build")
        if build is None:
            assert ":" in svc["image"] and not svc["image"].endswith(":latest"), f"{name}: pin the image"
            continue
        context = (base / build["context"]).resolve()
        assert context == REPO
        assert (context / build["dockerfile"]).is_file()
    assert service("server")["build"]["dockerfile"].endswith("Dockerfile.server")
    assert service("updater")["build"]["dockerfile"].endswith("Dockerfile.trainer")


def test_prometheus_and_grafana_mount_the_shipped_files() -> None:
    base = COMPOSE_FILE.parent
    mounts: dict[str, Path] = {}
    for name in ("prometheus", "grafana"):
        for volume in service(name)["volumes"]:
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                assert (base / source).exists(), f"{name} mounts missing {source}"
                mounts[target] = base / source
    assert (mounts["/etc/prometheus"] / "prometheus.yml").is_file()
    assert (mounts["/etc/prometheus"] / "alerts.yml").is_file()
    provisioning = mounts["/etc/grafana/provisioning"]
    datasource = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
    providers = load_yaml(provisioning / "dashboards" / "polyhead.yml")["providers"]
    dashboards_dir = providers[0]["options"]["path"]
    assert (mounts[dashboards_dir] / "polyhead.json").is_file()
    home = environment("grafana")["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert Path(home).parent == Path(dashboards_dir)
    assert (mounts[dashboards_dir] / Path(home).name).is_file()


def test_compose_file_follows_the_compose_specification() -> None:
    compose_spec = pytest.importorskip("compose_spec", reason="the dev extra's compose-spec is not installed")
    # docker compose resolves YAML anchors and merge keys (x-trainer-image) before it validates.
    raw = load_yaml(COMPOSE_FILE)
    spec = compose_spec.PyCompose.from_json(json.dumps(raw)).to_spec()
    assert set(spec.services) == set(raw["services"])
    healthcheck = spec.services["server"].healthcheck
    assert healthcheck is not None and healthcheck.test[:2] == ["CMD", "python"]


def test_compose_specification_check_catches_mistakes() -> None:
    compose_spec = pytest.importorskip("compose_spec", reason="the dev extra's compose-spec is not installed")
    raw = load_yaml(COMPOSE_FILE)
    raw["services"]["server"]["depends_onn"] = raw["services"]["server"].pop("depends_on")
    with pytest.raises(ValueError, match="depends_onn"):
        compose_spec.PyCompose.from_json(json.dumps(raw)).to_spec()
