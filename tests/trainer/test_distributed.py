"""Multi-task PPO on several processes (torchrun, gloo on CPU) and resumable training.

The torchrun tests start real torchrun agents and real worker processes; on a 2-core machine a 2-rank
run is slow, so their budgets are tiny and they are marked ``slow``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from polyhead.bundle import Bundle
from polyhead.cli import main
from polyhead.errors import InvalidArgument
from polyhead.taskspec import load_suite
from polyhead.trainer.checkpoint import checkpoint_path
from polyhead.trainer.config import PPOConfig
from polyhead.trainer.distributed import Ranks, batch_moments
from polyhead.trainer.policy import load_policy
from polyhead.trainer.running_stats import fold_moments
from polyhead.trainer.train import train

HERE = Path(__file__).parent
ROOT = HERE.parent.parent

TWO_CARTPOLES = """
[suite]
name = "two-cartpoles"
[[task]]
id = "cartpole"
env = "CartPole-v1"
target_return = 475.0
[[task]]
id = "cartpole-heavy"
env = "CartPole-v1"
target_return = 475.0
attrs = { masspole = 0.5 }
"""
# Tiny settings for runs that only need to finish: 2 tasks x 2 envs x 16 steps = 64 steps an iteration.
TINY = [
    "--envs-per-task", "2", "--num-steps", "16", "--update-epochs", "2", "--eval-episodes", "2",
    "--final-eval-episodes", "2", "--exporter", "torchscript", "--no-progress", "--json",
]  # fmt: skip


def suite_file(tmp_path: Path) -> Path:
    path = tmp_path / "two.toml"
    path.write_text(TWO_CARTPOLES)
    return path


def polyhead_train(*args: str, timeout: float = 400) -> dict[str, Any]:
    """``polyhead train ARGS`` in a fresh process; returns its --json summary (fails on a non-zero exit)."""
    proc = subprocess.run(
        [sys.executable, "-m", "polyhead", "train", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return summary


def assert_valid_bundle(path: Path, task_ids: set[str]) -> Bundle:
    """Opens with every hash verified, holds every task, and its ONNX trunk matches its torch checkpoint."""
    bundle = Bundle.open(path)
    bundle.verify_checkpoint()
    assert set(bundle.task_ids()) == task_ids
    policy = load_policy(bundle)
    embedding = np.random.default_rng(0).normal(size=(5, bundle.manifest.embedding_size)).astype(np.float32)
    (features,) = ort.InferenceSession(str(bundle.trunk_path)).run(None, {"embedding": embedding})
    with torch.no_grad():
        expected = policy.trunk(torch.as_tensor(embedding))
    np.testing.assert_allclose(features, expected.numpy(), atol=1e-5)
    return bundle


def metrics_rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


# --- the statistics every rank must agree on ---------------------------------------------------------------
def test_fold_moments_is_the_moments_of_the_union() -> None:
    rng = np.random.default_rng(1)
    parts = [rng.normal(3.0, 2.0, size=(n, 3)) for n in (5, 0, 1, 9)]
    stats = [batch_moments(torch.as_tensor(p)) for p in parts]
    mean, var, count = fold_moments(*(torch.stack(s) for s in zip(*stats, strict=True)))
    union = torch.as_tensor(np.concatenate(parts))
    want = batch_moments(union)
    torch.testing.assert_close(mean, want[0])
    torch.testing.assert_close(var, want[1])
    torch.testing.assert_close(count, want[2])
    # Nothing seen anywhere: zeros, not 0/0.
    empty = batch_moments(torch.zeros(0, 2))
    out = fold_moments(*(torch.stack([e, e]) for e in empty))
    assert all(torch.equal(o, torch.zeros(2, dtype=torch.float64)) for o in out)


def test_ranks_share_the_envs_round_robin() -> None:
    assert Ranks().owned(3).tolist() == [0, 1, 2]
    assert Ranks(rank=0, world_size=2).owned(5).tolist() == [0, 2, 4]
    assert Ranks(rank=1, world_size=2).owned(5).tolist() == [1, 3]
    assert [Ranks(rank=r, world_size=3).local_count(4) for r in range(3)] == [2, 1, 1]


@pytest.mark.slow
def test_two_ranks_compute_what_one_process_computes(tmp_path: Path) -> None:
    """Moments, evaluation and a DDP update (plain and PCGrad) on uneven shards, checked inside a real
    2-rank torchrun."""
    subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            str(HERE / "dist_worker.py"), str(tmp_path),
        ],
        check=True, cwd=ROOT, timeout=300, capture_output=True,
    )  # fmt: skip
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["world_size"] == 2
        assert result["moments_error"] < 1e-12
        assert result["evaluate_equal"] is True
        # Float32 sums in another order; a missing or wrongly weighted all-reduce is off by ~1e-3.
        assert result["update_error"] < 1e-5
        # PCGrad on 3 tasks (one with reversed actions): the 2-rank step (global per-task trunk
        # gradients, projected alike on every rank, no second average by DDP) equals one process's. On
        # the trunk, relative to its step: PCGrad changed it by ~0.4 % (so a projection happened and
        # was compared), the two steps differ by float noise (~2e-5).
        pcgrad = result["pcgrad"]
        assert pcgrad["error"] < 1e-5
        assert pcgrad["projection"] > 1e-3
        assert pcgrad["trunk_error"] < pcgrad["projection"] / 20
        assert pcgrad["cosines_error"] < 1e-4  # NaN (not computed) fails too


# --- resuming ----------------------------------------------------------------------------------------------
def test_resume_continues_step_count_and_learning_rate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    suite = load_suite(suite_file(tmp_path))
    # 64 steps an iteration, 6 iterations; checkpoints after iterations 2 and 4 (not after the last).
    config = PPOConfig(
        total_steps=384,
        envs_per_task=2,
        num_steps=16,
        update_epochs=2,
        eval_interval=10**9,
        eval_episodes=1,
        final_eval_episodes=1,
        solved_evals=0,
        checkpoint_interval=128,
    )
    first = train(suite, tmp_path / "a", config=config, progress=False, exporter="torchscript")
    run_dir = tmp_path / "a.logs"
    assert checkpoint_path(run_dir).is_file()
    uninterrupted = metrics_rows(run_dir)
    assert [int(r["step"]) for r in uninterrupted] == [64, 128, 192, 256, 320, 384]
    assert first.resumed_from_step is None

    # Resume from the checkpoint at step 256 (iteration 4) through the command line: suite, settings
    # come from the checkpoint.
    code = main(["train", "--resume", str(run_dir), "--out", str(tmp_path / "b"), "--json", "--no-progress"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["resumed_from_step"] == 256
    assert summary["steps"] == 384
    rows = metrics_rows(run_dir)
    # The step count continues (the rows the resumed run redid are replaced, not duplicated) ...
    assert [int(r["step"]) for r in rows] == [64, 128, 192, 256, 320, 384]
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    # ... and so does the annealed learning rate: iteration 5 runs at 1e-3 * (1 - 4/6), not at 1e-3.
    for old, new in zip(uninterrupted[4:], rows[4:], strict=True):
        assert float(new["learning_rate"]) == pytest.approx(float(old["learning_rate"]))
    assert float(rows[4]["learning_rate"]) == pytest.approx(1e-3 * (1 - 4 / 6))
    bundle = assert_valid_bundle(tmp_path / "b", {"cartpole", "cartpole-heavy"})
    assert bundle.manifest.training["steps"] == 384

    # A checkpoint only continues the run it came from.
    with pytest.raises(InvalidArgument, match="--learning-rate"):
        train(
            suite,
            tmp_path / "c",
            config=replace(config, learning_rate=5e-4),
            run_dir=run_dir,
            resume=True,
            progress=False,
        )
    with pytest.raises(InvalidArgument, match="no training checkpoint"):
        train(suite, tmp_path / "d", config=config, run_dir=tmp_path / "nothing", resume=True, progress=False)


# --- torchrun end to end ------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_rank_run_with_gap_sampling_and_pcgrad_exports_a_valid_bundle(tmp_path: Path) -> None:
    """One torchrun launch (each costs ~15 s of start-up here) for two end-to-end paths: gap-based task
    sampling across ranks, and PCGrad (global per-task gradients; test_two_ranks_compute_what_one_process_
    computes shows the equality with one process) with its cosines logged."""
    out = tmp_path / "bundle"
    # Gap sampling over 3 envs per task: a task's 2..4 active envs split 1:1 or 2:1 between the ranks.
    summary = polyhead_train(
        "--suite", str(suite_file(tmp_path)), "--out", str(out), "--nproc", "2",
        "--total-steps", "288", "--eval-interval", "128", *TINY, "--envs-per-task", "3",
        "--task-sampling", "gap", "--grad-surgery", "pcgrad",
    )  # fmt: skip
    assert summary["ranks"] == 2
    assert summary["steps"] == 288
    cosines = np.array(summary["grad_cosines"])
    assert cosines.shape == (2, 2)
    np.testing.assert_allclose(np.diag(cosines), 1.0, atol=1e-3)
    assert np.all(np.abs(cosines) <= 1.0 + 1e-3)
    assert (out / "logs" / "grad_cosines.csv").is_file()
    bundle = assert_valid_bundle(out, {"cartpole", "cartpole-heavy"})
    assert bundle.manifest.training["ranks"] == 2
    # Rank 0 alone wrote the logs: one row per iteration, one eval row per task per evaluation.
    rows = metrics_rows(out / "logs")
    assert [int(r["step"]) for r in rows] == [96, 192, 288]
    assert all(r["ranks"] == "2" for r in rows)
    for r in rows:  # the global allocation: 6 envs in all, at least one per rank for every task
        envs = [int(r["cartpole/envs"]), int(r["cartpole-heavy/envs"])]
        assert sum(envs) == 6
        assert min(envs) >= 2
    evals = (out / "logs" / "eval.csv").read_text().splitlines()
    assert len(evals) == 1 + 2 * 3  # header; evaluations at 128, 256 and the final one


@pytest.mark.slow
def test_one_and_two_ranks_both_train(tmp_path: Path) -> None:
    """Same seed and budget on 1 and 2 ranks: both learn (a random CartPole policy scores about 10-40)."""
    settings = [
        "--suite", str(suite_file(tmp_path)), "--total-steps", "12288", "--envs-per-task", "4",
        "--num-steps", "32", "--update-epochs", "10", "--eval-interval", "4096", "--eval-episodes", "4",
        "--final-eval-episodes", "4", "--exporter", "torchscript", "--no-progress", "--json",
    ]  # fmt: skip
    for nproc in (1, 2):
        out = tmp_path / f"ranks{nproc}"
        summary = polyhead_train(*settings, "--out", str(out), "--nproc", str(nproc))
        assert summary["ranks"] == nproc
        assert summary["steps"] >= 12288
        with (out / "logs" / "eval.csv").open(newline="") as fh:
            evals = list(csv.DictReader(fh))
        first = {
            r["task"]: float(r["eval_return_mean"]) for r in evals if int(r["step"]) == int(evals[0]["step"])
        }
        final = {t: v["eval_return"] for t, v in summary["tasks"].items()}
        for task, value in final.items():
            assert math.isfinite(value)
            assert value > 100, f"{nproc} rank(s): {task} ended at {value} (first evaluation {first[task]})"


def _worker_pids(launcher: int) -> list[int]:
    """The torchrun workers: children of the launching ``polyhead train --nproc`` (torchrun's agent)."""
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    return [int(p) for p in children if b"polyhead" in Path(f"/proc/{p}/cmdline").read_bytes()]


@pytest.mark.slow
def test_killed_rank_is_restarted_and_the_run_resumes(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    run_dir = tmp_path / "bundle.logs"
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "polyhead", "train", "--suite", str(suite_file(tmp_path)),
            "--out", str(out), "--nproc", "2", "--max-restarts", "1", "--total-steps", "2560",
            "--checkpoint-interval", "256", "--eval-interval", "1024", *TINY,
        ],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not checkpoint_path(run_dir).is_file():
            assert proc.poll() is None, proc.communicate()[1][-4000:]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.2)
        workers = _worker_pids(proc.pid)
        assert len(workers) == 2
        os.kill(workers[-1], signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr[-4000:]
    assert "resuming from the last checkpoint" in stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["resumed_from_step"] >= 256
    assert summary["steps"] == 2560
    assert_valid_bundle(out, {"cartpole", "cartpole-heavy"})
    steps = [int(r["step"]) for r in metrics_rows(out / "logs")]
    assert steps == list(range(64, 2561, 64))  # continued, no iteration logged twice


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.slow
def test_two_nodes_rendezvous_over_c10d(tmp_path: Path) -> None:
    """Two torchrun agents (two "nodes", one worker each, so LOCAL_RANK is 0 on both) meet over a c10d
    rendezvous on 127.0.0.1, as the Kubernetes Job's pods do, and train to a valid bundle; only global
    rank 0 writes the logs, the summary and the bundle."""
    out = tmp_path / "bundle"
    run_dir = tmp_path / "bundle.logs"
    port = _free_port()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes",
        "-m", "polyhead", "train", "--suite", str(suite_file(tmp_path)), "--out", str(out),
        "--total-steps", "192", *TINY,
    ]  # fmt: skip
    env = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    nodes = [
        subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env
        )
        for _ in range(2)
    ]
    try:
        outputs = [node.communicate(timeout=400) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.communicate()
    for node, (_, stderr) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, stderr[-4000:]
    # One node's worker is global rank 0 and prints the summary; the other prints nothing on stdout.
    summaries = [stdout.strip().splitlines()[-1] for stdout, _ in outputs if stdout.strip()]
    assert len(summaries) == 1, [stdout for stdout, _ in outputs]
    summary = json.loads(summaries[0])
    assert summary["ranks"] == 2
    assert summary["steps"] == 192
    bundle = assert_valid_bundle(out, {"cartpole", "cartpole-heavy"})
    assert bundle.manifest.training["ranks"] == 2
    # One writer: one TensorBoard file, one row per iteration (two writers would double them or clash).
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    assert [int(r["step"]) for r in metrics_rows(run_dir)] == [64, 128, 192]
    assert len(list((out / "logs").glob("events.out.tfevents.*"))) == 1


def _checkpoint_then_stop(args: list[str], run_dir: Path, *, launcher: bool) -> dict[str, Any]:
    """Start ``polyhead train ARGS``, wait for its first checkpoint, keep a copy, stop the run, and put the
    copy back as the run's checkpoint (the run is "interrupted" there); returns the copy's contents.

    ``launcher``: the run is a ``--nproc`` torchrun launcher, stopped with SIGTERM (its agent stops the
    workers); otherwise the one training process is killed."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "polyhead", "train", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    snapshot = run_dir / "snapshot.pt"
    try:
        deadline = time.monotonic() + 300
        while not checkpoint_path(run_dir).is_file():
            assert proc.poll() is None, proc.communicate()[1][-4000:]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.1)
        shutil.copyfile(checkpoint_path(run_dir), snapshot)  # written by rename: always whole
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM if launcher else signal.SIGKILL)
        proc.communicate(timeout=60)
    shutil.copyfile(snapshot, checkpoint_path(run_dir))
    state: dict[str, Any] = torch.load(snapshot, weights_only=True)
    return state


def _normaliser_count(state: dict[str, Any]) -> float:
    """Observations every encoder's normaliser has seen, summed."""
    return sum(float(v) for k, v in state["policy"].items() if k.endswith("normalizer.count"))


@pytest.mark.slow
@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)])
def test_resume_on_another_number_of_ranks(
    tmp_path: Path, before: int, after: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """A checkpoint written by N ranks continues on M ranks: step count, learning-rate schedule,
    normalisers and per-task statistics carry on (only the environments and random streams restart)."""
    out = tmp_path / "bundle"
    run_dir = tmp_path / "bundle.logs"
    # 64 steps an iteration, 12 iterations, a checkpoint every 2 (the last one, at 640, after iteration 10).
    settings = [
        "--suite", str(suite_file(tmp_path)), "--out", str(out), "--total-steps", "768",
        "--checkpoint-interval", "128", "--eval-interval", "100000", "--solved-evals", "0", *TINY,
    ]  # fmt: skip
    first = _checkpoint_then_stop([*settings, "--nproc", str(before)], run_dir, launcher=before > 1)
    assert first["world_size"] == before
    start = int(first["global_step"])
    assert start < 640, "the first run went too far before it was stopped to leave a checkpoint to compare"

    resume = ["--resume", str(run_dir), "--json", "--no-progress"]
    if after == 1:
        assert main(["train", *resume]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    else:
        summary = polyhead_train(*resume, "--nproc", str(after))
    assert summary["ranks"] == after
    assert summary["resumed_from_step"] == start
    assert summary["steps"] == 768
    assert_valid_bundle(out, {"cartpole", "cartpole-heavy"})

    # The log continues the step count and the annealed learning rate over all 12 iterations.
    rows = metrics_rows(run_dir)
    assert [int(r["step"]) for r in rows] == list(range(64, 769, 64))
    for i, row in enumerate(rows, start=1):
        assert float(row["learning_rate"]) == pytest.approx(1e-3 * (1 - (i - 1) / 12))
        assert int(row["ranks"]) == (before if int(row["step"]) <= start else after)

    # The resumed run's last checkpoint (at 640) extends the first one's statistics by exactly what its
    # iterations saw: every observation of every rank's envs (2 tasks x 2 envs x 16 steps an iteration)
    # in the normalisers, and 2 envs x 16 steps of discounted returns per task in the reward scaling.
    last = torch.load(checkpoint_path(run_dir), weights_only=True)
    assert last["world_size"] == after
    assert int(last["global_step"]) == 640
    iterations = int(last["iteration"]) - int(first["iteration"])
    assert iterations == (640 - start) // 64
    assert _normaliser_count(last) - _normaliser_count(first) == pytest.approx(64 * iterations)
    for task in ("cartpole", "cartpole-heavy"):
        old, new = first["tasks"][task], last["tasks"][task]
        assert new["return_rms"][2] - old["return_rms"][2] == pytest.approx(32 * iterations)
        assert new["episodes"] > old["episodes"]
