"""Reading deploy/docker-compose.yml as docker compose would: variables interpolated with their defaults."""

from __future__ import annotations

import re
from typing import Any

from .deployfiles import DEPLOY, load_yaml

COMPOSE_FILE = DEPLOY / "docker-compose.yml"
_VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}")


def interpolate(value: Any) -> Any:
    """``${NAME:-default}`` -> ``default`` (no variable of this stack is set in the test's environment)."""
    if isinstance(value, str):
        return _VARIABLE.sub(lambda m: m.group("default") or "", value)
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


def compose() -> dict[str, Any]:
    loaded = interpolate(load_yaml(COMPOSE_FILE))
    assert isinstance(loaded, dict)
    return loaded


def service(name: str) -> dict[str, Any]:
    return dict(compose()["services"][name])


def environment(name: str) -> dict[str, str]:
    env = service(name).get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def published_ports(name: str) -> dict[int, int]:
    """container port -> host port, from "HOST:CONTAINER" entries."""
    ports = {}
    for entry in service(name).get("ports", []):
        host, _, container = str(entry).rpartition(":")
        ports[int(container)] = int(host)
    return ports
