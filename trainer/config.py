"""The multi-task PPO settings: one frozen, documented dataclass; its field help is ``polyhead train --help``.

Defaults are tuned for the built-in ``cartpole-family`` suite on a 2-core CPU (docs/benchmarks.md): they
start from the rl-zoo CartPole-v1 hyper-parameters (8 envs, 32 steps, 20 epochs over the full batch,
lr 1e-3 annealed, no entropy bonus) with a separate critic per task, but a longer horizon (γ 0.99,
λ 0.9 instead of 0.98, 0.8): with 0.98 the goal task (cartpole-target-right, a small per-step penalty for
the cart's distance to x = 0.5) stalled below 475 in one of three seeds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

TaskSampling = Literal["uniform", "gap"]
GradSurgery = Literal["none", "pcgrad"]
Device = Literal["auto", "cpu", "cuda"]


@dataclass(frozen=True)
class PPOConfig:
    """Multi-task PPO (Schulman et al. 2017) as in CleanRL's ppo.py, with one share of envs per task."""

    total_steps: int = field(
        default=400_000,
        metadata={"help": "environment steps over all tasks together (each task gets an equal share)"},
    )
    seed: int = field(default=1, metadata={"help": "seed of torch, numpy and every environment"})
    envs_per_task: int = field(default=8, metadata={"help": "parallel environments per task"})
    num_steps: int = field(default=32, metadata={"help": "steps per environment per rollout"})
    gamma: float = field(default=0.99, metadata={"help": "discount factor γ"})
    gae_lambda: float = field(default=0.9, metadata={"help": "GAE λ (Schulman et al. 2016)"})
    update_epochs: int = field(default=20, metadata={"help": "optimisation epochs per rollout"})
    num_minibatches: int = field(
        default=1, metadata={"help": "minibatches per epoch (each holds every task)"}
    )
    learning_rate: float = field(default=1e-3, metadata={"help": "Adam learning rate"})
    anneal_lr: bool = field(default=True, metadata={"help": "anneal the learning rate linearly to 0"})
    clip_coef: float = field(default=0.2, metadata={"help": "surrogate clipping ε"})
    clip_vloss: bool = field(default=False, metadata={"help": "clip the value loss around the old values"})
    ent_coef: float = field(default=0.0, metadata={"help": "entropy bonus coefficient"})
    vf_coef: float = field(default=0.5, metadata={"help": "value loss coefficient"})
    max_grad_norm: float = field(default=0.5, metadata={"help": "global gradient norm clip"})
    target_kl: float | None = field(
        default=None, metadata={"help": "stop an update's epochs early when the approximate KL exceeds this"}
    )
    norm_adv: bool = field(default=True, metadata={"help": "normalise advantages per task"})
    norm_reward: bool = field(
        default=True,
        metadata={"help": "scale each task's rewards by the running std of its discounted return"},
    )
    task_weights: tuple[tuple[str, float], ...] = field(
        default=(),
        metadata={"help": "per-task loss weights as TASK=W,TASK=W (unlisted tasks weigh 1)"},
    )
    task_sampling: TaskSampling = field(
        default="uniform",
        metadata={
            "help": "'uniform': the same number of envs per task; 'gap': each rollout gives more envs "
            "(between 1 and twice the share) to tasks furthest below their target return",
            "choices": ("uniform", "gap"),
        },
    )
    grad_surgery: GradSurgery = field(
        default="none",
        metadata={
            "help": "'pcgrad': project conflicting task gradients on the trunk (Yu et al. 2020); "
            "logs the task-gradient cosine matrix",
            "choices": ("none", "pcgrad"),
        },
    )
    log_grad_cosines: bool = field(
        default=False,
        metadata={"help": "log the task-gradient cosine matrix on the trunk without PCGrad (slower)"},
    )
    eval_interval: int = field(
        default=20_000, metadata={"help": "deterministic evaluation every this many total steps"}
    )
    eval_episodes: int = field(default=5, metadata={"help": "episodes per task in each periodic evaluation"})
    final_eval_episodes: int = field(
        default=10, metadata={"help": "episodes per task (fresh seeds) to evaluate the exported checkpoint"}
    )
    relations_episodes: int = field(
        default=3,
        metadata={"help": "episodes per (head, task) pair for the task-relationship report written into "
                  "the run directory at the end (relations.json + PNG heatmaps); 0 skips it"},
    )  # fmt: skip
    solved_evals: int = field(
        default=3,
        metadata={
            "help": "stop early after this many consecutive evaluations reach every task's target return "
            "and the policy reaches them on the final evaluation's episodes too (0: always train for "
            "--total-steps)"
        },
    )
    torch_threads: int = field(
        default=1, metadata={"help": "torch CPU threads (1 is fastest for small MLPs)"}
    )
    device: Device = field(
        default="auto",
        metadata={
            "help": "where the policy, optimizer and rollout tensors live: 'cuda' (under torchrun each "
            "rank on cuda:LOCAL_RANK, NCCL for the gradients), 'cpu' (gloo), 'auto' (cuda when torch "
            "sees a GPU); the environments step on the CPU and the export runs on the CPU either way. "
            "Also applies to --resume. The cuda path has not been run on a GPU yet",
            "choices": ("auto", "cpu", "cuda"),
        },
    )
    checkpoint_interval: int = field(
        default=50_000,
        metadata={
            "help": "write a resumable checkpoint to RUN_DIR/checkpoints/last.pt every this many total "
            "steps (0: never); --resume RUN_DIR and torchrun restarts continue from it"
        },
    )

    def __post_init__(self) -> None:
        if self.checkpoint_interval < 0:
            raise ValueError(
                f"checkpoint_interval must be 0 (never) or positive, got {self.checkpoint_interval}"
            )
        positive = ("total_steps", "envs_per_task", "num_steps", "update_epochs", "num_minibatches")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.gamma <= 1.0 or not 0.0 <= self.gae_lambda <= 1.0:
            raise ValueError("gamma and gae_lambda must lie in [0, 1]")
        if self.task_sampling not in ("uniform", "gap"):
            raise ValueError(f"task_sampling must be 'uniform' or 'gap', got {self.task_sampling!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if self.grad_surgery not in ("none", "pcgrad"):
            raise ValueError(f"grad_surgery must be 'none' or 'pcgrad', got {self.grad_surgery!r}")
        if any(w < 0 for _, w in self.task_weights):
            raise ValueError("task weights must be non-negative")

    # Settings that may change between a run and its resumption (they do not change the maths).
    RESUMABLE_CHANGES = ("checkpoint_interval", "torch_threads", "device")

    def weight(self, task_id: str) -> float:
        return dict(self.task_weights).get(task_id, 1.0)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["task_weights"] = dict(self.task_weights)
        return data
