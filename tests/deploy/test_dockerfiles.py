"""The Dockerfiles build what they claim: a serving image without torch, a trainer image with the pinned
CPU torch, both non-root, multi-stage, from files that exist and are not ignored."""

from __future__ import annotations

import ast
import fnmatch
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from polyhead.cli import build_parser

from .deployfiles import DEPLOY, REPO
from .settings_env import serve_settings

DOCKER = DEPLOY / "docker"


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = dockerfile.read_text(encoding="utf-8")
    joined = re.sub(r"\\\n", " ", "\n".join(s for s in text.splitlines() if not s.lstrip().startswith("#")))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
    return out


def args_of(dockerfile: Path, word: str) -> list[str]:
    return [rest for w, rest in instructions(dockerfile) if w == word]


def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def ignored(path: str, dockerignore: Path) -> bool:
    """Whether the build context drops ``path`` under ``dockerignore`` (last matching rule wins)."""
    verdict = False
    for raw in dockerignore.read_text(encoding="utf-8").splitlines():
        rule = raw.strip()
        if not rule or rule.startswith("#"):
            continue
        negate = rule.startswith("!")
        pattern = rule.lstrip("!").rstrip("/")
        candidates = [path] + [str(Path(*Path(path).parts[:i])) for i in range(1, len(Path(path).parts))]
        if pattern == "**" or any(fnmatch.fnmatch(c, pattern) for c in candidates):
            verdict = not negate
    return verdict


@pytest.mark.parametrize("name", ["Dockerfile.server", "Dockerfile.trainer"])
def test_multi_stage_non_root_and_copies_exist(name: str) -> None:
    dockerfile = DOCKER / name
    assert len(args_of(dockerfile, "FROM")) >= 2, "build in one stage, run from a clean one"
    (user,) = args_of(dockerfile, "USER")
    assert user.split(":")[0] not in ("root", "0")
    dockerignore = dockerfile.with_name(name + ".dockerignore")
    for copy in args_of(dockerfile, "COPY"):
        if copy.startswith("--from="):
            continue
        sources = copy.split()[:-1]
        for source in sources:
            assert (REPO / source).exists(), f"{name} copies missing {source}"
            assert not ignored(source.rstrip("/"), dockerignore), f"{name}: {source} is dockerignored"
    assert ignored("tests", dockerignore) and ignored(".venv", dockerignore)


def test_serving_image_has_no_torch() -> None:
    dockerfile = DOCKER / "Dockerfile.server"
    text = " ".join(rest for _, rest in instructions(dockerfile))
    assert 'pip install ${PIP_INSTALL_OPTIONS} ".[serve,tracing]"' in text
    installs = re.findall(r"pip install ([^&]*)", text)
    assert installs and not any("torch" in packages for packages in installs), installs
    assert "find_spec('torch') is None" in text, "the build asserts torch did not come in transitively"
    extras = pyproject()["project"]["optional-dependencies"]
    assert not any(dep.startswith("torch") for dep in extras["serve"])
    assert "COPY trainer/ trainer/" not in {f"COPY {c}" for c in args_of(dockerfile, "COPY")}


def test_serving_image_ports_healthcheck_and_command() -> None:
    dockerfile = DOCKER / "Dockerfile.server"
    (cmd,) = args_of(dockerfile, "CMD")
    (entrypoint,) = args_of(dockerfile, "ENTRYPOINT")
    assert entrypoint == '["polyhead"]'
    argv = [part.strip(' "') for part in cmd.strip("[]").split(",")]
    settings = serve_settings(argv, {})
    (expose,) = args_of(dockerfile, "EXPOSE")
    assert {int(p) for p in expose.split()} == {settings.port, settings.admin_port, settings.metrics_port}
    (healthcheck,) = args_of(dockerfile, "HEALTHCHECK")
    assert 'CMD ["python", "/opt/polyhead/healthcheck.py"]' in healthcheck
    assert "COPY deploy/docker/healthcheck.py /opt/polyhead/healthcheck.py" in {
        f"COPY {c}" for c in args_of(dockerfile, "COPY")
    }


def test_trainer_image_pins_torch_from_the_cpu_index() -> None:
    dockerfile = DOCKER / "Dockerfile.trainer"
    build_args = dict(a.split("=", 1) for a in args_of(dockerfile, "ARG") if "=" in a)
    train = pyproject()["project"]["optional-dependencies"]["train"]
    (pin,) = (dep for dep in train if dep.startswith("torch"))
    assert pin == f"torch=={build_args['TORCH_VERSION']}"
    assert build_args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    text = " ".join(rest for _, rest in instructions(dockerfile))
    assert '--index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in text
    assert 'pip install ${PIP_INSTALL_OPTIONS} ".[train,minigrid]"' in text


@pytest.mark.parametrize("name", ["Dockerfile.server", "Dockerfile.trainer"])
def test_every_pip_install_takes_the_offline_options(name: str) -> None:
    """deploy/podman/build-images.sh builds offline by passing PIP_INSTALL_OPTIONS (--no-index plus a
    wheelhouse): a pip install without them would reach for PyPI. Empty by default, so a plain
    `docker build` with internet installs from PyPI."""
    dockerfile = DOCKER / name
    build_args = dict(a.split("=", 1) if "=" in a else (a, None) for a in args_of(dockerfile, "ARG"))
    assert build_args["PIP_INSTALL_OPTIONS"] == '""'
    text = " ".join(rest for _, rest in instructions(dockerfile))
    installs = re.findall(r"pip install (\S+)", text)
    assert installs and all(first == "${PIP_INSTALL_OPTIONS}" for first in installs), installs


@pytest.mark.parametrize("name", ["Dockerfile.server", "Dockerfile.trainer"])
def test_build_checks_import_the_polyhead_namespace(name: str) -> None:
    """The checks after pip install import polyhead.* in isolated mode (-I): from /src, a plain
    `python -c` would import the source tree instead of what was installed."""
    text = " ".join(rest for _, rest in instructions(DOCKER / name))
    checks = re.findall(r'bin/python (-\S+ )?-c "([^"]*)"', text)
    assert checks, "the build runs an import check"
    for flag, code in checks:
        assert flag.strip() == "-I", code
        modules = {
            alias.name
            for node in ast.walk(ast.parse(code.replace("${TORCH_VERSION}", "0")))
            if isinstance(node, ast.Import)
            for alias in node.names
        }
        assert any(m.startswith("polyhead.") for m in modules), modules
        assert not {m.split(".")[0] for m in modules} & {"server", "trainer", "clients"}, modules


def test_entrypoint_is_the_polyhead_command() -> None:
    parser = build_parser()
    assert parser.prog == "polyhead"
    for name in ("Dockerfile.server", "Dockerfile.trainer"):
        assert args_of(DOCKER / name, "ENTRYPOINT") == ['["polyhead"]']
