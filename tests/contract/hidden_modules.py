"""A prelude for ``python -c`` child processes that behave as if a package were not installed.

The optional extras (``tracing``: OpenTelemetry) are installed in the test venv, so a test of "what
happens without the extra" runs a child whose import system refuses that package's modules.
"""

from __future__ import annotations


def without(package: str) -> str:
    """Source that, run first, makes every import of ``package`` or its submodules raise
    ModuleNotFoundError, as on an install without it."""
    return f"""
import importlib.abc, sys
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == {package!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Hide())
"""
