"""The multi-task policy: per-task encoders into a shared embedding, one trunk, one head per task.

Shapes and conventions (the ONNX contract in polyhead.bundle follows them):

* each task has an **encoder** (an encoder group's, when the suite lets tasks with the same observation
  space share one): its own observation normaliser
  ``obs_norm = clip((obs - mean) / sqrt(var + eps), -clip, clip)`` (running statistics updated during
  training only, frozen into the export) and a network suited to the space (an MLP for vectors, a small
  CNN for an image or grid, see :class:`TaskEncoder`) into the shared **embedding** [B, E];
* the shared **trunk** maps the embedding to the ``features`` [B, F];
* a head maps features (and, with a separate critic, the task's ``obs_norm``) to its action
  distribution's parameters (categorical ``logits`` or Gaussian ``mean`` + state-independent ``log_std``)
  and a ``value``. Gaussian heads act in the [-1, 1] frame (see polyhead.spaces.raw_to_env_action).

With the defaults (E = F = 64, no encoder or trunk hidden layers) a suite whose tasks share one encoder
group is the network polyhead trained before encoders existed: normaliser, 64 tanh, 64 tanh.

Inside the trainer, observations of several tasks travel in one array zero-padded to
:attr:`MultiTaskPolicy.observation_size` (the widest encoder input) with *segments* saying which rows
belong to which task; each encoder reads only its own leading columns, so the padding never reaches a
network. Nothing about that padding is exported.

``critic="separate"`` gives each task its own small value MLP on its ``obs_norm``: the served policy is
the encoders, trunk and policy heads, and the critic need not share (and fight over) the trunk
(DESIGN.md §9). ``critic="shared"`` puts a linear value layer on the trunk features instead.

The checkpoint (``trunk.pt`` in a bundle) holds the config, the encoder architectures, every head's
action space, encoder group and observation width, and the whole state dict; :func:`load_policy`
rebuilds the module from it.
"""

from __future__ import annotations

import io
import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.distributions import Categorical, Distribution, Normal

from polyhead.bundle import Bundle
from polyhead.errors import BundleError, InvalidTaskSpec
from polyhead.spaces import DiscreteSpec, SpaceSpec, action_dim, space_from_json, space_to_json
from polyhead.taskspec import EncoderKind, EncoderSpec, TaskSpec
from polyhead.trainer.running_stats import combine_moments

CHECKPOINT_FORMAT = "polyhead-trunk-checkpoint"
#: 2: per-task encoders (format 1 was one padded normaliser + MLP trunk; no longer read for training).
CHECKPOINT_VERSION = 2

Critic = Literal["separate", "shared"]
Activation = Literal["tanh", "relu"]
EncoderLayout = Literal["suite", "per-task", "padded"]
#: Rows ``[start, start + n)`` of a multi-task array belong to task ``id``: ``[(id, n), ...]`` in order.
Segments = Sequence[tuple[str, int]]


@dataclass(frozen=True)
class PolicyConfig:
    """The policy architecture (every field is a ``polyhead train`` option)."""

    trunk_hidden: tuple[int, ...] = field(
        default=(),
        metadata={"help": "hidden layer sizes of the shared trunk between the embedding and the features"},
    )
    feature_size: int = field(default=64, metadata={"help": "size F of the trunk's output features"})
    embedding_size: int = field(
        default=64, metadata={"help": "width E of the shared embedding every task's encoder maps into"}
    )
    encoder_hidden: tuple[int, ...] = field(
        default=(),
        metadata={
            "help": "hidden sizes of MLP encoders before the embedding layer (a suite's [[encoder]] "
            "'hidden' overrides it for its group)"
        },
    )
    cnn_channels: tuple[int, ...] = field(
        default=(16, 32), metadata={"help": "channels of a CNN encoder's 2x2 convolutions, in order"}
    )
    encoders: EncoderLayout = field(
        default="suite",
        metadata={
            "help": "encoder layout: 'suite' = the suite's [[encoder]] groups (other tasks their own), "
            "'per-task' = every task its own encoder, 'padded' = one MLP encoder for all tasks on "
            "zero-padded observations (the baseline from before per-task encoders)",
            "choices": ("suite", "per-task", "padded"),
        },
    )
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
        sizes = (*self.trunk_hidden, *self.head_hidden, *self.encoder_hidden, *self.cnn_channels)
        if self.feature_size < 1 or self.embedding_size < 1 or any(h < 1 for h in sizes):
            raise ValueError("layer sizes must be positive")
        if self.encoders not in ("suite", "per-task", "padded"):
            raise ValueError(f"encoders must be 'suite', 'per-task' or 'padded', got {self.encoders!r}")
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


_Layer = TypeVar("_Layer", nn.Linear, nn.Conv2d)


def layer_init(layer: _Layer, std: float = math.sqrt(2), bias_const: float = 0.0) -> _Layer:
    """Orthogonal weights, constant bias (CleanRL's ``layer_init``; Engstrom et al. 2020, §3)."""
    nn.init.orthogonal_(layer.weight, std)
    assert layer.bias is not None
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
            batch_mean=batch_mean.to(self.mean.device, torch.float64),  # statistics come from the CPU
            batch_var=batch_var.to(self.mean.device, torch.float64),
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


@dataclass(frozen=True)
class EncoderArch:
    """One encoder's architecture: what :class:`TaskEncoder` builds and the checkpoint records.

    ``input_size`` is the width of the (flattened) observations it reads; a padded group's is its widest
    task's, and narrower tasks' observations are zero-padded to it.
    """

    name: str
    input_size: int
    kind: EncoderKind = "mlp"
    hidden: tuple[int, ...] = ()
    image_shape: tuple[int, ...] = ()
    channels: tuple[int, ...] = (16, 32)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EncoderArch:
        return cls(
            name=str(data["name"]),
            input_size=int(data["input_size"]),
            kind=data.get("kind", "mlp"),
            hidden=tuple(int(v) for v in data.get("hidden", ())),
            image_shape=tuple(int(v) for v in data.get("image_shape", ())),
            channels=tuple(int(v) for v in data.get("channels", (16, 32))),
        )


class TaskEncoder(nn.Module):
    """A task's (or encoder group's) feature stage: ``obs_norm`` [B, input_size] -> ``embedding`` [B, E].

    ``normalizer`` holds its own observation statistics. ``mlp``: linear layers through ``hidden`` to E.
    ``cnn``: the first h*w*c values are an image (channels last), run through 2x2 convolutions with ReLU
    (the MiniGrid baseline network of Chevalier-Boisvert et al. 2023, without pooling on a 7x7 view),
    flattened, joined with the remaining values, then linear layers through ``hidden`` to E.
    """

    def __init__(self, arch: EncoderArch, config: PolicyConfig) -> None:
        super().__init__()
        self.arch = arch
        self.input_size = arch.input_size
        self.normalizer = ObsNormalizer(arch.input_size, clip=config.obs_clip)
        self.conv: nn.Sequential | None = None
        self.image_size = 0
        width = arch.input_size
        if arch.kind == "cnn":
            h, w, c = arch.image_shape
            self.image_size = h * w * c
            if self.image_size > arch.input_size:
                raise ValueError(
                    f"encoder {arch.name!r}: image_shape {list(arch.image_shape)} needs {self.image_size} "
                    f"values; the observations have {arch.input_size}"
                )
            layers: list[nn.Module] = []
            channels = c
            for out in arch.channels:
                layers += [layer_init(nn.Conv2d(channels, out, kernel_size=2)), nn.ReLU()]
                channels, h, w = out, h - 1, w - 1
            if h < 1 or w < 1:
                raise ValueError(f"encoder {arch.name!r}: too many 2x2 convolutions for {arch.image_shape}")
            layers.append(nn.Flatten())
            self.conv = nn.Sequential(*layers)
            width = channels * h * w + arch.input_size - self.image_size
        self.net = mlp(
            (width, *arch.hidden, config.embedding_size),
            config.activation,
            out_std=None,
            final_activation=True,
        )

    def forward(self, obs_norm: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            out: torch.Tensor = self.net(obs_norm)
            return out
        h, w, c = self.arch.image_shape
        image = obs_norm[:, : self.image_size].reshape(-1, h, w, c).permute(0, 3, 1, 2)
        joined = torch.cat([self.conv(image), obs_norm[:, self.image_size :]], dim=1)
        embedding: torch.Tensor = self.net(joined)
        return embedding


class Trunk(nn.Module):
    """The shared part: ``embedding`` [B, E] -> ``features`` [B, F]."""

    def __init__(self, config: PolicyConfig) -> None:
        super().__init__()
        self.body = mlp(
            (config.embedding_size, *config.trunk_hidden, config.feature_size),
            config.activation,
            out_std=None,
            final_activation=True,
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.body(embedding)
        return out


class TaskHead(nn.Module):
    """One task's policy head and value function.

    Categorical: ``logits`` [B, n]. Gaussian: ``mean`` [B, a] and a state-independent ``log_std`` [a]
    (broadcast to [B, a]). ``value`` [B] comes from the trunk features (shared critic) or from a
    per-task MLP on the task's ``obs_norm`` (separate critic; its first ``critic_input`` columns, so a
    zero-padded multi-task array works as well as the task's own).
    """

    log_std: nn.Parameter | None

    def __init__(self, action_space: SpaceSpec, critic_input: int, config: PolicyConfig) -> None:
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
        self.critic_input = critic_input
        critic_in = critic_input if self.separate_critic else config.feature_size
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
        out: torch.Tensor = self.critic(
            obs_norm[..., : self.critic_input] if self.separate_critic else features
        )
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


class TaskAdapter(nn.Module):
    """A view of what a task version consists of and adapting trains: ``head`` and, when the task has an
    encoder of its own, ``encoder`` (the same modules as the policy's, so loading a state here changes
    the policy). Its ``state_dict`` is the unit the online updater keeps, publishes and restores."""

    def __init__(self, head: TaskHead, encoder: TaskEncoder | None) -> None:
        super().__init__()
        self.head = head
        self.encoder = encoder


@dataclass(frozen=True)
class TaskSlot:
    """What the policy knows about one task: its encoder group and its own observation width."""

    encoder: str
    observation_size: int


class MultiTaskPolicy(nn.Module):
    """Encoders (``ModuleDict`` by group), a trunk shared by all tasks, and a ``ModuleDict`` of heads."""

    def __init__(
        self,
        config: PolicyConfig,
        encoders: Sequence[EncoderArch],
        tasks: Mapping[str, tuple[TaskSlot, SpaceSpec]],
    ) -> None:
        """``tasks``: per task id, its slot (encoder group, observation width) and action space."""
        super().__init__()
        self.config = config
        self.encoders = nn.ModuleDict()
        self.trunk = Trunk(config)
        self.heads = nn.ModuleDict()
        self.action_spaces: dict[str, SpaceSpec] = {}
        self.slots: dict[str, TaskSlot] = {}
        for arch in encoders:
            self.add_encoder(arch)
        for task_id, (slot, space) in tasks.items():
            self.add_head(task_id, space, slot)

    @property
    def task_ids(self) -> list[str]:
        return list(self.action_spaces)

    @property
    def device(self) -> torch.device:
        """Where the parameters live (the trainer moves the whole policy at once)."""
        return next(self.parameters()).device

    @property
    def observation_size(self) -> int:
        """Width of the trainer's padded multi-task arrays: the widest encoder input."""
        return max((e.input_size for e in self._encoders()), default=0)

    def _encoders(self) -> Iterator[TaskEncoder]:
        for module in self.encoders.values():
            assert isinstance(module, TaskEncoder)
            yield module

    def add_encoder(self, arch: EncoderArch) -> TaskEncoder:
        """Add a freshly initialised encoder group (the updater's start for an unseen observation space)."""
        if head_key(arch.name) in self.encoders:
            raise ValueError(f"encoder {arch.name!r} already exists")
        encoder = TaskEncoder(arch, self.config)
        self.encoders[head_key(arch.name)] = encoder
        return encoder

    def encoder(self, name: str) -> TaskEncoder:
        module = self.encoders[head_key(name)]
        assert isinstance(module, TaskEncoder)
        return module

    def encoder_of(self, task_id: str) -> TaskEncoder:
        return self.encoder(self.slots[task_id].encoder)

    def add_head(self, task_id: str, action_space: SpaceSpec, slot: TaskSlot | None = None) -> TaskHead:
        """Add a freshly initialised head on an existing encoder (the online updater's starting point).

        ``slot`` None: the policy's only encoder group, on observations as wide as its input."""
        if task_id in self.action_spaces:
            raise ValueError(f"task {task_id!r} already has a head")
        if slot is None:
            groups = {s.encoder for s in self.slots.values()}
            if len(groups) != 1:
                raise ValueError(
                    f"task {task_id!r}: name its encoder; this policy has groups {sorted(groups)}"
                )
            name = groups.pop()
            slot = TaskSlot(encoder=name, observation_size=self.encoder(name).input_size)
        encoder = self.encoder(slot.encoder)
        if slot.observation_size > encoder.input_size:
            raise ValueError(
                f"task {task_id!r} observations have {slot.observation_size} values; encoder "
                f"{slot.encoder!r} reads {encoder.input_size}"
            )
        head = TaskHead(action_space, encoder.input_size, self.config)
        self.heads[head_key(task_id)] = head
        self.action_spaces[task_id] = action_space
        self.slots[task_id] = slot
        return head

    def head(self, task_id: str) -> TaskHead:
        head = self.heads[head_key(task_id)]
        assert isinstance(head, TaskHead)
        return head

    def owns_encoder(self, task_id: str) -> bool:
        """True when no other task reads this task's encoder (adapting it may train it)."""
        name = self.slots[task_id].encoder
        return all(slot.encoder != name for t, slot in self.slots.items() if t != task_id)

    def adapter(self, task_id: str) -> TaskAdapter:
        """The task's own trainable parts: its head, and its encoder when no other task shares it."""
        return TaskAdapter(
            self.head(task_id), self.encoder_of(task_id) if self.owns_encoder(task_id) else None
        )

    def _runs(self, tasks: str | Segments, rows: int) -> Iterator[tuple[TaskEncoder, int, int]]:
        """(encoder, start, stop) over consecutive rows that share an encoder."""
        segments = [(tasks, rows)] if isinstance(tasks, str) else tasks
        start = 0
        for name, group in itertools.groupby(segments, key=lambda seg: self.slots[seg[0]].encoder):
            n = sum(k for _, k in group)
            yield self.encoder(name), start, start + n
            start += n
        if start != rows:
            raise ValueError(f"segments cover {start} rows of {rows}")

    def normalize(self, obs: torch.Tensor, tasks: str | Segments) -> torch.Tensor:
        """Each task's rows through its encoder's normaliser: [N, D] padded -> [N, D] (padding stays 0)."""
        out = torch.zeros(obs.shape, dtype=torch.float32, device=obs.device)
        for encoder, start, stop in self._runs(tasks, obs.shape[0]):
            w = encoder.input_size
            out[start:stop, :w] = encoder.normalizer(obs[start:stop, :w])
        return out

    @torch.no_grad()
    def update_normalizers(self, obs: npt.NDArray[np.float32], tasks: Segments) -> None:
        """Add raw observations [N, D] to each encoder's running statistics (all its rows at once)."""
        rows: dict[int, list[npt.NDArray[np.float32]]] = {}
        encoders: dict[int, TaskEncoder] = {}
        for encoder, start, stop in self._runs(tasks, obs.shape[0]):
            rows.setdefault(id(encoder), []).append(obs[start:stop, : encoder.input_size])
            encoders[id(encoder)] = encoder
        for key, parts in rows.items():
            encoders[key].normalizer.update(np.concatenate(parts))

    def observation_moments(
        self, obs: npt.NDArray[np.float32], tasks: Segments
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean, population variance, count) of raw observations [N, D] for every encoder's normaliser,
        concatenated in encoder order into float64 vectors [S] (S = the encoders' input widths summed; an
        encoder with no rows here has count 0). Fixed S, so ranks can combine them in one collective."""
        rows: dict[int, list[npt.NDArray[np.float32]]] = {}
        for encoder, start, stop in self._runs(tasks, obs.shape[0]):
            rows.setdefault(id(encoder), []).append(obs[start:stop, : encoder.input_size])
        parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for encoder in self._encoders():
            w = encoder.input_size
            x = torch.as_tensor(
                np.concatenate(rows[id(encoder)]) if id(encoder) in rows else np.zeros((0, w))
            )
            x = x.to(torch.float64)
            if x.shape[0] == 0:
                zeros = torch.zeros(w, dtype=torch.float64)
                parts.append((zeros, zeros.clone(), zeros.clone()))
            else:
                n = torch.full((w,), float(x.shape[0]), dtype=torch.float64)
                parts.append((x.mean(0), x.var(0, unbiased=False), n))
        mean, var, count = (torch.cat(p) for p in zip(*parts, strict=True))
        return mean, var, count

    def update_normalizer_moments(self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> None:
        """Merge :meth:`observation_moments`-shaped statistics (e.g. combined over ranks) into every
        encoder's normaliser."""
        at = 0
        for encoder in self._encoders():
            w = encoder.input_size
            encoder.normalizer.update_moments(mean[at : at + w], var[at : at + w], float(count[at]))
            at += w

    def embed(self, obs_norm: torch.Tensor, tasks: str | Segments) -> torch.Tensor:
        """The shared embedding [N, E] of normalised observations [N, D] (each row by its task's encoder)."""
        parts = [
            encoder(obs_norm[start:stop, : encoder.input_size])
            for encoder, start, stop in self._runs(tasks, obs_norm.shape[0])
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def features(self, obs_norm: torch.Tensor, tasks: str | Segments) -> torch.Tensor:
        """Trunk features [N, F]: every task's encoder, then one trunk pass over all rows."""
        out: torch.Tensor = self.trunk(self.embed(obs_norm, tasks))
        return out

    @torch.no_grad()
    def act_deterministic(self, task_id: str, obs: npt.NDArray[np.float32]) -> npt.NDArray[Any]:
        """Raw deterministic actions for observations [B, d] of one task (argmax index / Gaussian mean)."""
        x = torch.zeros(obs.shape[0], self.observation_size, device=self.device)
        x[:, : obs.shape[1]] = torch.as_tensor(obs, dtype=torch.float32)
        features = self.features(self.normalize(x, task_id), task_id)
        return self.head(task_id).deterministic(features).cpu().numpy()

    def parameter_count(self, *, task_ids: list[str] | None = None, include_critic: bool = True) -> int:
        """Trainable parameters of the trunk plus the given (default all) tasks' encoders and heads."""
        chosen = task_ids if task_ids is not None else self.task_ids
        total = sum(p.numel() for p in self.trunk.parameters())
        for name in dict.fromkeys(self.slots[t].encoder for t in chosen):
            total += sum(p.numel() for p in self.encoder(name).parameters())
        for task_id in chosen:
            head = self.head(task_id)
            for name, p in head.named_parameters():
                if include_critic or not name.startswith("critic."):
                    total += p.numel()
        return total


def encoder_layout(
    config: PolicyConfig,
    tasks: Sequence[TaskSpec],
    observation_sizes: Mapping[str, int],
    suite_encoders: Sequence[EncoderSpec] = (),
) -> tuple[list[EncoderArch], dict[str, TaskSlot]]:
    """The encoder groups for ``tasks`` under ``config.encoders`` and each task's slot.

    Raises InvalidTaskSpec when a group's tasks have observations of different widths and it does not
    say ``pad``, or when a CNN group's image does not fit its observations.
    """
    groups: dict[str, tuple[EncoderSpec, list[str]]] = {}
    for task in tasks:
        spec = next((e for e in suite_encoders if task.id in e.tasks), EncoderSpec(task.id, (task.id,)))
        if config.encoders == "per-task":
            spec = EncoderSpec(task.id, (task.id,), spec.kind, spec.hidden, spec.image_shape)
        elif config.encoders == "padded":
            spec = EncoderSpec("padded", tuple(t.id for t in tasks), "mlp", (), (), pad=True)
        groups.setdefault(spec.name, (spec, []))[1].append(task.id)
    archs: list[EncoderArch] = []
    slots: dict[str, TaskSlot] = {}
    for name, (spec, members) in groups.items():
        widths = {t: observation_sizes[t] for t in members}
        if len(set(widths.values())) > 1 and not spec.pad:
            raise InvalidTaskSpec(
                f"encoder {name!r}: tasks {members} have observations of different widths {widths}; "
                "give them their own encoders, or set pad = true to share one on zero-padded observations"
            )
        width = max(widths.values())
        if spec.kind == "cnn" and math.prod(spec.image_shape) > width:
            raise InvalidTaskSpec(
                f"encoder {name!r}: image_shape {list(spec.image_shape)} needs {math.prod(spec.image_shape)} "
                f"values; the observations of {members} have {width}"
            )
        archs.append(
            EncoderArch(
                name=name,
                input_size=width,
                kind=spec.kind,
                hidden=spec.hidden or config.encoder_hidden,
                image_shape=spec.image_shape,
                channels=config.cnn_channels,
            )
        )
        slots.update({t: TaskSlot(encoder=name, observation_size=widths[t]) for t in members})
    return archs, slots


def build_policy(
    config: PolicyConfig,
    tasks: Sequence[TaskSpec],
    spaces: Mapping[str, tuple[SpaceSpec, SpaceSpec]],
    suite_encoders: Sequence[EncoderSpec] = (),
) -> MultiTaskPolicy:
    """A freshly initialised policy for ``tasks`` (``spaces``: task id -> (observation, action) space)."""
    from polyhead.spaces import observation_size

    sizes = {t.id: observation_size(spaces[t.id][0]) for t in tasks}
    archs, slots = encoder_layout(config, tasks, sizes, suite_encoders)
    return MultiTaskPolicy(config, archs, {t.id: (slots[t.id], spaces[t.id][1]) for t in tasks})


# --- the trunk checkpoint ----------------------------------------------------------------------------------
def checkpoint_bytes(policy: MultiTaskPolicy) -> bytes:
    """Serialise config, encoder architectures, heads (action space, encoder, observation width) and the
    state dict (``torch.save``)."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": policy.config.to_json(),
        "encoders": [e.arch.to_json() for e in policy._encoders()],
        "heads": {
            task_id: {
                "action_space": space_to_json(space),
                "encoder": policy.slots[task_id].encoder,
                "observation_size": policy.slots[task_id].observation_size,
            }
            for task_id, space in policy.action_spaces.items()
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
        if int(state.get("version", 0)) < CHECKPOINT_VERSION:
            raise BundleError(
                f"{where}: a format-1 checkpoint (one padded trunk, no per-task encoders); its bundle still "
                "serves, but training on it needs a bundle trained by this polyhead (polyhead train)"
            )
        config = PolicyConfig.from_json(state["config"])
        archs = [EncoderArch.from_json(e) for e in state["encoders"]]
        tasks = {
            t: (
                TaskSlot(encoder=str(h["encoder"]), observation_size=int(h["observation_size"])),
                space_from_json(h["action_space"]),
            )
            for t, h in state["heads"].items()
        }
        policy = MultiTaskPolicy(config, archs, tasks)
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
    "EncoderArch",
    "MultiTaskPolicy",
    "ObsNormalizer",
    "PolicyConfig",
    "Segments",
    "TaskAdapter",
    "TaskEncoder",
    "TaskHead",
    "TaskSlot",
    "Trunk",
    "build_policy",
    "checkpoint_bytes",
    "encoder_layout",
    "load_policy",
    "policy_from_checkpoint",
]
