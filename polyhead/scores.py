"""Normalised scores for learning benchmarks and tests: 0 = a uniformly random policy, 1 = the target.

``(R - random) / (target - random)`` puts tasks with different reward scales (Acrobot's -500..0, MiniGrid's
0..1, CartPole's 0..500) on one axis, and says how far a policy is from the task's own bar rather than
from zero.
"""

from __future__ import annotations

import numpy as np

from polyhead.envs import make_env
from polyhead.taskspec import TaskSpec

RANDOM_SEED = 123_000


def random_return(task: TaskSpec, episodes: int, seed: int = RANDOM_SEED) -> float:
    """A uniformly random policy's mean return over ``episodes`` seeded episodes of the task."""
    env = make_env(task)
    env.action_space.seed(seed)
    returns = []
    try:
        for episode in range(episodes):
            env.reset(seed=seed + episode)
            total, done = 0.0, False
            while not done:
                _, reward, terminated, truncated, _ = env.step(env.action_space.sample())
                total += float(reward)
                done = bool(terminated or truncated)
            returns.append(total)
    finally:
        env.close()
    return float(np.mean(returns))


def normalise(value: float, random: float, target: float) -> float:
    """``value`` on the 0 (random policy) to 1 (target return) scale."""
    return (value - random) / (target - random)
