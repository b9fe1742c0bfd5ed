"""PCGrad projection and the task-gradient cosine matrix."""

from __future__ import annotations

import torch

from polyhead.trainer.pcgrad import cosine_matrix, pcgrad


def test_conflicting_gradients_are_projected() -> None:
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    total = pcgrad(g, torch.Generator().manual_seed(0))
    # g0 loses its component along g1: (1,0) - (-1/2)(-1,1) = (0.5, 0.5); g1 along g0: (-1,1) + (1,0) = (0, 1)
    torch.testing.assert_close(total, torch.tensor([0.5, 1.5]))
    # Each projected gradient no longer conflicts with the other task's raw gradient.
    assert float(torch.dot(torch.tensor([0.5, 0.5]), g[1])) >= 0


def test_agreeing_gradients_are_summed_unchanged() -> None:
    g = torch.tensor([[1.0, 2.0, 0.0], [0.5, 0.0, 1.0], [0.0, 1.0, 1.0]])
    torch.testing.assert_close(pcgrad(g), g.sum(0))


def test_cosine_matrix() -> None:
    g = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
    cos = cosine_matrix(g)
    torch.testing.assert_close(cos, torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 1.0]]))
