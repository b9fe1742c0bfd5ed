"""GAE against hand-computed values."""

from __future__ import annotations

import torch

from polyhead.trainer.gae import compute_gae


def test_gae_hand_computed_example() -> None:
    # One env, three steps; the episode ends at t=1, so nothing is bootstrapped across it.
    rewards = torch.tensor([[1.0], [1.0], [1.0]])
    values = torch.tensor([[0.5], [0.4], [0.3]])
    ends = torch.tensor([[0.0], [1.0], [0.0]])
    next_value = torch.tensor([0.2])
    advantages, returns = compute_gae(rewards, values, ends, next_value, gamma=0.9, gae_lambda=0.5)
    # t=2: δ = 1 + 0.9·0.2 − 0.3 = 0.88;                A = 0.88
    # t=1: δ = 1 − 0.4 = 0.6 (episode end);              A = 0.6
    # t=0: δ = 1 + 0.9·0.4 − 0.5 = 0.86;  A = 0.86 + 0.9·0.5·0.6 = 1.13
    torch.testing.assert_close(advantages, torch.tensor([[1.13], [0.6], [0.88]]))
    torch.testing.assert_close(returns, torch.tensor([[1.63], [1.0], [1.18]]))


def test_gae_lambda_one_is_monte_carlo_return() -> None:
    gamma = 0.95
    rewards = torch.tensor([[1.0, 2.0], [0.5, -1.0], [2.0, 0.0], [1.0, 1.0]])
    values = torch.tensor([[0.3, 0.1], [0.2, 0.4], [0.1, 0.5], [0.0, 0.2]])
    ends = torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    next_value = torch.tensor([0.7, -0.3])
    _, returns = compute_gae(rewards, values, ends, next_value, gamma=gamma, gae_lambda=1.0)
    expected = torch.zeros_like(rewards)
    running = next_value.clone()
    for t in reversed(range(4)):
        running = rewards[t] + gamma * running * (1 - ends[t])
        expected[t] = running
    torch.testing.assert_close(returns, expected)


def test_gae_lambda_zero_is_one_step_td() -> None:
    rewards = torch.tensor([[1.0], [2.0]])
    values = torch.tensor([[0.5], [1.5]])
    ends = torch.zeros(2, 1)
    advantages, _ = compute_gae(rewards, values, ends, torch.tensor([3.0]), gamma=0.5, gae_lambda=0.0)
    torch.testing.assert_close(advantages, torch.tensor([[1.0 + 0.5 * 1.5 - 0.5], [2.0 + 0.5 * 3.0 - 1.5]]))
