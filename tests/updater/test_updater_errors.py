"""``polyhead adapt`` fails fast and clearly: exit status 2 and one line that says what was wrong (a bad
task spec, a missing bundle, an unreachable server, bad arguments), before any training."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


def _adapt(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "polyhead", "adapt", "--no-progress", "--json", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    ("spec_text", "expected"),
    [
        (None, "does not exist"),
        ('[[task]]\nid = "a"\nenv = "CartPole-v1"\n[[task]]\nid = "b"\nenv = "CartPole-v1"\n', "exactly one"),
        ('[[task]]\nid = "nope"\nenv = "NoSuchEnv-v9"\n', "NoSuchEnv-v9"),
        ('[[task]]\nid = "cartpole-long-pole"\nenv = "CartPole-v1"\n', "trained with"),
        ('[[task]]\nid = "Bad Id"\nenv = "CartPole-v1"\n', "field 'id'"),
    ],
    ids=["missing-file", "two-tasks", "unknown-env", "existing-task", "bad-id"],
)
def test_bad_task_spec_fails_with_a_clear_message(
    random_bundle: Path, tmp_path: Path, spec_text: str | None, expected: str
) -> None:
    spec = tmp_path / "task.toml"
    if spec_text is not None:
        spec.write_text(spec_text)
    proc = _adapt("--bundle", str(random_bundle), "--task-spec", str(spec))
    assert proc.returncode == 2, proc.stderr
    assert "InvalidTaskSpec" in proc.stderr and expected in proc.stderr
    assert proc.stdout.strip() == ""  # no summary line for a failed run


def test_unreachable_server_fails_with_a_clear_message(random_copy: Path) -> None:
    proc = _adapt(
        "--bundle", str(random_copy), "--task-spec", "cartpole-family:cartpole-reversed",
        "--source", "remote", "--admin-target", "127.0.0.1:1",
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "ServerUnreachable" in proc.stderr and "127.0.0.1:1" in proc.stderr
    assert not (random_copy / "heads" / "cartpole-reversed").exists()


def test_remote_without_a_server_is_an_argument_error(random_bundle: Path) -> None:
    proc = _adapt(
        "--bundle", str(random_bundle), "--task-spec", "cartpole-family:cartpole-reversed",
        "--source", "remote",
    )  # fmt: skip
    assert proc.returncode == 2
    assert "--server or --admin-target" in proc.stderr


def test_missing_bundle_fails_with_a_clear_message(tmp_path: Path) -> None:
    proc = _adapt("--bundle", str(tmp_path / "nowhere"), "--task-spec", "cartpole-family:cartpole-reversed")
    assert proc.returncode == 2
    assert "BundleNotFound" in proc.stderr and "does not exist" in proc.stderr


def test_admin_token_is_required_and_used(random_copy: Path, serve: Callable[..., Any]) -> None:
    from polyhead.errors import Unauthenticated
    from polyhead.trainer.updater.control import ServerControl

    srv = serve(random_copy, admin_token="s3cret")
    without = ServerControl(srv.admin_target)
    try:
        with pytest.raises(Unauthenticated, match="--admin-token"):
            without.check()
    finally:
        without.close()
    with_token = ServerControl(srv.admin_target, token="s3cret")
    try:
        with_token.check()
        assert with_token.versions("cartpole-long-pole")[1] == 1
    finally:
        with_token.close()
