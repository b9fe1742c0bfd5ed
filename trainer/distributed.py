"""The trainer's view of a ``torch.distributed`` process group: which rank this is, which environments it
owns, and the per-task statistics every rank must agree on.

``polyhead train`` under ``torchrun`` runs one process per rank. Each rank steps only its share of every
task's environments (env ``i`` of a task belongs to rank ``i % world_size``) and DistributedDataParallel
all-reduces the gradients. Everything the single-process trainer computes over a task's whole batch
(the observation normaliser, reward scaling, advantage normalisation, the recent returns that drive gap
sampling, evaluation) is computed here over the union of the ranks' shares, with the result identical on
every rank: per-rank moments are all-gathered and folded with Chan et al.'s combine
(:func:`polyhead.trainer.running_stats.fold_moments`) in rank order, and episode records are all-gathered
and sorted by (step, environment index), the order one process would have seen them in.

With no process group (``Ranks()``: rank 0 of 1) every method is the identity and no collective runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import torch
import torch.distributed as dist

from polyhead.errors import InvalidArgument
from polyhead.trainer.running_stats import fold_moments

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the process group (``rank`` of ``world_size``)."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> Ranks:
        """The initialised default process group's rank and size; rank 0 of 1 without one."""
        if dist.is_available() and dist.is_initialized():
            return cls(rank=dist.get_rank(), world_size=dist.get_world_size())
        return cls()

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the logs, the checkpoints and the bundle."""
        return self.rank == 0

    def owned(self, count: int) -> npt.NDArray[np.int64]:
        """The global indices (of ``range(count)``) this rank owns: ``rank, rank + world_size, ...``."""
        return np.arange(self.rank, count, self.world_size, dtype=np.int64)

    def local_count(self, count: int) -> int:
        """How many of the first ``count`` global indices this rank owns."""
        return len(range(self.rank, count, self.world_size))

    def combine_moments(
        self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every rank's (mean, population variance, count) vectors [S] combined into the union's [S].

        A collective: every rank must call it with the same S. float64 throughout.
        """
        local = torch.stack([mean, var, count]).to(torch.float64)
        if not self.distributed:
            return local[0], local[1], local[2]
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local)
        stacked = torch.stack(parts)  # [world, 3, S]
        return fold_moments(stacked[:, 0], stacked[:, 1], stacked[:, 2])

    def average(self, values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """The element-wise mean over ranks of a float vector (a collective)."""
        if not self.distributed:
            return values
        tensor = torch.tensor(values, dtype=torch.float64)  # a copy: all_reduce works in place
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        out: npt.NDArray[np.float64] = (tensor / self.world_size).numpy()
        return out

    def mean_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Replace ``tensor`` by its element-wise mean over ranks, in place (a collective); returns it."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            tensor /= self.world_size
        return tensor

    def gather(self, value: T) -> list[T]:
        """Every rank's (picklable) ``value``, in rank order (a collective)."""
        if not self.distributed:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def merge_episodes(self, records: Sequence[tuple[int, int, float]]) -> list[float]:
        """Every rank's ``(step, global env index, return)`` records, as one process would have listed them
        (sorted by step, then env index); returns the returns only (a collective)."""
        merged = sorted(r for part in self.gather(list(records)) for r in part)
        return [r[2] for r in merged]


def resolve_device(choice: str, *, local_ranks: int = 1) -> torch.device:
    """The device ``--device`` names for one of ``local_ranks`` ranks on this node, each needing its own
    GPU: ``cpu``; ``cuda``: the current CUDA device (``polyhead train`` sets it to ``cuda:LOCAL_RANK``);
    ``auto``: cuda when torch sees a GPU for every local rank, else cpu (the same answer on every rank
    of a node).

    Raises InvalidArgument for ``cuda`` when torch sees no GPU or fewer GPUs than local ranks.
    """
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if choice == "auto":
        choice = "cuda" if gpus >= max(local_ranks, 1) else "cpu"
    if choice == "cpu":
        return torch.device("cpu")
    if gpus == 0:
        raise InvalidArgument(
            f"--device cuda: torch {torch.__version__} sees no CUDA GPU (a CPU-only build, no driver, or "
            "CUDA_VISIBLE_DEVICES empty); use --device cpu or auto"
        )
    if gpus < local_ranks:
        raise InvalidArgument(
            f"--device cuda: the {local_ranks} ranks on this node need a GPU each and torch sees {gpus}; "
            f"use at most {gpus} processes per node, or --device cpu"
        )
    return torch.device("cuda", torch.cuda.current_device())


def backend_for(device: torch.device) -> str:
    """The process group backend for a trainer on ``device``: gloo on the CPU; on a GPU NCCL for CUDA
    tensors (the gradients) and gloo for CPU ones (the statistics and episode records, which come from
    the environments and stay on the CPU)."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def batch_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, population variance, count) over the rows of ``x`` [N, S], as float64 vectors [S].

    An empty batch gives zeros (count 0), which :func:`fold_moments` skips.
    """
    x = x.to(torch.float64)
    n = x.shape[0]
    if n == 0:
        zeros = torch.zeros(x.shape[1], dtype=torch.float64)
        return zeros, zeros.clone(), zeros.clone()
    return x.mean(0), x.var(0, unbiased=False), torch.full((x.shape[1],), float(n), dtype=torch.float64)
