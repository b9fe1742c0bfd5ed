"""`polyhead demo --scenario drift --fast`: a served task's actuator is reversed under live traffic; the
server detects it, `polyhead operate` re-adapts it through canaries, the other tasks act identically.

Tiny budgets (a 40k-step bundle, 15 s of stationary traffic, after the change until the first canary
verdict, at most 90 s): it checks the
chain and the invariants (detection, canary decisions, untouched tasks byte-identical, no failed request,
both subprocesses exit cleanly, the report and its plot), not how far the return recovers: `polyhead demo
--scenario drift` and benchmarks/operate_drift.py show that.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_demo_drift_fast_summary(tmp_path: Path) -> None:
    out = tmp_path / "report"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "polyhead",
            "demo",
            "--scenario",
            "drift",
            "--fast",
            "--out",
            str(out),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary == json.loads((out / "summary.json").read_text())

    assert summary["scenario"] == "drift" and summary["drift_task"] == "cartpole-long-pole"
    assert summary["server_exit_code"] == 0 and summary["operate_exit_code"] == 0
    # Zero failed requests, counted over every simulator of every task throughout.
    assert summary["failed_requests"] == 0
    assert summary["requests"] > 1000

    # The other tasks: same observations, byte-identical actions; head files unchanged; no false alarm.
    assert set(summary["untouched_tasks"]) == {
        "cartpole-heavy-pole",
        "cartpole-weak-push",
        "cartpole-low-gravity",
        "cartpole-target-right",
    }
    for row in summary["untouched_tasks"].values():
        assert row["actions_identical"] and row["head_sha256_unchanged"]
        assert row["episodes"] > 0
    assert summary["untouched_unchanged"] is True
    assert summary["false_alarms_untouched"] == []

    # The drop is real and detected after the change; the controller reacted with a canary.
    assert summary["pre_change_episodes"] > 0 and summary["drifted_episodes"] >= 20
    assert summary["drifted_first_20_mean"] < 0.5 * summary["pre_change_mean_return"]
    detection = summary["detection"]
    assert detection is not None and detection["t_s"] >= 0.0 and detection["samples"] > 0
    kinds = [d["decision"] for d in summary["decisions"]]
    assert kinds[0] == "recover" and "publish" in kinds
    recover = summary["decisions"][0]
    assert recover["t_s"] >= 0.0 and "regressed" in recover["detail"]
    first_publish = summary["decisions"][kinds.index("publish")]
    assert "as canary at 25%" in first_publish["detail"]
    assert 25.0 in summary["canary_shares_seen"]  # the server served it at that share (ListTasks)
    # --fast ends the changed phase at the first canary verdict; it comes well inside the 90 s limit.
    verdicts = {"widen", "promote", "rollback", "supersede", "retire", "give_up"}
    assert verdicts & set(kinds), kinds
    promoted = [p["version"] for p in summary["promotions"]]
    if promoted:  # a promotion makes the served version the promoted one (or a later one)
        assert summary["final_stable_version"] >= promoted[-1] > 1

    report = (out / "summary.md").read_text()
    assert "cartpole-long-pole" in report and "failed requests: **0**" in report
    assert "regression detected by the server" in report and "| recover |" in report
    assert (out / "drift_timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "operate" / "decisions.jsonl").is_file()
