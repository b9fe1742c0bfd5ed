"""The shared-trunk multi-head policy: observation normaliser + trunk MLP + one head per task.

Shapes and conventions (the ONNX contract in polyhead.bundle follows them):

* the trunk takes observations flattened and zero-padded to ``observation_size`` (D) and returns
  ``features`` [B, F] and the normalised observation ``obs_norm`` [B, D];
  ``obs_norm = clip((obs - mean) / sqrt(var + eps), -clip, clip)`` with running statistics that are
  updated during training only (``ObsNormalizer.update``) and frozen into the exported trunk;
* a head maps features (and, with a separate critic, ``obs_norm``) to its action distribution's
  parameters (categorical ``logits`` or Gaussian ``mean`` + state-independent ``log_std``) and a ``value``.
  Gaussian heads act in the [-1, 1] frame (see polyhead.spaces.raw_to_env_action).

``critic="separate"`` gives each task its own small value MLP on ``obs_norm``: the served policy is the
trunk plus the policy heads, and the critic need not share (and fight over) the trunk (DESIGN.md §9).
``critic="shared"`` puts a linear value layer on the trunk features instead.

The trunk checkpoint (``trunk.pt`` in a bundle) holds the config, the observation size, every head's
action space and the whole state dict; :func:`load_policy` rebuilds the module from it.
"""

from __future__ import annotations

import io
import itertools
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.distributions import Categorical, Distribution, Normal

from polyhead.bundle import Bundle
from polyhead.errors import BundleError
from polyhead.spaces import DiscreteSpec, SpaceSpec, action_dim, space_from_json, space_to_json
from polyhead.trainer.running_stats import combine_moments

CHECKPOINT_FORMAT = "polyhead-trunk-checkpoint"
CHECKPOINT_VERSION = 1

Critic = Literal["separate", "shared"]
Activation = Literal["tanh", "relu"]


@dataclass(frozen=True)
class PolicyConfig:
    """The policy architecture (every field is a ``polyhead train`` option)."""

    trunk_hidden: tuple[int, ...] = field(
        default=(64,), metadata={"help": "hidden layer sizes of the shared trunk before the feature layer"}
    )
    feature_size: int = field(default=64, metadata={"help": "size F of the trunk's output features"})
    head_hidden: tuple[int, ...] = field(
        default=(), metadata={"help": "hidden sizes of each policy head; empty = a linear head"}
    )
    critic: Critic = field(
        default="separate",
        metadata={
            "help": "value function: 'separate' = a per-task MLP on the normalised observation, "
            "'shared' = a linear layer on the trunk features",
            "choices": ("separate", "shared"),
        },
    )
    critic_hidden: tuple[int, ...] = field(
        default=(64, 64), metadata={"help": "hidden sizes of each task's separate critic MLP"}
    )
    activation: Activation = field(
        default="tanh", metadata={"help": "hidden-layer activation", "choices": ("tanh", "relu")}
    )
    init_log_std: float = field(default=0.0, metadata={"help": "initial log std of Gaussian heads"})
    obs_clip: float = field(default=10.0, metadata={"help": "normalised observations are clipped to ±this"})

    def __post_init__(self) -> None:
        if self.feature_size < 1 or any(h < 1 for h in (*self.trunk_hidden, *self.head_hidden)):
            raise ValueError("layer sizes must be positive")
        if self.critic not in ("separate", "shared"):
            raise ValueError(f"critic must be 'separate' or 'shared', got {self.critic!r}")
        if self.activation not in ("tanh", "relu"):
            raise ValueError(f"activation must be 'tanh' or 'relu', got {self.activation!r}")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PolicyConfig:
        known = set(cls.__dataclass_fields__)
        kwargs: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known
        }
        return cls(**kwargs)


def layer_init(layer: nn.Linear, std: float = math.sqrt(2), bias_const: float = 0.0) -> nn.Linear:
    """Orthogonal weights, constant bias (CleanRL's ``layer_init``; Engstrom et al. 2020, §3)."""
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias_const)
    return layer


def _activation(name: Activation) -> nn.Module:
    return nn.Tanh() if name == "tanh" else nn.ReLU()


def mlp(
    sizes: tuple[int, ...], activation: Activation, *, out_std: float | None, final_activation: bool
) -> nn.Sequential:
    """Linear layers through ``sizes``; hidden layers use gain sqrt(2), the last ``out_std`` if given."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        last = i == len(sizes) - 2
        std = out_std if (last and out_std is not None) else math.sqrt(2)
        layers.append(layer_init(nn.Linear(n_in, n_out), std))
        if not last or final_activation:
            layers.append(_activation(activation))
    return nn.Sequential(*layers)


class ObsNormalizer(nn.Module):
    """Running mean/variance of observations (parallel algorithm, float64), applied as a frozen affine map.

    ``update`` is called by the trainer on each batch of collected observations; ``forward`` only reads
    the statistics, so an exported graph holds them as constants.
    """

    mean: torch.Tensor
    var: torch.Tensor
    count: torch.Tensor

    def __init__(self, size: int, *, clip: float = 10.0, epsilon: float = 1e-8) -> None:
        super().__init__()
        self.clip = clip
        self.epsilon = epsilon
        self.register_buffer("mean", torch.zeros(size, dtype=torch.float64))
        self.register_buffer("var", torch.ones(size, dtype=torch.float64))
        # A tiny prior count, as gymnasium's RunningMeanStd, so the first batch dominates.
        self.register_buffer("count", torch.tensor(1e-4, dtype=torch.float64))

    @torch.no_grad()
    def update(self, obs: torch.Tensor | npt.NDArray[Any]) -> None:
        x = torch.as_tensor(obs, dtype=torch.float64).reshape(-1, self.mean.shape[0])
        self.update_moments(x.mean(0), x.var(0, unbiased=False), x.shape[0])

    @torch.no_grad()
    def update_moments(self, batch_mean: torch.Tensor, batch_var: torch.Tensor, batch_count: float) -> None:
        """Merge a batch known by its moments (under torchrun: every rank's observations, combined)."""
        if batch_count <= 0:
            return
        mean, var, count = combine_moments(
            self.mean,
            self.var,
            self.count,
            batch_mean=batch_mean.to(torch.float64),
            batch_var=batch_var.to(torch.float64),
            batch_count=float(batch_count),
        )
        self.mean.copy_(mean)
        self.var.copy_(var)
        self.count.copy_(count)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        scale = torch.rsqrt(self.var.to(obs.dtype) + self.epsilon)
        return torch.clamp((obs - self.mean.to(obs.dtype)) * scale, -self.clip, self.clip)

    def stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return tuple(self.mean.tolist()), tuple(self.var.tolist())


class Trunk(nn.Module):
    """The shared part: ``obs`` [B, D] -> (``features`` [B, F], ``obs_norm`` [B, D])."""

    def __init__(self, observation_size: int, config: PolicyConfig) -> None:
        super().__init__()
        self.normalizer = ObsNormalizer(observation_size, clip=config.obs_clip)
        self.body = mlp(
            (observation_size, *config.trunk_hidden, config.feature_size),
            config.activation,
            out_std=None,
            final_activation=True,
        )

    def features(self, obs_norm: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.body(obs_norm)
        return out

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        obs_norm = self.normalizer(obs)
        return self.features(obs_norm), obs_norm


class TaskHead(nn.Module):
    """One task's policy head and value function.

    Categorical: ``logits`` [B, n]. Gaussian: ``mean`` [B, a] and a state-independent ``log_std`` [a]
    (broadcast to [B, a]). ``value`` [B] comes from the trunk features (shared critic) or from a
    per-task MLP on ``obs_norm`` (separate critic).
    """

    log_std: nn.Parameter | None

    def __init__(self, action_space: SpaceSpec, observation_size: int, config: PolicyConfig) -> None:
        super().__init__()
        self.action_space = action_space
        self.distribution: Literal["categorical", "gaussian"] = (
            "categorical" if isinstance(action_space, DiscreteSpec) else "gaussian"
        )
        self.separate_critic = config.critic == "separate"
        n_out = action_dim(action_space)
        # Policy output layer std 0.01: near-uniform initial actions (CleanRL / Andrychowicz et al. 2021).
        self.actor = mlp(
            (config.feature_size, *config.head_hidden, n_out),
            config.activation,
            out_std=0.01,
            final_activation=False,
        )
        if self.distribution == "gaussian":
            self.log_std = nn.Parameter(torch.full((n_out,), float(config.init_log_std)))
        else:
            self.log_std = None
        critic_in = observation_size if self.separate_critic else config.feature_size
        critic_hidden = config.critic_hidden if self.separate_critic else ()
        self.critic = mlp(
            (critic_in, *critic_hidden, 1), config.activation, out_std=1.0, final_activation=False
        )

    @property
    def inputs(self) -> tuple[str, ...]:
        """The trunk outputs this head reads, in the order of :meth:`forward`'s arguments."""
        return ("features", "obs_norm") if self.separate_critic else ("features",)

    @property
    def outputs(self) -> tuple[str, ...]:
        return ("logits", "value") if self.distribution == "categorical" else ("mean", "log_std", "value")

    def value(self, features: torch.Tensor, obs_norm: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.critic(obs_norm if self.separate_critic else features)
        return out.squeeze(-1)

    def actor_params(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (categorical) or (mean, log_std broadcast to [B, a]) (Gaussian)."""
        out: torch.Tensor = self.actor(features)
        if self.log_std is None:
            return out, None
        return out, self.log_std.expand_as(out)

    def dist(self, features: torch.Tensor) -> Distribution:
        first, log_std = self.actor_params(features)
        if log_std is None:
            # Argument validation costs more than the tiny networks here; the inputs come from our own layers.
            return Categorical(logits=first, validate_args=False)
        return Normal(first, log_std.exp(), validate_args=False)

    def log_prob(self, dist: Distribution, action: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = dist.log_prob(action)
        return out if self.distribution == "categorical" else out.sum(-1)

    def entropy(self, dist: Distribution) -> torch.Tensor:
        out: torch.Tensor = dist.entropy()
        return out if self.distribution == "categorical" else out.sum(-1)

    def deterministic(self, features: torch.Tensor) -> torch.Tensor:
        first, log_std = self.actor_params(features)
        return first.argmax(-1) if log_std is None else first


def head_key(task_id: str) -> str:
    """ModuleDict keys may not contain '.', task ids may."""
    return task_id.replace(".", "%2E")


class MultiTaskPolicy(nn.Module):
    """A trunk shared by all tasks and a ``ModuleDict`` of per-task heads."""

    def __init__(
        self, config: PolicyConfig, observation_size: int, action_spaces: Mapping[str, SpaceSpec]
    ) -> None:
        super().__init__()
        self.config = config
        self.observation_size = observation_size
        self.trunk = Trunk(observation_size, config)
        self.heads = nn.ModuleDict()
        self.action_spaces: dict[str, SpaceSpec] = {}
        for task_id, space in action_spaces.items():
            self.add_head(task_id, space)

    @property
    def task_ids(self) -> list[str]:
        return list(self.action_spaces)

    def add_head(self, task_id: str, action_space: SpaceSpec) -> TaskHead:
        """Add a freshly initialised head (the online updater's starting point for a new task)."""
        if task_id in self.action_spaces:
            raise ValueError(f"task {task_id!r} already has a head")
        head = TaskHead(action_space, self.observation_size, self.config)
        self.heads[head_key(task_id)] = head
        self.action_spaces[task_id] = action_space
        return head

    def head(self, task_id: str) -> TaskHead:
        head = self.heads[head_key(task_id)]
        assert isinstance(head, TaskHead)
        return head

    def normalize(self, obs: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.trunk.normalizer(obs)
        return out

    def features(self, obs_norm: torch.Tensor) -> torch.Tensor:
        return self.trunk.features(obs_norm)

    @torch.no_grad()
    def act_deterministic(self, task_id: str, obs: npt.NDArray[np.float32]) -> npt.NDArray[Any]:
        """Raw deterministic actions for padded observations [B, D] (argmax index / Gaussian mean)."""
        features, _ = self.trunk(torch.as_tensor(obs, dtype=torch.float32))
        return self.head(task_id).deterministic(features).numpy()

    def parameter_count(self, *, task_ids: list[str] | None = None, include_critic: bool = True) -> int:
        """Trainable parameters of the trunk plus the given (default all) heads."""
        total = sum(p.numel() for p in self.trunk.parameters())
        for task_id in task_ids if task_ids is not None else self.task_ids:
            head = self.head(task_id)
            for name, p in head.named_parameters():
                if include_critic or not name.startswith("critic."):
                    total += p.numel()
        return total


# --- the trunk checkpoint ----------------------------------------------------------------------------------
def checkpoint_bytes(policy: MultiTaskPolicy) -> bytes:
    """Serialise config, observation size, head action spaces and the state dict (``torch.save``)."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": policy.config.to_json(),
        "observation_size": policy.observation_size,
        "heads": {
            task_id: {"action_space": space_to_json(space)} for task_id, space in policy.action_spaces.items()
        },
        "state_dict": {k: v.detach().clone() for k, v in policy.state_dict().items()},
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def policy_from_checkpoint(data: bytes, *, where: str = "checkpoint") -> MultiTaskPolicy:
    """Rebuild a policy from :func:`checkpoint_bytes` output; raises BundleError when malformed."""
    try:
        state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        if state.get("format") != CHECKPOINT_FORMAT:
            raise BundleError(f"{where}: not a polyhead trunk checkpoint")
        if int(state.get("version", 0)) > CHECKPOINT_VERSION:
            raise BundleError(
                f"{where}: checkpoint version {state['version']} is newer than this polyhead reads"
            )
        config = PolicyConfig.from_json(state["config"])
        spaces = {t: space_from_json(h["action_space"]) for t, h in state["heads"].items()}
        policy = MultiTaskPolicy(config, int(state["observation_size"]), spaces)
        policy.load_state_dict(state["state_dict"])
    except BundleError:
        raise
    except Exception as exc:
        raise BundleError(f"{where}: cannot load the trunk checkpoint: {type(exc).__name__}: {exc}") from exc
    policy.eval()
    return policy


def load_policy(bundle: Bundle | str | Path) -> MultiTaskPolicy:
    """The torch policy of a bundle (trunk + every head trained with it), from its verified checkpoint."""
    opened = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
    opened.verify_checkpoint()
    return policy_from_checkpoint(opened.checkpoint_path.read_bytes(), where=str(opened.checkpoint_path))


__all__ = [
    "MultiTaskPolicy",
    "ObsNormalizer",
    "PolicyConfig",
    "TaskHead",
    "Trunk",
    "checkpoint_bytes",
    "load_policy",
    "policy_from_checkpoint",
]
