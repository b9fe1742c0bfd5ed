"""ONNX export of a MultiTaskPolicy into a bundle, with a torch-vs-onnxruntime parity check.

Graphs (the contract the server relies on, see polyhead.bundle, format 2):

* ``encoder.onnx`` (per task version): ``obs`` float32 [B, d] (the task's own flat observation) ->
  ``embedding`` [B, E], ``obs_norm`` [B, n]; the normaliser's statistics are constants in the graph, and a
  task narrower than its (padded) group's input n is zero-padded inside the graph, so a server never pads;
* ``trunk.onnx``: ``embedding`` [B, E] -> ``features`` [B, F];
* ``head.onnx``: the inputs in ``TaskHead.inputs`` (``features``, plus ``obs_norm`` with a separate
  critic) -> ``logits``, ``value`` (categorical) or ``mean``, ``log_std``, ``value`` (Gaussian).

Tasks of one encoder group with the same observation width get the very same ``encoder.onnx`` bytes
(exported once), so a server can run them as one.

Every graph has a dynamic batch axis. The exporter is chosen explicitly: ``dynamo`` (torch.export +
onnxscript, the default since torch 2.9) or ``torchscript`` (the legacy tracer, deprecated in torch 2.9
and slated for removal, but about 10x faster on these small graphs). Both are checked the same way:
:func:`check_parity` runs the torch module and onnxruntime on real observations and raises
ExportParityError when any output differs by more than ``atol + rtol * |torch|``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from polyhead.bundle import Bundle, HeadMeta, Manifest, sha256_bytes, write_bundle
from polyhead.envs import make_env, task_spaces
from polyhead.errors import ExportParityError, InvalidTaskSpec
from polyhead.spaces import pad_observations
from polyhead.taskspec import TaskSpec, load_suite
from polyhead.trainer.policy import (
    MultiTaskPolicy,
    PolicyConfig,
    TaskEncoder,
    TaskHead,
    build_policy,
    checkpoint_bytes,
)

log = logging.getLogger(__name__)

Exporter = Literal["dynamo", "torchscript"]
DEFAULT_EXPORTER: Exporter = "dynamo"
OPSET = 18
PARITY_ATOL = 1e-5
PARITY_RTOL = 1e-5
_EXAMPLE_BATCH = 3  # > 1, or torch.export would specialise the batch axis to a constant


class _TrunkGraph(nn.Module):
    def __init__(self, policy: MultiTaskPolicy) -> None:
        super().__init__()
        self.trunk = policy.trunk

    def forward(self, embedding: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.trunk(embedding),)


class _EncoderGraph(nn.Module):
    """A task's observation [B, d] -> (embedding [B, E], obs_norm [B, n]), zero-padding d up to n."""

    def __init__(self, encoder: TaskEncoder, observation_size: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.pad = encoder.input_size - observation_size

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pad:
            obs = nn.functional.pad(obs, (0, self.pad))
        obs_norm = self.encoder.normalizer(obs)
        return self.encoder(obs_norm), obs_norm


class _HeadOnFeatures(nn.Module):
    def __init__(self, head: TaskHead) -> None:
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return _head_outputs(self.head, features, features)


class _HeadOnFeaturesAndObs(nn.Module):
    def __init__(self, head: TaskHead) -> None:
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor, obs_norm: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return _head_outputs(self.head, features, obs_norm)


def _head_outputs(head: TaskHead, features: torch.Tensor, obs_norm: torch.Tensor) -> tuple[torch.Tensor, ...]:
    first, log_std = head.actor_params(features)
    value = head.value(features, obs_norm)
    return (first, value) if log_std is None else (first, log_std, value)


def _head_graph(head: TaskHead) -> nn.Module:
    return _HeadOnFeaturesAndObs(head) if head.separate_critic else _HeadOnFeatures(head)


def _to_onnx(
    module: nn.Module,
    example: tuple[torch.Tensor, ...],
    input_names: Sequence[str],
    output_names: Sequence[str],
    exporter: Exporter,
) -> bytes:
    module.eval()
    # The dynamo exporter prints progress lines to stdout (a `--json` command owns stdout's last line) and
    # logs every optimiser pass and a missing-torchvision notice; keep what matters: errors.
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings(), _quiet_loggers():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1)
            program = torch.onnx.export(
                module,
                example,
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_shapes={name: {0: batch} for name in input_names},
                dynamo=True,
                opset_version=OPSET,
                optimize=True,
                verbose=False,
            )
            assert program is not None
            return bytes(program.model_proto.SerializeToString())
        buf = io.BytesIO()
        axes = {name: {0: "batch"} for name in (*input_names, *output_names)}
        torch.onnx.export(
            module,
            example,
            buf,  # type: ignore[arg-type]  # file-like objects are accepted (and documented)
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )
        return buf.getvalue()


@contextlib.contextmanager
def _quiet_loggers() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


ENCODER_OUTPUTS = ("embedding", "obs_norm")


def export_trunk(policy: MultiTaskPolicy, *, exporter: Exporter = DEFAULT_EXPORTER) -> bytes:
    """``trunk.onnx`` bytes: ``embedding`` -> ``features``."""
    example = (torch.zeros(_EXAMPLE_BATCH, policy.config.embedding_size),)
    return _to_onnx(_TrunkGraph(policy), example, ["embedding"], ["features"], exporter)


def encoder_graph(policy: MultiTaskPolicy, task_id: str) -> _EncoderGraph:
    return _EncoderGraph(policy.encoder_of(task_id), policy.slots[task_id].observation_size)


def export_encoder(policy: MultiTaskPolicy, task_id: str, *, exporter: Exporter = DEFAULT_EXPORTER) -> bytes:
    """``encoder.onnx`` bytes for one task: ``obs`` [B, d] -> ``embedding``, ``obs_norm`` (normaliser
    frozen in)."""
    example = (torch.zeros(_EXAMPLE_BATCH, policy.slots[task_id].observation_size),)
    return _to_onnx(encoder_graph(policy, task_id), example, ["obs"], list(ENCODER_OUTPUTS), exporter)


def export_head(policy: MultiTaskPolicy, task_id: str, *, exporter: Exporter = DEFAULT_EXPORTER) -> bytes:
    """``head.onnx`` bytes for one task: its ``inputs`` -> ``logits``/``mean``, ``log_std``, ``value``."""
    head = policy.head(task_id)
    example_inputs = {
        "features": torch.zeros(_EXAMPLE_BATCH, policy.config.feature_size),
        "obs_norm": torch.zeros(_EXAMPLE_BATCH, policy.encoder_of(task_id).input_size),
    }
    example = tuple(example_inputs[name] for name in head.inputs)
    return _to_onnx(_head_graph(head), example, head.inputs, head.outputs, exporter)


# --- parity -------------------------------------------------------------------------------------------------
def _session(onnx_bytes: bytes) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(onnx_bytes, sess_options=options, providers=["CPUExecutionProvider"])


def check_parity(
    what: str,
    module: nn.Module,
    onnx_bytes: bytes,
    inputs: Mapping[str, npt.NDArray[np.float32]],
    output_names: Sequence[str],
    *,
    atol: float = PARITY_ATOL,
    rtol: float = PARITY_RTOL,
) -> float:
    """Run ``module`` and the ONNX graph on the same inputs; return the largest absolute difference.

    Raises ExportParityError naming the output when any element differs by more than
    ``atol + rtol * |torch value|``, or when the graph's outputs have other names or shapes.
    """
    session = _session(onnx_bytes)
    onnx_out = session.run(
        list(output_names), {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in inputs.items()}
    )
    module.eval()
    with torch.no_grad():
        torch_out = module(*(torch.as_tensor(v) for v in inputs.values()))
    worst = 0.0
    for name, expected_t, actual in zip(output_names, torch_out, onnx_out, strict=True):
        expected = expected_t.detach().numpy()
        if expected.shape != actual.shape:
            raise ExportParityError(
                f"{what}: output {name!r} has shape {list(actual.shape)} in ONNX, "
                f"{list(expected.shape)} in torch"
            )
        diff = np.abs(expected - actual)
        worst = max(worst, float(diff.max(initial=0.0)))
        if not np.all(diff <= atol + rtol * np.abs(expected)):
            raise ExportParityError(
                f"{what}: output {name!r} differs between torch and onnxruntime by up to {diff.max():.3g} "
                f"(allowed {atol:g} + {rtol:g}·|x|) on {expected.shape[0]} real observations"
            )
    return worst


def sample_observations(
    tasks: Sequence[TaskSpec], observation_size: int, *, steps_per_task: int = 64, seed: int = 0
) -> npt.NDArray[np.float32]:
    """:func:`sample_task_observations` of every task, zero-padded into one array [N, observation_size]
    in task order (the trainer's layout)."""
    obs = sample_task_observations(tasks, steps_per_task=steps_per_task, seed=seed)
    return padded_batch(obs, observation_size)[0]


def sample_task_observations(
    tasks: Sequence[TaskSpec], *, steps_per_task: int = 64, seed: int = 0
) -> dict[str, npt.NDArray[np.float32]]:
    """Real observations for a parity check or initial statistics: random actions in each task's env,
    flattened, per task ([steps_per_task, d_task])."""
    out: dict[str, npt.NDArray[np.float32]] = {}
    for i, task in enumerate(tasks):
        rows: list[npt.NDArray[np.float32]] = []
        env = make_env(task)
        try:
            env.action_space.seed(seed + i)
            obs, _ = env.reset(seed=seed + i)
            for _ in range(steps_per_task):
                rows.append(np.asarray(obs, dtype=np.float32).reshape(-1))
                obs, _, terminated, truncated, _ = env.step(env.action_space.sample())
                if terminated or truncated:
                    obs, _ = env.reset()
        finally:
            env.close()
        out[task.id] = np.stack(rows)
    return out


def padded_batch(
    observations: Mapping[str, npt.NDArray[np.float32]], width: int
) -> tuple[npt.NDArray[np.float32], list[tuple[str, int]]]:
    """Per-task observations as one zero-padded array [N, width] and its segments (the trainer's layout)."""
    parts = [pad_observations(v.reshape(len(v), -1), width) for v in observations.values()]
    return np.concatenate(parts), [(t, len(v)) for t, v in observations.items()]


def export_checked(
    policy: MultiTaskPolicy,
    observations: Mapping[str, npt.NDArray[np.float32]],
    *,
    exporter: Exporter = DEFAULT_EXPORTER,
    atol: float = PARITY_ATOL,
    task_ids: Sequence[str] | None = None,
) -> tuple[bytes, dict[str, tuple[bytes, bytes]]]:
    """Export the trunk and every (or each of ``task_ids``) task's encoder and head, each checked for
    parity on the task's real ``observations`` [n, d_task].

    Returns (trunk bytes, {task id: (encoder bytes, head bytes)}); raises ExportParityError on any
    mismatch. Tasks sharing an encoder (same group, same width) get the same encoder bytes.
    """
    policy.eval()
    trunk_bytes = export_trunk(policy, exporter=exporter)
    encoders: dict[tuple[str, int], bytes] = {}
    out: dict[str, tuple[bytes, bytes]] = {}
    worst = 0.0
    for task_id in task_ids if task_ids is not None else policy.task_ids:
        obs = np.ascontiguousarray(observations[task_id], dtype=np.float32)
        slot = policy.slots[task_id]
        graph = encoder_graph(policy, task_id)
        key = (slot.encoder, slot.observation_size)
        if key not in encoders:
            encoders[key] = export_encoder(policy, task_id, exporter=exporter)
        worst = max(
            worst,
            check_parity(
                f"encoder of task {task_id!r}", graph, encoders[key], {"obs": obs}, ENCODER_OUTPUTS, atol=atol
            ),
        )
        with torch.no_grad():
            embedding, obs_norm = graph(torch.as_tensor(obs))
        worst = max(
            worst,
            check_parity(
                "trunk.onnx", _TrunkGraph(policy), trunk_bytes, {"embedding": embedding.numpy()}, ["features"]
            ),
        )
        with torch.no_grad():
            features = policy.trunk(embedding)
        head = policy.head(task_id)
        data = export_head(policy, task_id, exporter=exporter)
        available = {"features": features.numpy(), "obs_norm": obs_norm.numpy()}
        inputs = {name: available[name] for name in head.inputs}
        worst = max(
            worst, check_parity(f"head {task_id!r}", _head_graph(head), data, inputs, head.outputs, atol=atol)
        )
        out[task_id] = (encoders[key], data)
    log.debug("export parity: largest torch/onnxruntime difference %.3g", worst)
    return trunk_bytes, out


def head_meta(
    policy: MultiTaskPolicy,
    task: TaskSpec,
    *,
    observation_space: Any,
    trunk_sha256: str,
    eval_return: float | None,
    training: Mapping[str, Any] | None = None,
    parent: str | None = None,
) -> HeadMeta:
    """The head.json record of ``task``'s version: encoder and head (``observation_space`` a SpaceSpec)."""
    head = policy.head(task.id)
    encoder = policy.encoder_of(task.id)
    return HeadMeta(
        task=task,
        observation_space=observation_space,
        action_space=policy.action_spaces[task.id],
        distribution=head.distribution,
        trunk_sha256=trunk_sha256,
        feature_size=policy.config.feature_size,
        observation_size=encoder.input_size,
        inputs=head.inputs,
        outputs=head.outputs,
        eval_return=eval_return,
        parent=parent,
        training=dict(training or {}),
        embedding_size=policy.config.embedding_size,
        encoder=encoder.arch.to_json(),
    )


def manifest_encoders(policy: MultiTaskPolicy, task_ids: Sequence[str]) -> dict[str, Any]:
    """The manifest's record of the encoder groups: name -> architecture and member tasks."""
    groups: dict[str, Any] = {}
    for task_id in task_ids:
        name = policy.slots[task_id].encoder
        entry = groups.setdefault(name, {**policy.encoder(name).arch.to_json(), "tasks": []})
        entry["tasks"].append(task_id)
    return groups


def export_bundle(
    policy: MultiTaskPolicy,
    out_dir: str | Path,
    *,
    suite_name: str,
    tasks: Sequence[TaskSpec],
    training: Mapping[str, Any],
    eval_returns: Mapping[str, float],
    overwrite: bool = False,
    observations: Mapping[str, npt.NDArray[np.float32]] | None = None,
    extra_files: Mapping[str, bytes] | None = None,
    exporter: Exporter = DEFAULT_EXPORTER,
    parity_atol: float = PARITY_ATOL,
) -> Bundle:
    """Export ``policy`` (one head per task in ``tasks``) as a complete bundle at ``out_dir``.

    Parity is checked on ``observations`` (per task; default: a few real observations of each). Raises
    ExportParityError before anything is written when an exported graph disagrees with torch, and
    BundleError when ``out_dir`` holds something and ``overwrite`` is false.
    """
    missing = [t.id for t in tasks if t.id not in policy.action_spaces]
    if missing:
        raise ValueError(f"the policy has no head for task(s) {missing}")
    if observations is None:
        observations = sample_task_observations(tasks, steps_per_task=32)
    trunk_bytes, adapters = export_checked(
        policy, observations, exporter=exporter, atol=parity_atol, task_ids=[t.id for t in tasks]
    )
    trunk_sha = sha256_bytes(trunk_bytes)
    manifest = Manifest(
        trunk_sha256=trunk_sha,
        checkpoint_sha256="",
        feature_size=policy.config.feature_size,
        embedding_size=policy.config.embedding_size,
        encoders=manifest_encoders(policy, [t.id for t in tasks]),
        suite=suite_name,
        tasks=tuple(t.id for t in tasks),
        trunk_architecture={**policy.config.to_json(), "exporter": exporter},
        training=dict(training),
    )
    heads: list[tuple[HeadMeta, bytes, bytes | None]] = []
    for task in tasks:
        obs_space, _ = task_spaces(task)
        meta = head_meta(
            policy,
            task,
            observation_space=obs_space,
            trunk_sha256=trunk_sha,
            eval_return=eval_returns.get(task.id),
            training={"suite": suite_name, **{k: v for k, v in training.items() if k in _HEAD_TRAINING_KEYS}},
        )
        encoder_bytes, head_bytes = adapters[task.id]
        heads.append((meta, head_bytes, encoder_bytes))
    return write_bundle(
        out_dir,
        manifest=manifest,
        trunk_onnx=trunk_bytes,
        checkpoint=checkpoint_bytes(policy),
        heads=heads,
        extra_files=extra_files,
        overwrite=overwrite,
    )


_HEAD_TRAINING_KEYS = {"algorithm", "steps", "seed", "steps_per_task", "wall_seconds"}


def build_random_bundle(
    out_dir: str | Path,
    *,
    suite: str = "cartpole-family",
    task_ids: Sequence[str] | None = None,
    seed: int = 0,
    config: PolicyConfig | None = None,
    exporter: Exporter = DEFAULT_EXPORTER,
) -> Bundle:
    """An untrained but complete, valid bundle (what server and client tests use as a tiny bundle).

    Heads for ``task_ids`` (default: the suite's training tasks), weights from ``seed``, normaliser
    statistics from a few hundred random-action environment steps.
    """
    loaded = load_suite(suite)
    tasks = [loaded.task(t) for t in task_ids] if task_ids is not None else list(loaded.train_tasks)
    if not tasks:
        raise InvalidTaskSpec(f"suite {loaded.name!r} has no tasks to build heads for")
    spaces = {t.id: task_spaces(t) for t in tasks}
    torch.manual_seed(seed)
    policy = build_policy(config or PolicyConfig(), tasks, spaces, loaded.encoders)
    observations = sample_task_observations(tasks, steps_per_task=max(1, 256 // len(tasks)), seed=seed)
    policy.update_normalizers(*padded_batch(observations, policy.observation_size))
    return export_bundle(
        policy,
        out_dir,
        suite_name=loaded.name,
        tasks=tasks,
        training={"algorithm": "none (random initialisation)", "seed": seed, "steps": 0},
        eval_returns={},
        observations=observations,
        exporter=exporter,
    )


__all__ = [
    "DEFAULT_EXPORTER",
    "build_random_bundle",
    "check_parity",
    "encoder_graph",
    "export_bundle",
    "export_checked",
    "export_encoder",
    "export_head",
    "export_trunk",
    "head_meta",
    "manifest_encoders",
    "padded_batch",
    "sample_observations",
    "sample_task_observations",
]
