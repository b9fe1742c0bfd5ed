"""`polyhead train` end to end: the --json summary, --help, and bad specs failing before any training."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from polyhead.bundle import Bundle
from polyhead.cli import main
from polyhead.trainer.distributed import backend_for, resolve_device

FAST = [
    "--envs-per-task", "2", "--num-steps", "16", "--update-epochs", "1", "--eval-episodes", "1",
    "--final-eval-episodes", "1",
]  # fmt: skip


def test_train_json_summary(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    cmd = [sys.executable, "-m", "polyhead", "train", "--suite", "classic-mixed", "--out", str(out)]
    proc = subprocess.run(
        [*cmd, "--total-steps", "192", *FAST, "--seed", "7", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert list(summary)[:6] == ["bundle", "suite", "steps", "wall_seconds", "parameters", "tasks"]
    assert summary["bundle"] == str(out)
    assert summary["suite"] == "classic-mixed"
    assert summary["steps"] >= 192
    assert summary["wall_seconds"] > 0
    assert summary["parameters"] > 0
    assert set(summary["tasks"]) == {"cartpole", "acrobot", "cartpole-continuous"}
    assert all(isinstance(v["eval_return"], float) for v in summary["tasks"].values())
    bundle = Bundle.open(out)
    assert bundle.manifest.training["seed"] == 7
    assert bundle.manifest.trunk_architecture["exporter"] == "dynamo"


def test_help_documents_every_ppo_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in (
        "--total-steps", "--seed", "--gamma", "--gae-lambda", "--clip-coef", "--ent-coef", "--max-grad-norm",
        "--task-weights", "--task-sampling", "--grad-surgery", "--critic", "--head-hidden", "--json",
    ):  # fmt: skip
        assert flag in text, flag
    assert "gap" in text and "pcgrad" in text


CARTPOLE = 'env = "CartPole-v1"\n'
BAD_SPECS = {
    "unknown-env": ('id = "bad-env"\nenv = "NoSuchEnv-v9"\n', "'bad-env'", "field 'env'"),
    "unknown-attr": (
        f'id = "bad-attr"\n{CARTPOLE}attrs = {{ pole_colour = 1.0 }}\n',
        "'bad-attr'",
        "attrs.pole_colour",
    ),
    "wrong-type": (
        f'id = "bad-type"\n{CARTPOLE}attrs = {{ length = "long" }}\n',
        "'bad-type'",
        "attrs.length",
    ),
    "unknown-wrapper": (
        f'id = "bad-wrapper"\n{CARTPOLE}[[task.wrappers]]\nname = "no-such-wrapper"\n',
        "'bad-wrapper'",
        "wrappers[0]",
    ),
    "bad-kwarg": (
        f'id = "bad-kwarg"\n{CARTPOLE}kwargs = {{ gravity_well = 3 }}\n',
        "'bad-kwarg'",
        "field 'kwargs'",
    ),
    "duplicate-id": (f'id = "good"\n{CARTPOLE}', "'good'", "duplicate id"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_bad_spec_fails_before_training(
    tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    body, task_name, field = BAD_SPECS[case]
    suite = tmp_path / "suite.toml"
    # A good task first, so a failure proves every task is validated, not only the first.
    suite.write_text(f'[[task]]\nid = "good"\nenv = "CartPole-v1"\n\n[[task]]\n{body}')
    out = tmp_path / "out"
    started = time.perf_counter()
    code = main(["train", "--suite", str(suite), "--out", str(out), "--total-steps", "100000"])
    assert code == 2
    message = capsys.readouterr().err
    assert message.startswith("polyhead train: error: InvalidTaskSpec")
    assert task_name in message, message
    assert field in message, message
    assert not out.exists()
    assert not Path(f"{out}.logs").exists()
    assert time.perf_counter() - started < 20


def test_bad_heldout_task_also_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    suite = tmp_path / "suite.toml"
    suite.write_text(
        '[[task]]\nid = "good"\nenv = "CartPole-v1"\n\n'
        '[[task]]\nid = "later"\nenv = "CartPole-v1"\nrole = "heldout"\nattrs = { masscart = true }\n'
    )
    assert main(["train", "--suite", str(suite), "--out", str(tmp_path / "out")]) == 2
    assert "attrs.masscart" in capsys.readouterr().err


def test_unknown_suite_and_task_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--suite", "no-such-suite", "--out", str(tmp_path / "a")]) == 2
    assert "unknown suite 'no-such-suite'" in capsys.readouterr().err
    code = main(
        ["train", "--suite", "cartpole-family", "--out", str(tmp_path / "b"), "--task-weights", "nope=2"]
    )
    assert code == 2
    assert "nope" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_independent_baseline_from_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sep"
    args = ["train", "--suite", "classic-mixed", "--out", str(out), "--total-steps", "192", *FAST]
    assert main([*args, "--independent", "--exporter", "torchscript", "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(summary["tasks"]) == {"cartpole", "acrobot", "cartpole-continuous"}
    for task_id in summary["tasks"]:
        assert Bundle.open(out / task_id).task_ids() == [task_id]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without a GPU")
def test_device_cuda_without_a_gpu_is_a_one_line_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for extra in ([], ["--nproc", "2"]):  # refused before torchrun starts, too
        code = main(["train", "--device", "cuda", "--out", str(tmp_path / "b"), *extra])
        assert code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        assert "--device cuda" in err
        assert "sees no CUDA GPU" in err
        assert "use --device cpu or auto" in err
    assert not (tmp_path / "b").exists()
    # Without a GPU, auto is the CPU (the trainer as it always ran), for any number of ranks.
    for local_ranks in (1, 2):
        assert resolve_device("auto", local_ranks=local_ranks) == torch.device("cpu")
    assert backend_for(resolve_device("auto")) == "gloo"
