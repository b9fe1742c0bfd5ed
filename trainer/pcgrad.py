"""Gradient surgery across tasks on the shared trunk: PCGrad and the task-gradient cosine matrix.

PCGrad (Yu et al. 2020, https://arxiv.org/abs/2001.06782): for each task gradient ``g_i``, in a random
order of the other tasks ``j``, when ``g_i · g_j < 0`` remove the conflicting component
``g_i -= (g_i · g_j) / |g_j|² g_j``; the trunk's update is the sum of the projected gradients.
The cosine matrix of the raw gradients is the picture of which tasks help or fight each other.
"""

from __future__ import annotations

import torch


def cosine_matrix(grads: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarity of task gradients ``[n_tasks, n_params]`` -> ``[n_tasks, n_tasks]``."""
    unit = grads / grads.norm(dim=1, keepdim=True).clamp_min(1e-12)
    out: torch.Tensor = unit @ unit.T
    return out


def pcgrad(grads: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Project conflicting task gradients ``[n_tasks, n_params]``; return the summed gradient [n_params]."""
    n = grads.shape[0]
    projected = grads.clone()
    sq_norms = (grads * grads).sum(dim=1).clamp_min(1e-20)
    for i in range(n):
        order = torch.randperm(n, generator=generator).tolist()
        for j in order:
            if j == i:
                continue
            dot = torch.dot(projected[i], grads[j])
            if dot < 0:
                projected[i] -= dot / sq_norms[j] * grads[j]
    return projected.sum(dim=0)
