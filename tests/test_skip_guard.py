"""The conftest guard: a skip caused by one of polyhead's own modules failing to import is a failure;
skips for other reasons stay skips."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).with_name("conftest.py")

PROBES = """
import pytest

def test_importorskip_of_our_module():
    pytest.importorskip("polyhead.no_such_module")

def test_skip_inside_except_importerror_of_our_module():
    try:
        import polyhead.no_such_module_either  # noqa: F401
    except ImportError:
        pytest.skip("the server is not available")

def test_importorskip_of_a_third_party_module():
    pytest.importorskip("no_such_third_party_module")

def test_plain_skip():
    pytest.skip("needs a tool this machine lacks")

def test_passes():
    import polyhead.errors  # noqa: F401
"""

MODULE_LEVEL = """
import pytest

pytest.importorskip("polyhead.no_such_module_at_module_level")

def test_never_runs():
    pass
"""


def test_skips_from_our_own_import_failures_fail(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(test_probes=PROBES)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rfs")
    result.assert_outcomes(failed=2, skipped=2, passed=1)
    result.stdout.fnmatch_lines(["*polyhead's own module 'polyhead.no_such_module' failed to import*"])


def test_a_module_level_importorskip_of_our_module_is_an_error(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(test_module_level=MODULE_LEVEL)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*no_such_module_at_module_level*failed to import*"])
