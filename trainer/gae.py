"""Generalised advantage estimation (Schulman et al. 2016, https://arxiv.org/abs/1506.02438)."""

from __future__ import annotations

import torch


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    episode_ends: torch.Tensor,
    next_value: torch.Tensor,
    *,
    gamma: float,
    gae_lambda: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns of one rollout ``[T, N]`` (time first, one column per environment).

    ``episode_ends[t]`` is 1 where the transition at ``t`` ended an episode (terminated or truncated);
    no value is bootstrapped across it. A truncated episode's bootstrap ``γ V(s_final)`` is expected to be
    folded into ``rewards[t]`` already (as SB3 does). ``next_value`` [N] is V of the observation after
    the last step. Returns ``(advantages, returns)`` with ``returns = advantages + values``::

        δ_t = r_t + γ (1 - end_t) V(s_{t+1}) - V(s_t)
        A_t = δ_t + γ λ (1 - end_t) A_{t+1}
    """
    T = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    lastgaelam = torch.zeros_like(next_value)
    for t in reversed(range(T)):
        nextvalues = next_value if t == T - 1 else values[t + 1]
        nextnonterminal = 1.0 - episode_ends[t]
        delta = rewards[t] + gamma * nextvalues * nextnonterminal - values[t]
        lastgaelam = delta + gamma * gae_lambda * nextnonterminal * lastgaelam
        advantages[t] = lastgaelam
    return advantages, advantages + values
