"""The remote loop against a real server with real simulator clients: versions are published and served
live with no failed request, old tasks' served actions do not change, and a bad version is rolled back."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from updater_helpers import OLD_TASKS, remote_config, served_actions, wait_for

from polyhead.bundle import Bundle
from polyhead.clients.admin import AdminClient
from polyhead.envs import task_spaces
from polyhead.taskspec import TaskSpec, load_task_spec
from polyhead.trainer.adapt import adapt, default_config
from polyhead.trainer.export import sample_observations
from polyhead.trainer.policy import load_policy
from polyhead.trainer.updater.control import ServerControl
from polyhead.trainer.updater.fleet import SimulatorFleet
from polyhead.trainer.updater.frozen import freeze_trunk
from polyhead.trainer.updater.guard import RolloutGuard
from polyhead.trainer.updater.metrics import UpdaterMetrics
from polyhead.trainer.updater.publisher import HeadPublisher


def _head_hashes(admin_target: str) -> dict[tuple[str, int], str]:
    with AdminClient(admin_target) as admin:
        return {(h.task_id, h.version): h.head_sha256 for h in admin.list_heads() if h.task_id in OLD_TASKS}


def test_remote_loop_publishes_versions_clients_see_live(
    trained_copy: Path, serve: Callable[..., Any]
) -> None:
    srv = serve(trained_copy)
    before_actions = served_actions(srv.target, OLD_TASKS)
    before_heads = _head_hashes(srv.admin_target)
    task = load_task_spec("cartpole-family:cartpole-reversed")
    metrics = UpdaterMetrics()
    config = remote_config(
        trained_copy,
        task,
        srv,
        init="scratch",
        guard_episodes=2,
        guard_timeout_s=30.0,
        rollback_margin=10.0,  # this test is about publishing; rollback has its own test
        zero_shot_episodes=3,
        ppo={"total_steps": 3_000, "envs_per_task": 4, "num_steps": 64, "update_epochs": 10},
    )
    with SimulatorFleet(srv.target, task.id, clients=4, episodes_per_round=2, seed=5) as fleet:
        result = adapt(config, metrics=metrics)
        wait_for(lambda: fleet.stats.episodes >= 4, 60, "the clients' first rounds")
        stats = fleet.stop()

    assert not fleet.failures
    assert result.versions_published >= 2
    assert result.steps >= 3_000
    assert stats.failed_requests == 0, stats.errors
    assert len(stats.versions_seen) >= 2, f"clients saw only versions {stats.versions_seen}"
    assert stats.versions_seen <= {v["version"] for v in result.versions}
    with AdminClient(srv.admin_target) as admin:
        loaded, active = admin.versions(task.id)
    assert active == result.active_version == Bundle.open(trained_copy).active_version(task.id)
    assert result.served_version == result.active_version  # what the data plane answers
    # At most 3 versions stay loaded (max_loaded_versions); every published one stays on disk.
    assert set(loaded) <= {v["version"] for v in result.versions} and active in loaded
    assert len(loaded) <= 3, loaded
    assert set(Bundle.open(trained_copy).versions(task.id)) >= {v["version"] for v in result.versions}
    assert result.trunk_sha256_before == result.trunk_sha256_after
    published = metrics.registry.get_sample_value(
        "polyhead_updater_versions_published_total", {"task": task.id}
    )
    assert published == result.versions_published
    assert metrics.registry.get_sample_value(
        "polyhead_updater_last_publish_timestamp_seconds", {"task": task.id}
    )
    # Old tasks: same head bytes, same versions, same deterministic actions.
    assert _head_hashes(srv.admin_target) == before_heads
    assert served_actions(srv.target, OLD_TASKS) == before_actions


def _negate_policy_layer(publisher: HeadPublisher) -> None:
    last = [m for m in publisher.policy.head(publisher.task.id).actor if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.neg_()
        last.bias.neg_()


def test_a_regressing_version_is_rolled_back_automatically(
    trained_copy: Path, serve: Callable[..., Any]
) -> None:
    srv = serve(trained_copy)
    task = TaskSpec(id="cartpole-plain", env="CartPole-v1", target_return=475.0)
    policy = load_policy(trained_copy)
    freeze_trunk(policy)
    obs_space, act_space = task_spaces(task)
    best_old = OLD_TASKS[1]
    policy.add_head(task.id, act_space, policy.slots[best_old])  # on the old head's encoder
    policy.head(task.id).load_state_dict(policy.head(best_old).state_dict())
    metrics = UpdaterMetrics()
    control = ServerControl(srv.admin_target)
    publisher = HeadPublisher(
        bundle=Bundle.open(trained_copy),
        policy=policy,
        task=task,
        observation_space=obs_space,
        parity_observations=sample_observations([task], policy.observation_size, steps_per_task=32),
        metrics=metrics,
        control=control,
        exporter="torchscript",
    )
    guard = RolloutGuard(publisher, metrics, margin=0.2, min_episodes=4)
    feed = control.experience(task.id)
    try:
        publisher.publish(eval_return=0.0, training={}, parent=best_old, note="copy of a trained head")
        good_state = {k: v.clone() for k, v in policy.head(task.id).state_dict().items()}
        with SimulatorFleet(srv.target, task.id, clients=3, episodes_per_round=2, seed=9) as fleet:
            deadline = time.monotonic() + 90
            while len(guard.live.recent(1, "sampled", 8)) < 4:
                assert time.monotonic() < deadline, "no live episodes of version 1"
                guard.observe(feed.drain(timeout_s=1.0))
            _negate_policy_layer(publisher)
            publisher.publish(
                eval_return=0.0, training={}, parent=best_old, note="deliberately negated logits"
            )
            guard.watch(2, 1)
            decision = None
            while decision is None:
                assert time.monotonic() < deadline + 60, "no verdict on version 2"
                guard.observe(feed.drain(timeout_s=1.0))
                decision = guard.check()
            wait_for(lambda: fleet.stats.episodes >= 2, 30, "a finished round")
            stats = fleet.stop()
    finally:
        feed.close()
        control.close()

    assert decision.verdict == "regressed", decision.describe()
    assert decision.new_mean < decision.previous_mean
    assert guard.rolled_back == [2]
    with AdminClient(srv.admin_target) as admin:
        assert admin.versions(task.id) == ([1, 2], 1)
    assert Bundle.open(trained_copy).active_version(task.id) == 1
    assert metrics.registry.get_sample_value("polyhead_updater_rollbacks_total", {"task": task.id}) == 1.0
    for name, tensor in policy.head(task.id).state_dict().items():
        assert torch.equal(tensor, good_state[name]), "the learner was not rewound to version 1"
    assert stats.failed_requests == 0
    assert {1, 2} <= stats.versions_seen


def test_remote_needs_a_server(trained_copy: Path) -> None:
    task = load_task_spec("cartpole-family:cartpole-reversed")
    with pytest.raises(ValueError, match="--server or --admin-target"):
        default_config(bundle=trained_copy, task=task, source="remote")


def test_local_adaptation_loads_its_version_into_a_running_server(
    random_copy: Path, serve: Callable[..., Any]
) -> None:
    srv = serve(random_copy)
    before_actions = served_actions(srv.target, OLD_TASKS)
    before_heads = _head_hashes(srv.admin_target)
    config = default_config(
        bundle=random_copy,
        task=load_task_spec("cartpole-family:cartpole-short-heavy"),
        server=srv.target,
        admin_target=srv.admin_target,
        init="scratch",
        exporter="torchscript",
        zero_shot_episodes=2,
        ppo={"total_steps": 1024, "eval_interval": 1024, "eval_episodes": 2, "solved_evals": 0},
    )
    result = adapt(config, metrics=UpdaterMetrics())
    assert result.served_version == result.active_version == 1
    with AdminClient(srv.admin_target) as admin:
        assert admin.versions("cartpole-short-heavy") == ([1], 1)
    assert _head_hashes(srv.admin_target) == before_heads
    assert served_actions(srv.target, OLD_TASKS) == before_actions


def test_metrics_are_served_over_http() -> None:
    import urllib.request

    metrics = UpdaterMetrics()
    metrics.init_task("t")
    metrics.versions_published.labels(task="t").inc()
    port = metrics.serve(0, host="127.0.0.1")
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        metrics.close()
    assert 'polyhead_updater_versions_published_total{task="t"} 1.0' in text
    assert 'polyhead_updater_rollbacks_total{task="t"} 0.0' in text
    for name in ("polyhead_updater_eval_return", "polyhead_updater_last_publish_timestamp_seconds"):
        assert f"# TYPE {name} gauge" in text


def test_polyhead_adapt_remote_command(random_copy: Path, serve: Callable[..., Any]) -> None:
    """The command line end to end: a subprocess updater, clients in this process, the JSON summary."""
    import json
    import subprocess
    import sys

    srv = serve(random_copy)
    task_id = "cartpole-reversed"
    with SimulatorFleet(srv.target, task_id, clients=4, episodes_per_round=2, seed=3) as fleet:
        proc = subprocess.run(
            [
                sys.executable, "-m", "polyhead", "adapt", "--bundle", str(random_copy),
                "--task-spec", f"cartpole-family:{task_id}", "--source", "remote", "--server", srv.target,
                "--admin-target", srv.admin_target, "--init", "scratch", "--total-steps", "1500",
                "--envs-per-task", "4", "--num-steps", "64", "--publish-every", "1", "--guard-episodes", "2",
                "--rollback-margin", "10", "--zero-shot-episodes", "2", "--exporter", "torchscript",
                "--metrics-port", "0", "--no-progress", "--json",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )  # fmt: skip
        stats = fleet.stop()
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["task"] == task_id and summary["source"] == "remote"
    assert summary["steps"] >= 1500 and summary["versions_published"] >= 2
    assert summary["trunk_sha256_before"] == summary["trunk_sha256_after"]
    assert summary["served_version"] == summary["active_version"]
    assert "published cartpole-reversed version 2" in proc.stderr
    assert stats.failed_requests == 0 and len(stats.versions_seen) >= 2


def test_remote_loop_rolls_back_when_the_world_changes_under_a_new_version(
    trained_copy: Path, serve: Callable[..., Any]
) -> None:
    """The full loop: right after version 2 is published the clients' environment changes (the actuator is
    reversed), version 2's live returns collapse against version 1's, and the updater rolls it back on the
    server and in the bundle by itself, counts it and says so in the summary."""
    import threading

    srv = serve(trained_copy)
    task = TaskSpec(id="cartpole-plain", env="CartPole-v1", target_return=475.0)
    surprise = load_task_spec("cartpole-family:cartpole-reversed")
    metrics = UpdaterMetrics()
    config = remote_config(
        trained_copy,
        task,
        srv,
        init="nearest",
        guard_episodes=6,
        guard_timeout_s=60.0,
        rollback_margin=0.2,
        zero_shot_episodes=3,
        ppo={"total_steps": 3_000, "envs_per_task": 4, "num_steps": 64, "update_epochs": 4},
    )
    results: list[Any] = []
    updater = threading.Thread(target=lambda: results.append(adapt(config, metrics=metrics)), daemon=True)
    updater.start()
    normal = SimulatorFleet(srv.target, task.id, clients=4, episodes_per_round=1, seed=21).start()
    control = ServerControl(srv.admin_target)
    try:
        wait_for(lambda: control.versions(task.id)[1] >= 2, 120, "version 2")
    finally:
        control.close()
    changed = SimulatorFleet(
        srv.target, task.id, clients=4, episodes_per_round=2, seed=22, task_spec=surprise
    )
    changed.start()
    stopper = threading.Thread(target=normal.stop)  # the last normal-world rounds end in the background
    stopper.start()
    updater.join(timeout=240)
    stats = changed.stop()
    stopper.join(timeout=60)
    assert results, "the updater did not finish"
    result = results[0]
    assert result.rollbacks >= 1 and result.rolled_back
    rolled = [v["version"] for v in result.versions if v["rolled_back"]]
    assert rolled[0] == 2 and result.active_version not in rolled
    assert metrics.registry.get_sample_value("polyhead_updater_rollbacks_total", {"task": task.id}) == float(
        result.rollbacks
    )
    with AdminClient(srv.admin_target) as admin:
        assert admin.versions(task.id)[1] == result.active_version
    assert Bundle.open(trained_copy).active_version(task.id) == result.active_version
    assert stats.failed_requests == 0 and normal.stats.failed_requests == 0


def test_a_version_below_the_best_old_head_does_not_stay_live(
    trained_copy: Path, serve: Callable[..., Any]
) -> None:
    """A fresh head on a task the old heads already solve: once the guard has its cohort, version 1 is
    found below the best old head's live returns and a copy of that head serves instead, mid-run."""
    srv = serve(trained_copy)
    task = TaskSpec(id="cartpole-plain", env="CartPole-v1", target_return=475.0)
    config = remote_config(
        trained_copy,
        task,
        srv,
        init="scratch",
        publish_every=1_000,  # only version 1 and what the guard does about it
        guard_episodes=6,
        guard_timeout_s=60.0,
        zero_shot_episodes=4,
        ppo={"total_steps": 1_500, "envs_per_task": 4, "num_steps": 64, "update_epochs": 2},
    )
    with SimulatorFleet(srv.target, task.id, clients=3, episodes_per_round=2, seed=4):
        result = adapt(config)
    versions = {v["version"]: v for v in result.versions}
    assert versions[1]["rolled_back"], result.versions
    copies = [v for v in result.versions if v["note"].startswith("copy of")]
    assert copies and "below it on live episodes" in copies[0]["note"], result.versions
    assert result.active_version == copies[0]["version"]
    assert result.rollbacks >= 1
    with AdminClient(srv.admin_target) as admin:
        assert admin.versions(task.id)[1] == copies[0]["version"]
