"""Trainer steps/s against a plain single-task CleanRL-style PPO loop, as a ratio measured in one run.

The plain loop (below, in CleanRL's shape: gymnasium SyncVectorEnv, separate 64-64 actor and critic,
GAE, clipped surrogate) and the polyhead trainer run the same settings on CartPole-v1: 8 envs x 32 steps,
20 epochs over the full batch, one torch thread, no periodic evaluation. The trainer also runs the
5-task cartpole-family (5 x 8 envs). Runs alternate (plain, trainer, plain, trainer, ...) so the shared
machine's load hits both alike; the ratios use the medians, per wall second and per CPU second of the
process (steadier when other work shares the cores). Both are timed from the end of their first
iteration to the end of their last (the trainer's from its metrics.csv rows), so set-up, the trainer's
final evaluation and export are excluded.

    .venv/bin/python benchmarks/trainer_throughput.py [--steps 40000] [--repeats 2]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from torch.distributions import Categorical
from trainer_common import machine

from polyhead.taskspec import Suite, TaskSpec, load_suite
from polyhead.trainer.config import PPOConfig
from polyhead.trainer.train import train

NUM_ENVS, NUM_STEPS, EPOCHS, LR, GAMMA, LAMBDA, CLIP = 8, 32, 20, 1e-3, 0.98, 0.8, 0.2


def layer_init(layer: nn.Linear, std: float = np.sqrt(2), bias_const: float = 0.0) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.critic = nn.Sequential(
            layer_init(nn.Linear(4, 64)), nn.Tanh(), layer_init(nn.Linear(64, 64)), nn.Tanh(),
            layer_init(nn.Linear(64, 1), std=1.0),
        )  # fmt: skip
        self.actor = nn.Sequential(
            layer_init(nn.Linear(4, 64)), nn.Tanh(), layer_init(nn.Linear(64, 64)), nn.Tanh(),
            layer_init(nn.Linear(64, 2), std=0.01),
        )  # fmt: skip

    def get_value(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.critic(x)
        return out

    def get_action_and_value(
        self, x: torch.Tensor, action: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        probs = Categorical(logits=self.actor(x))
        if action is None:
            action = probs.sample()  # type: ignore[no-untyped-call]
        logprob, entropy = probs.log_prob(action), probs.entropy()  # type: ignore[no-untyped-call]
        return action, logprob, entropy, self.critic(x)


def plain_cleanrl(total_steps: int, seed: int) -> tuple[float, float]:
    """A CleanRL-style single-task PPO loop on CartPole-v1; returns steps per wall and per CPU second."""
    torch.manual_seed(seed)
    envs = gym.vector.SyncVectorEnv(
        [lambda: gym.make("CartPole-v1") for _ in range(NUM_ENVS)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    agent = Agent()
    optimizer = torch.optim.Adam(agent.parameters(), lr=LR, eps=1e-5)
    obs = torch.zeros((NUM_STEPS, NUM_ENVS, 4))
    actions = torch.zeros((NUM_STEPS, NUM_ENVS))
    logprobs = torch.zeros((NUM_STEPS, NUM_ENVS))
    rewards = torch.zeros((NUM_STEPS, NUM_ENVS))
    dones = torch.zeros((NUM_STEPS, NUM_ENVS))
    values = torch.zeros((NUM_STEPS, NUM_ENVS))
    batch_size = NUM_ENVS * NUM_STEPS
    num_iterations = total_steps // batch_size
    next_obs = torch.Tensor(envs.reset(seed=seed)[0])
    next_done = torch.zeros(NUM_ENVS)
    start, cpu_start = time.perf_counter(), time.process_time()
    for iteration in range(1, num_iterations + 1):
        if iteration == 2:  # time from the end of the first iteration, as for the trainer
            start, cpu_start = time.perf_counter(), time.process_time()
        optimizer.param_groups[0]["lr"] = (1.0 - (iteration - 1.0) / num_iterations) * LR
        for step in range(NUM_STEPS):
            obs[step] = next_obs
            dones[step] = next_done
            with torch.no_grad():
                action, logprob, _, value = agent.get_action_and_value(next_obs)
                values[step] = value.flatten()
            actions[step] = action
            logprobs[step] = logprob
            next_obs_np, reward, terminations, truncations, _ = envs.step(action.numpy())
            rewards[step] = torch.tensor(reward)
            next_obs = torch.Tensor(next_obs_np)
            next_done = torch.Tensor(np.logical_or(terminations, truncations).astype(np.float32))
        with torch.no_grad():
            next_value = agent.get_value(next_obs).reshape(1, -1)
            advantages = torch.zeros_like(rewards)
            lastgaelam = torch.zeros(NUM_ENVS)
            for t in reversed(range(NUM_STEPS)):
                nextnonterminal = 1.0 - (next_done if t == NUM_STEPS - 1 else dones[t + 1])
                nextvalues = next_value if t == NUM_STEPS - 1 else values[t + 1]
                delta = rewards[t] + GAMMA * nextvalues * nextnonterminal - values[t]
                advantages[t] = lastgaelam = delta + GAMMA * LAMBDA * nextnonterminal * lastgaelam
            returns = advantages + values
        b_obs, b_actions = obs.reshape(-1, 4), actions.reshape(-1)
        b_logprobs, b_advantages, b_returns = (
            logprobs.reshape(-1),
            advantages.reshape(-1),
            returns.reshape(-1),
        )
        for _ in range(EPOCHS):
            mb_inds = np.random.permutation(batch_size)
            _, newlogprob, _, newvalue = agent.get_action_and_value(b_obs[mb_inds], b_actions.long()[mb_inds])
            ratio = (newlogprob - b_logprobs[mb_inds]).exp()
            mb_adv = b_advantages[mb_inds]
            mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
            pg_loss = torch.max(-mb_adv * ratio, -mb_adv * torch.clamp(ratio, 1 - CLIP, 1 + CLIP)).mean()
            v_loss = 0.5 * ((newvalue.view(-1) - b_returns[mb_inds]) ** 2).mean()
            loss = pg_loss + 0.5 * v_loss
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            nn.utils.clip_grad_norm_(agent.parameters(), 0.5)
            optimizer.step()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    envs.close()
    steps = (num_iterations - 1) * batch_size
    return steps / elapsed, steps / cpu


def polyhead_trainer(suite: Suite, total_steps: int, seed: int) -> tuple[float, float]:
    """The polyhead trainer on ``suite`` with the same settings; returns training-loop steps per wall
    and per CPU second."""
    config = replace(
        PPOConfig(),
        total_steps=total_steps,
        seed=seed,
        envs_per_task=NUM_ENVS,
        num_steps=NUM_STEPS,
        update_epochs=EPOCHS,
        num_minibatches=1,
        eval_interval=10**12,
        solved_evals=0,
        final_eval_episodes=1,
    )
    with tempfile.TemporaryDirectory() as tmp:
        result = train(suite, Path(tmp) / "b", config=config, progress=False, exporter="torchscript")
        with (result.bundle / "logs" / "metrics.csv").open() as fh:
            rows = list(csv.DictReader(fh))
    # From the end of the first iteration to the end of the last: set-up, evaluation and export excluded.
    first, last = rows[0], rows[-1]
    steps = int(last["step"]) - int(first["step"])
    wall = float(last["wall_seconds"]) - float(first["wall_seconds"])
    cpu = float(last["cpu_seconds"]) - float(first["cpu_seconds"])
    return steps / wall, steps / cpu


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=40_000, help="env steps per single-task run")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {machine()}")
    single = Suite(name="cartpole", tasks=(TaskSpec(id="cartpole", env="CartPole-v1", target_return=475.0),))
    family = load_suite("cartpole-family")
    runs: dict[str, list[tuple[float, float]]] = {"plain": [], "single": [], "family": []}
    for r in range(args.repeats):
        runs["plain"].append(plain_cleanrl(args.steps, seed=r + 1))
        runs["single"].append(polyhead_trainer(single, args.steps, seed=r + 1))
        runs["family"].append(polyhead_trainer(family, args.steps * len(family.train_tasks), seed=r + 1))
        text = "  ".join(
            f"{k} {w:,.0f} wall / {c:,.0f} CPU" for k, (w, c) in ((k, v[-1]) for k, v in runs.items())
        )
        print(f"repeat {r}: {text} (steps/s)", flush=True)
    med = {
        k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in runs.items()
    }
    p = med["plain"]
    labels = {
        "plain": "plain CleanRL-style loop, CartPole-v1",
        "single": "polyhead trainer, 1 task (CartPole-v1)",
        "family": "polyhead trainer, cartpole-family (5 tasks)",
    }
    header = f"median of {args.repeats} repeats"
    print(f"\n{header:45s} {'wall steps/s':>13s} {'ratio':>6s} {'CPU steps/s':>12s} {'ratio':>6s}")
    for key, label in labels.items():
        w, c = med[key]
        print(f"{label:45s} {w:13,.0f} {w / p[0]:6.2f} {c:12,.0f} {c / p[1]:6.2f}")


if __name__ == "__main__":
    main()
