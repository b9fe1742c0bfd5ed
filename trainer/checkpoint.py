"""Resumable training checkpoints: ``RUN_DIR/checkpoints/last.pt``.

A checkpoint holds what a run needs to continue where it stopped instead of starting over: the suite's
tasks and the configs it was started with (a resume must match them), where the bundle goes, the policy
(its observation normaliser included), the optimizer, the iteration and step counters (so the learning
rate schedule continues), the evaluation bookkeeping (next evaluation, best checkpoint so far, solved
streak), each task's reward-scaling statistics and recent returns, every rank's CPU random number
generators, and under torchrun PCGrad's task-order generator (the same on every rank). CUDA's generators
are not saved: a run on a GPU (``--device cuda``) resumes with the same maths but another action stream.
Environments are not saved (a gymnasium env need not be picklable): a resumed run resets them
with fresh seeds, so the episodes in flight at the checkpoint are lost, as in SB3 or CleanRL.

A checkpoint does not tie a run to its number of ranks: everything in it but the random generators is
global (the normalisers and per-task statistics of every rank's environments, the optimizer, the
counters), and the batch size does not depend on the ranks, so a run checkpointed by N ranks continues on
M; only the per-rank random streams start afresh.

Rank 0 writes it atomically (a temporary file in the same folder, fsync, rename), so a rank killed while
it writes leaves the previous checkpoint intact. It is loaded with ``torch.load(weights_only=True)``:
only tensors and plain Python values, no pickled code.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polyhead.errors import InvalidArgument

CHECKPOINT_FORMAT = "polyhead-training-checkpoint"
CHECKPOINT_VERSION = 1


def checkpoint_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints" / "last.pt"


def has_checkpoint(run_dir: str | Path) -> bool:
    return checkpoint_path(run_dir).is_file()


def save_checkpoint(run_dir: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (plus the format header) atomically; returns the path."""
    path = checkpoint_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}, buf)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".last.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a checkpoint is as readable as the logs beside it
        with os.fdopen(fd, "wb") as fh:
            fh.write(buf.getvalue())
            fh.flush()
            os.fsync(fh.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(run_dir: str | Path) -> dict[str, Any]:
    """The checkpoint of the run in ``run_dir``; raises InvalidArgument when there is none or it is bad."""
    path = checkpoint_path(run_dir)
    if not path.is_file():
        raise InvalidArgument(
            f"no training checkpoint at {path}; --resume takes the run directory of a run that wrote one "
            "(see --checkpoint-interval)"
        )
    try:
        state: dict[str, Any] = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:
        raise InvalidArgument(f"{path}: cannot read the checkpoint: {type(exc).__name__}: {exc}") from exc
    if state.get("format") != CHECKPOINT_FORMAT:
        raise InvalidArgument(f"{path}: not a polyhead training checkpoint")
    if int(state.get("version", 0)) > CHECKPOINT_VERSION:
        raise InvalidArgument(
            f"{path}: checkpoint version {state['version']} is newer than this polyhead reads"
        )
    return state


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """This process's random number generators (torch's global one, the update's, numpy's global one)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        # The current device's generator: each rank trains on its own GPU (set before the model is built),
        # and dropout-free PPO draws on it only through ops that sample on the device.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator) -> None:
    """Put back what :func:`rng_state` saved. A CUDA generator's state is restored when the checkpoint has
    one and this process has CUDA; a run moved between CPU and GPU continues with that device's stream."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    generator.set_state(state["generator"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
