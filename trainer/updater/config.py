"""The online updater's settings: one frozen, documented dataclass (its field help is ``polyhead adapt
--help``), plus the PPO settings it shares with ``polyhead train``."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from polyhead.taskspec import TaskSpec
from polyhead.trainer.config import PPOConfig
from polyhead.trainer.export import DEFAULT_EXPORTER, Exporter

Source = Literal["local", "remote"]
Init = Literal["scratch", "nearest", "both"]
EncoderStart = Literal["share", "copy"]

#: PPO defaults for one head on a frozen trunk: the trainer's rl-zoo CartPole settings with a budget
#: sized for one new task, evaluated often enough to draw a learning curve.
ADAPT_PPO = replace(
    PPOConfig(),
    total_steps=100_000,
    eval_interval=10_000,
    eval_episodes=5,
    final_eval_episodes=10,
    solved_evals=3,
)


@dataclass(frozen=True)
class AdaptConfig:
    """Everything one ``polyhead adapt`` run needs (see docs/updater.md)."""

    bundle: Path
    task: TaskSpec
    source: Source = field(
        default="local",
        metadata={"help": "'local': step gymnasium envs built from the task spec; 'remote': learn from the "
                  "server's experience feed while clients act on the served head"},
    )  # fmt: skip
    init: Init = field(
        default="both",
        metadata={"help": "start the head from 'scratch', from the 'nearest' old head (best zero-shot "
                  "return on the new task), or train 'both' side by side (local) / pick by zero-shot "
                  "return (remote)"},
    )  # fmt: skip
    encoder: EncoderStart = field(
        default="share",
        metadata={"help": "a task whose observation space an old encoder group reads: 'share' that "
                  "group's encoder, frozen (its bytes unchanged), or 'copy' it and train the copy with the "
                  "head. A task with an unseen observation space always trains a fresh encoder of its own"},
    )  # fmt: skip
    encoder_kind: str = field(
        default="mlp",
        metadata={"help": "the fresh encoder of an unseen observation space: 'mlp', or 'cnn:H,W,C' for "
                  "an image of that shape leading the flattened observation"},
    )  # fmt: skip
    ppo: PPOConfig = ADAPT_PPO
    server: str | None = field(
        default=None, metadata={"help": "data-plane HOST:PORT of a running server (checks what it serves)"}
    )
    admin_target: str | None = field(
        default=None,
        metadata={"help": "HeadAdmin HOST:PORT (default: --server's host, port 50052, polyhead serve's "
                  "default admin port)"},
    )  # fmt: skip
    admin_token: str | None = field(default=None, metadata={"help": "bearer token for HeadAdmin calls"})
    publish_every: int = field(
        default=4, metadata={"help": "remote: publish a new head version every this many PPO updates"}
    )
    rollback_margin: float = field(
        default=0.2,
        metadata={"help": "roll a new version back when its live returns are significantly below the "
                  "previous version's minus this fraction of |previous mean| (floor 1)"},
    )  # fmt: skip
    guard_episodes: int = field(
        default=8,
        metadata={"help": "a new version is judged on the first this-many live episodes to start under it "
                  "(once all of them have finished)"},
    )  # fmt: skip
    guard_alpha: float = field(
        default=0.05,
        metadata={"help": "false-alarm rate of the guard's one-sided Mann-Whitney test: a version as good "
                  "as the one it replaced is rolled back with at most this probability"},
    )  # fmt: skip
    guard_timeout_s: float = field(
        default=120.0, metadata={"help": "longest wait for the last version's verdict at the end of a run"}
    )
    max_version_lag: int = field(
        default=2,
        metadata={"help": "remote: train on steps acted by the newest published version and this many "
                  "before it; older (or rolled back) versions' steps are dropped"},
    )  # fmt: skip
    zero_shot_episodes: int = field(
        default=10,
        metadata={"help": "deterministic episodes for the floor and for every compared or published head "
                  "(the same seeds for all, so returns compare)"},
    )  # fmt: skip
    idle_timeout_s: float = field(
        default=120.0, metadata={"help": "remote: give up when no experience arrives for this long"}
    )
    metrics_port: int | None = field(
        default=None, metadata={"help": "serve the updater's Prometheus /metrics on this port (0: any)"}
    )
    exporter: Exporter = DEFAULT_EXPORTER
    progress: bool = True

    def __post_init__(self) -> None:
        if self.encoder not in ("share", "copy"):
            raise ValueError(f"encoder must be 'share' or 'copy', got {self.encoder!r}")
        if self.encoder_kind != "mlp" and not self.encoder_kind.startswith("cnn:"):
            raise ValueError(f"encoder_kind must be 'mlp' or 'cnn:H,W,C', got {self.encoder_kind!r}")
        if self.source not in ("local", "remote"):
            raise ValueError(f"source must be 'local' or 'remote', got {self.source!r}")
        if self.init not in ("scratch", "nearest", "both"):
            raise ValueError(f"init must be 'scratch', 'nearest' or 'both', got {self.init!r}")
        if self.publish_every < 1 or self.guard_episodes < 1 or self.zero_shot_episodes < 1:
            raise ValueError("publish_every, guard_episodes and zero_shot_episodes must be at least 1")
        if not 0.0 < self.guard_alpha < 1.0:
            raise ValueError(f"guard_alpha must be in (0, 1), got {self.guard_alpha}")
        if self.rollback_margin < 0 or self.max_version_lag < 0:
            raise ValueError("rollback_margin and max_version_lag must be non-negative")
        if self.source == "remote" and self.resolved_admin_target is None:
            raise ValueError("--source remote needs --server or --admin-target")

    @property
    def resolved_admin_target(self) -> str | None:
        if self.admin_target:
            return self.admin_target
        if self.server:
            host = self.server.rpartition(":")[0] or "127.0.0.1"
            return f"{host}:50052"
        return None
