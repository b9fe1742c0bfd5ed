"""``polyhead bench`` on a tiny sweep against a real server: documented JSON keys, sane numbers, the echo
floor, and head swaps under load."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

from polyhead.clients import AdminClient
from polyhead.server.app import BackgroundServer


def test_bench_tiny_sweep_with_echo_floor_and_swaps(
    second_server: BackgroundServer, clients_bundle: Path, tmp_path: Path
) -> None:
    admin_target = f"127.0.0.1:{second_server.admin_port}"
    with AdminClient(admin_target) as admin:
        admin.load_head_dir(
            "cartpole", clients_bundle / "heads" / "cartpole" / "1", version=2, activate=False
        )
        assert admin.versions("cartpole") == ([1, 2], 1)
    out_csv = tmp_path / "bench.csv"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "polyhead",
            "bench",
            "--target",
            second_server.target,
            "--concurrency",
            "1,4",
            "--batch",
            "2",
            "--tasks",
            "cartpole,acrobot",
            "--window-s",
            "0.3",
            "--warmup-s",
            "0.2",
            "--max-windows",
            "3",
            "--echo-floor",
            "--swap-every",
            "30",
            "--admin-target",
            admin_target,
            "--swap-task",
            "cartpole",
            "--csv",
            str(out_csv),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = report["rows"]
    assert [r["concurrency"] for r in rows] == [1, 4]
    for row in rows:
        assert list(row)[:7] == ["concurrency", "batch", "rps", "actions_per_s", "p50_ms", "p99_ms", "errors"]
        assert row["batch"] == 2
        assert row["errors"] == 0 and row["errors_by_code"] == {}
        assert row["rps"] > 10
        assert abs(row["actions_per_s"] - 2 * row["rps"]) < 1e-6 * row["rps"]
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p95_ms"] <= row["p99_ms"] < 5_000
        assert 1 <= row["windows"] <= 3
        echo = row["echo"]
        assert echo["rps"] > 0 and echo["errors"] == 0
        assert row["rps_vs_echo"] == row["rps"] / echo["rps"]
        swap = row["swap"]
        assert swap["swaps"] >= 3
        assert swap["swap_failures"] == {}
        assert swap["errors_during_swaps"] == 0
        assert swap["versions_seen"] == [1, 2]  # responses name the version that produced them
        for key in ("swapped_task_p99_ms", "other_tasks_p99_ms", "steady_p99_ms", "p99_ms"):
            assert swap[key] > 0
    with AdminClient(admin_target) as admin:
        assert admin.versions("cartpole") == ([1, 2], 1)  # bench restores the active version
    with out_csv.open() as fh:
        table = list(csv.DictReader(fh))
    assert [int(r["concurrency"]) for r in table] == [1, 4]
    assert float(table[0]["rps"]) == rows[0]["rps"]
    assert "polyhead bench" in proc.stderr  # the rich table


def test_bench_stream_mode(second_server: BackgroundServer) -> None:
    from polyhead.clients.bench import BenchConfig, run_bench
    from polyhead.clients.channel import ChannelConfig

    report = run_bench(
        BenchConfig(
            channel=ChannelConfig(second_server.target),
            concurrency=(2,),
            tasks=("cartpole-continuous",),
            mode="stream",
            window_s=0.3,
            warmup_s=0.2,
            max_windows=3,
            workers=1,
        )
    )
    (row,) = report.rows
    assert row.stats.errors == 0
    assert row.stats.rps > 10
    assert row.to_json()["mode"] == "stream"
