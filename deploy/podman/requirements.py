"""Print, one per line, what pip must find to build polyhead with the given extras, read from pyproject.toml.

Used by ``build-images.sh`` to fill the offline wheelhouse: the build backend (``[build-system] requires``),
the core dependencies and every dependency of the extras, with ``polyhead[...]`` self-references expanded.
Standard library only, so it runs with any Python 3.11+ before anything is installed.

    python deploy/podman/requirements.py serve            # the serving image
    python deploy/podman/requirements.py train minigrid   # the trainer image
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
_SELF = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+)\[(?P<extras>[^\]]+)\]\s*$")


def requirements(pyproject: dict[str, object], extras: list[str]) -> list[str]:
    """Build requirements, then the core dependencies, then the extras' (in order, without repeats)."""
    project = pyproject["project"]
    assert isinstance(project, dict)
    name = str(project["name"])
    optional: dict[str, list[str]] = project.get("optional-dependencies", {})
    build_system = pyproject["build-system"]
    assert isinstance(build_system, dict)
    out: list[str] = [*build_system["requires"], *project.get("dependencies", [])]
    pending, seen = list(extras), set()
    while pending:
        extra = pending.pop(0)
        if extra in seen:
            continue
        if extra not in optional:
            raise SystemExit(f"pyproject.toml has no extra {extra!r}; expected one of {sorted(optional)}")
        seen.add(extra)
        for dep in optional[extra]:
            match = _SELF.match(dep)
            if match and match["name"].lower() == name.lower():
                pending.extend(e.strip() for e in match["extras"].split(","))
            else:
                out.append(dep)
    return list(dict.fromkeys(out))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "extras", nargs="*", help="extras of the polyhead package (serve, train, minigrid, ...)"
    )
    parser.add_argument("--pyproject", type=Path, default=PYPROJECT, help="default: %(default)s")
    args = parser.parse_args(argv)
    with args.pyproject.open("rb") as f:
        print("\n".join(requirements(tomllib.load(f), args.extras)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
