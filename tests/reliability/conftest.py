"""The reliability tests' session report: how many property-based cases ran (see reliability_helpers)."""

from __future__ import annotations

import pytest
from reliability_helpers import CASES, OUTCOMES


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if CASES:
        terminalreporter.write_sep("-", "property-based cases run (hypothesis)")
        for name, count in sorted(CASES.items()):
            terminalreporter.write_line(f"{name}: {count}")
        terminalreporter.write_line(f"total: {sum(CASES.values())}")
        outcomes = ", ".join(f"{code} {n}" for code, n in OUTCOMES.most_common())
        terminalreporter.write_line(f"outcomes: {outcomes}")
