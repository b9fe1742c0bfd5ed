"""`polyhead demo --fast` proves the whole chain (train -> serve -> simulate -> adapt live -> report) in CI.

Tiny budgets: it checks the wiring and the invariants (no failed request, old tasks byte-identical and
acting identically, versions published and served, graceful server exit), not how well anything learns;
`make demo` shows the learning.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow


def test_demo_fast_summary(tmp_path: Path) -> None:
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "polyhead", "demo", "--fast", "--out", str(out), "--json"],
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary == json.loads((out / "summary.json").read_text())

    assert summary["failed_requests"] == 0
    assert summary["requests_measured"] > 100
    assert summary["server_exit_code"] == 0
    assert summary["trunk_sha256_unchanged"] is True
    assert summary["old_tasks_unchanged"] is True
    assert set(summary["old_tasks"]) == {
        "cartpole-long-pole",
        "cartpole-heavy-pole",
        "cartpole-weak-push",
        "cartpole-low-gravity",
        "cartpole-target-right",
    }
    for row in summary["old_tasks"].values():
        assert row["returns_identical"] and row["head_sha256_unchanged"]
        assert row["p50_ms"] > 0

    new = summary["new_task"]
    assert new["id"] == "cartpole-reversed"
    assert new["versions_published"] >= 1
    assert new["zero_shot_best"]["head"] in summary["old_tasks"]
    versions = [v["version"] for v in new["versions"]]
    assert versions == sorted(versions) and versions[0] == 1
    assert new["final_version"] and new["final_version"][0] in versions
    # The start (0 samples) and the final updater evaluation sit side by side, in the summary and the table.
    assert new["start_eval_return"] == versions_by_number(new)[1]["eval_return"]
    assert new["beat_start"] == (new["final_eval_return"] > new["start_eval_return"])
    table = (out / "summary.md").read_text()
    assert "start: the head training began from, 0 samples" in table and "final: the served version" in table
    assert summary["swaps"] >= 1 and summary["head_loads"] >= 1
    assert summary["train"]["steps"] > 0 and set(summary["train"]["tasks"]) == set(summary["old_tasks"])

    for name in ("training_curves.png", "adaptation.png", "latency_histogram.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    report = (out / "summary.md").read_text()
    assert "cartpole-reversed" in report and "failed requests: **0**" in report
    assert (out / "bundle" / "manifest.json").is_file()


def versions_by_number(new: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {int(v["version"]): v for v in new["versions"]}
