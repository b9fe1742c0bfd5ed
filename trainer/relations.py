"""The task-relationship report written at the end of training: how the tasks of a suite relate.

Three views, each a task x task matrix (``relations.json`` and one PNG heatmap each in the run directory):

* **zero-shot transfer**: head i acting on task j (task j's own encoder and the shared trunk, head i's
  deterministic actions), mean return over a few episodes; only where head i acts in task j's action
  space (other cells are null). The diagonal is each task's own return.
* **trunk gradient cosines**: the pairwise cosine of the tasks' policy-loss gradients on the shared trunk,
  as the last PPO update logged them (``--log-grad-cosines`` or ``--grad-surgery pcgrad``; absent
  otherwise). Negative: the tasks pull the shared weights apart.
* **embedding similarity**: the cosine between tasks' mean embeddings (each task's encoder on real
  observations of its own environment, random actions): how close the encoders place the tasks in the
  space the trunk reads.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from polyhead.taskspec import TaskSpec
from polyhead.trainer.envs import TaskEnvs
from polyhead.trainer.export import sample_task_observations
from polyhead.trainer.policy import MultiTaskPolicy

log = logging.getLogger(__name__)

RELATIONS_JSON = "relations.json"


@torch.no_grad()
def transfer_return(
    policy: MultiTaskPolicy, head_task: str, task: TaskSpec, *, episodes: int, seed: int
) -> float:
    """Mean deterministic return of ``head_task``'s head acting on ``task`` (through ``task``'s encoder)."""
    envs = TaskEnvs(task, episodes, policy.observation_size, seed=seed)
    head = policy.head(head_task)
    returns: list[float] = []
    running = np.arange(episodes)
    try:
        while len(running):
            x = torch.as_tensor(envs.obs[running])
            features = policy.features(policy.normalize(x, task.id), task.id)
            step = envs.step(running, head.deterministic(features).numpy())
            returns.extend(step.episode_returns)
            running = running[~(step.terminated | step.truncated)]
    finally:
        envs.close()
    return float(np.mean(returns))


@torch.no_grad()
def embedding_similarity(
    policy: MultiTaskPolicy, tasks: Sequence[TaskSpec], *, seed: int, steps: int = 128
) -> npt.NDArray[np.float64]:
    """Cosine similarity of the tasks' mean embeddings on real observations of their environments."""
    observations = sample_task_observations(tasks, steps_per_task=steps, seed=seed)
    means = []
    for task in tasks:
        x = torch.zeros(steps, policy.observation_size)
        obs = torch.as_tensor(observations[task.id])
        x[:, : obs.shape[1]] = obs
        means.append(policy.embed(policy.normalize(x, task.id), task.id).mean(0).double())
    m = torch.stack(means)
    m = m / m.norm(dim=1, keepdim=True).clamp_min(1e-12)
    out: npt.NDArray[np.float64] = (m @ m.T).numpy()
    return out


def _heatmap(path: Path, title: str, labels: list[str], matrix: list[list[float | None]], fmt: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(labels), 1.0 + 0.8 * len(labels)))
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis")
    ax.set_xticks(range(len(labels)), labels, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(
                j,
                i,
                "n/a" if np.isnan(v) else format(v, fmt),
                ha="center",
                va="center",
                fontsize=7,
                color="w",
            )
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_relations(
    policy: MultiTaskPolicy,
    tasks: Sequence[TaskSpec],
    run_dir: Path,
    *,
    grad_cosines: npt.NDArray[np.float64] | None,
    episodes: int,
    seed: int,
) -> dict[str, Any]:
    """Compute the three matrices, write ``relations.json`` and the PNG heatmaps into ``run_dir``.

    Returns the JSON document (``tasks``, ``transfer`` [head][task] with rows = heads, ``grad_cosines``
    or None, ``embedding_similarity``, ``plots``). The PNGs need matplotlib; without it they are skipped.
    """
    ids = [t.id for t in tasks]
    was_training = policy.training
    policy.eval()
    try:
        transfer: list[list[float | None]] = [
            [
                transfer_return(policy, head, task, episodes=episodes, seed=seed)
                if policy.action_spaces[head] == policy.action_spaces[task.id]
                else None
                for task in tasks
            ]
            for head in ids
        ]
        similarity = embedding_similarity(policy, tasks, seed=seed)
    finally:
        policy.train(was_training)
    doc: dict[str, Any] = {
        "tasks": ids,
        "transfer": transfer,
        "transfer_note": "rows: the head that acts; columns: the task (through its own encoder)",
        "grad_cosines": None if grad_cosines is None else np.round(grad_cosines, 4).tolist(),
        "embedding_similarity": np.round(similarity, 4).tolist(),
        "plots": [],
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        _heatmap(
            run_dir / "relations_transfer.png",
            "zero-shot transfer: head (row) on task (column)",
            ids,
            transfer,
            ".0f",
        )
        plots = ["relations_transfer.png"]
        if grad_cosines is not None:
            _heatmap(
                run_dir / "relations_grad_cosines.png",
                "trunk gradient cosine",
                ids,
                doc["grad_cosines"],
                ".2f",
            )
            plots.append("relations_grad_cosines.png")
        _heatmap(
            run_dir / "relations_embedding.png",
            "task embedding cosine",
            ids,
            doc["embedding_similarity"],
            ".2f",
        )
        plots.append("relations_embedding.png")
        doc["plots"] = plots
    except ImportError:
        log.info("matplotlib is not installed: relations.json only, no heatmaps")
    (run_dir / RELATIONS_JSON).write_text(json.dumps(doc, indent=2) + "\n")
    return doc


__all__ = ["RELATIONS_JSON", "embedding_similarity", "transfer_return", "write_relations"]
