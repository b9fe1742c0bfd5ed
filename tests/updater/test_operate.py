"""``polyhead operate`` against real servers and real simulators: a task whose environment changes under
it (the actuator reversed) is detected, re-adapted through a canary and promoted, while the other task is
untouched; a restarted controller resumes its canary; the promote / rollback / give-up paths on a real
server."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from updater_helpers import OLD_TASKS, served_actions, wait_for

from polyhead.bundle import Bundle
from polyhead.clients.admin import AdminClient
from polyhead.clients.policy_client import PolicyClient
from polyhead.taskspec import load_task_spec
from polyhead.trainer.operate import DECISIONS_FILE, Decision, OperateState, Operator, default_config
from polyhead.trainer.updater.fleet import SimulatorFleet

DRIFTING, STEADY = OLD_TASKS  # cartpole-long-pole drifts, cartpole-heavy-pole does not
FAST_MONITOR = {
    "regression_window": 10,
    "regression_reference_episodes": 20,
    "regression_alpha": 1e-3,
    "regression_margin": 0.2,
}


def _config(bundle: Path, srv: Any, state_dir: Path, **changes: Any) -> Any:
    values: dict[str, Any] = {
        "bundle": bundle,
        "servers": (srv.target,),
        "admin_targets": (srv.admin_target,),
        "state_dir": state_dir,
        "tasks": (DRIFTING, STEADY),
        "poll_s": 0.3,
        "shares": (20.0, 50.0),
        "judge_episodes": 10,
        "alpha": 0.01,
        "publish_every": 1,
        "budget_steps": 4_000,
        "max_candidates": 4,
        "exporter": "torchscript",
        "ppo": {"envs_per_task": 4, "num_steps": 64, "update_epochs": 4},
    }
    values.update(changes)
    return default_config(**values)


def _drifted(task_id: str) -> Any:
    """The same task with its actuator reversed (push-left and push-right swapped)."""
    from dataclasses import replace

    from polyhead.taskspec import load_suite

    reversed_spec = load_task_spec("cartpole-family:cartpole-reversed")
    base = load_suite("cartpole-family").task(task_id)
    return replace(base, wrappers=(*base.wrappers, *reversed_spec.wrappers))


def _listed(target: str, task_id: str) -> Any:
    with PolicyClient(target, timeout=10.0) as client:
        return client.list_tasks(refresh=True)[task_id]


def test_a_drifted_task_is_detected_canaried_and_recovered_and_the_other_untouched(
    trained_copy: Path, serve: Callable[..., Any], tmp_path: Path
) -> None:
    srv = serve(trained_copy, **FAST_MONITOR)
    before = served_actions(srv.target, (STEADY,))
    steady = SimulatorFleet(
        srv.target, STEADY, clients=2, episodes_per_round=2, mode="stream", seed=3
    ).start()
    normal = SimulatorFleet(
        srv.target, DRIFTING, clients=3, episodes_per_round=2, mode="stream", seed=4
    ).start()
    wait_for(lambda: normal.stats.episodes >= 30, 120, "a stationary reference")
    normal.stop()
    assert not _listed(srv.target, DRIFTING).regressed
    changed = SimulatorFleet(
        srv.target,
        DRIFTING,
        clients=3,
        episodes_per_round=4,
        mode="stream",
        seed=5,
        task_spec=_drifted(DRIFTING),
    ).start()
    decisions: list[Decision] = []
    operator = Operator(_config(trained_copy, srv, tmp_path / "state"), on_decision=decisions.append)
    stop = threading.Event()
    runner = threading.Thread(target=operator.run, args=(stop,), daemon=True)
    runner.start()
    try:
        wait_for(lambda: any(d.decision in ("promote", "give_up") for d in decisions), 240, "a verdict")
    finally:
        stop.set()
        runner.join(timeout=60)
        stats = changed.stop()
        steady_stats = steady.stop()
    kinds = [d.decision for d in decisions]
    assert kinds[0] == "recover" and "p=" in decisions[0].detail  # the monitor's numbers
    assert kinds[1] == "publish" and "at 20%" in decisions[1].detail
    assert "start" in kinds
    # The reversed actuator: the trained head falls at once; a fresh head does better, so the controller
    # widens its canary and promotes it (and, still far below the pre-change return, keeps training).
    promotes = [d for d in decisions if d.decision == "promote"]
    assert promotes, [(d.decision, d.detail) for d in decisions]
    assert "widen" in kinds and any("p=" in d.detail for d in decisions if d.decision == "widen")
    assert kinds.index("widen") < kinds.index("promote")
    promoted = promotes[-1].version
    assert _listed(srv.target, DRIFTING).active_version == promoted
    assert Bundle.open(trained_copy).active_version(DRIFTING) == promoted
    registry = operator.metrics.registry
    assert registry.get_sample_value(
        "polyhead_operate_decisions_total", {"task": DRIFTING, "decision": "promote"}
    ) == float(len(promotes))
    lines = [json.loads(x) for x in (tmp_path / "state" / DECISIONS_FILE).read_text().splitlines()]
    assert [x["decision"] for x in lines] == kinds
    # Nothing else moved: the steady task serves the same actions with the same version; no failed call.
    assert served_actions(srv.target, (STEADY,)) == before
    assert not any(d.task == STEADY for d in decisions)
    assert (
        stats.failed_requests == 0 and steady_stats.failed_requests == 0 and normal.stats.failed_requests == 0
    )


def test_a_restarted_controller_resumes_its_canary(
    trained_copy: Path, serve: Callable[..., Any], tmp_path: Path
) -> None:
    srv = serve(trained_copy, **FAST_MONITOR)
    normal = SimulatorFleet(
        srv.target, DRIFTING, clients=3, episodes_per_round=2, mode="stream", seed=6
    ).start()
    wait_for(lambda: normal.stats.episodes >= 30, 120, "a stationary reference")
    normal.stop()
    changed = SimulatorFleet(
        srv.target,
        DRIFTING,
        clients=2,
        episodes_per_round=2,
        mode="stream",
        seed=7,
        task_spec=_drifted(DRIFTING),
    ).start()
    state_dir = tmp_path / "state"
    # judge_episodes is large, so the first controller is killed while its fresh canary is being counted.
    config = _config(trained_copy, srv, state_dir, judge_episodes=400)
    first = Operator(config)
    try:
        wait_for(
            lambda: (
                first.poll(),
                bool(
                    first.state.recoveries.get(DRIFTING, None)
                    and first.state.recoveries[DRIFTING].canary_returns
                ),
            )[1],
            120,
            "a canary being counted",
        )
        for _ in range(5):
            first.poll()
    finally:
        first.close()  # as a kill would: the state on disk is what the last poll saved
    saved = OperateState.load(state_dir / "state.json").recoveries[DRIFTING]
    assert saved.canary and saved.canary_returns and saved.phase == "choosing"
    listed = _listed(srv.target, DRIFTING)
    assert (listed.canary_version, listed.canary_percent) == (saved.canary, 20.0)
    second = Operator(config)
    try:
        second.poll()
        rec = second.state.recoveries[DRIFTING]
        assert (rec.canary, rec.candidates, rec.phase) == (saved.canary, saved.candidates, "choosing")
        assert len(rec.canary_returns) >= len(saved.canary_returns)  # counts carried on, not restarted
        assert [d.decision for d in second.decisions] == []  # no second "recover", no new candidate
        assert _listed(srv.target, DRIFTING).canary_version == saved.canary
    finally:
        second.close()
        changed.stop()


def test_rollback_and_give_up_paths_on_a_real_server(
    trained_copy: Path, serve: Callable[..., Any], tmp_path: Path
) -> None:
    """A canary judged worse is rolled back on the server; a spent budget gives up, clears the canary and
    raises the gave-up gauge (synthetic returns: the paths, not the learning)."""
    srv = serve(trained_copy)
    operator = Operator(_config(trained_copy, srv, tmp_path / "state", max_candidates=1))
    try:
        operator._begin(DRIFTING, 1, "synthetic")
        rec = operator.state.recoveries[DRIFTING]
        canary = rec.canary
        assert _listed(srv.target, DRIFTING).canary_version == canary
        rec.phase, rec.start = "training", "scratch"
        rec.canary_returns = [10.0 + i % 3 for i in range(12)]
        rec.stable_returns = [200.0 + i % 5 for i in range(12)]
        operator._judge(rec)
        assert operator.decisions[-1].decision == "rollback" and "p=" in operator.decisions[-1].detail
        assert _listed(srv.target, DRIFTING).canary_version == 0
        assert rec.rolled_back == [canary]
        operator.poll()  # one candidate was the budget: the controller gives up
        assert operator.decisions[-1].decision == "give_up"
        assert DRIFTING not in operator.state.recoveries and operator.state.gave_up[DRIFTING] == 1
        assert (
            operator.metrics.registry.get_sample_value("polyhead_operate_gave_up", {"task": DRIFTING}) == 1.0
        )
        with AdminClient(srv.admin_target) as admin:
            assert admin.versions(DRIFTING)[1] == 1  # stable untouched
    finally:
        operator.close()


@pytest.mark.parametrize("supersede", [True, False])
def test_a_stale_first_share_canary_is_superseded_by_the_newer_candidate(
    trained_copy: Path, serve: Callable[..., Any], tmp_path: Path, supersede: bool
) -> None:
    """Neither better nor worse after its episodes, while the learner trained on: the canary is replaced
    on the server by a newly published candidate (or, with supersede off, left to its longer verdict)."""
    srv = serve(trained_copy)
    operator = Operator(_config(trained_copy, srv, tmp_path / "state", supersede=supersede))
    try:
        operator._begin(DRIFTING, 1, "synthetic")
        rec = operator.state.recoveries[DRIFTING]
        first = rec.canary
        rec.phase, rec.start = "training", "scratch"
        same = [100.0 + (i * 7) % 11 for i in range(12)]
        rec.canary_returns, rec.stable_returns = list(same), list(reversed(same))
        operator._live(rec).updates_since_publish = 1  # publish_every=1: a newer snapshot exists
        decided = len(operator.decisions)
        operator._judge(rec)
        listed = _listed(srv.target, DRIFTING)
        if supersede:
            assert [d.decision for d in operator.decisions[decided:]] == ["supersede", "publish"]
            assert operator.decisions[decided].version == first
            assert rec.canary == listed.canary_version == rec.candidates[-1] != first
            assert rec.canary_returns == [] and rec.share_index == 0
        else:
            assert operator.decisions[decided:] == []
            assert rec.canary == listed.canary_version == first
    finally:
        operator.close()


@pytest.mark.parametrize("flag", ["--help"])
def test_operate_help_names_every_option(flag: str) -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "polyhead", "operate", flag],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    for option in (
        "--server",
        "--bundle",
        "--shares",
        "--judge-episodes",
        "--budget-steps",
        "--state-dir",
        "--no-supersede",
        "--json",
    ):
        assert option in out
