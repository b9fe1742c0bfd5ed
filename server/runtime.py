"""onnxruntime sessions for the trunk and the heads: build, check against the ONNX contract, warm up, run.

The contract (fixed between trainer and server; polyhead.bundle describes the files):

* ``encoder.onnx`` (format 2, per task version): ``obs`` float32 [B, d] -> ``embedding`` [B, E],
  ``obs_norm`` [B, n];
* ``trunk.onnx``: format 2: ``embedding`` [B, E] -> ``features`` [B, F]; format 1: ``obs`` [B, D] (padded)
  -> ``features`` [B, F], ``obs_norm`` [B, D];
* ``head.onnx``: the inputs listed in ``HeadMeta.inputs`` (a subset of ``features``, ``obs_norm``) ->
  categorical: ``logits`` [B, n], ``value`` [B]; gaussian: ``mean`` [B, a], ``log_std`` [B, a], ``value`` [B].

Sessions use one intra-op thread by default: the models are a few small matrix products, where thread
hand-offs cost more than they save, and 1,000 loaded heads must not mean 1,000 thread pools.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from polyhead.bundle import HeadMeta
from polyhead.errors import CorruptHead, IncompatibleHead
from polyhead.spaces import action_dim

F32 = npt.NDArray[np.float32]
LEGACY_TRUNK_INPUT = "obs"
LEGACY_TRUNK_OUTPUTS = ("features", "obs_norm")
TRUNK_INPUT = "embedding"
TRUNK_OUTPUTS = ("features",)
ENCODER_INPUT = "obs"
ENCODER_OUTPUTS = ("embedding", "obs_norm")
HEAD_INPUTS = ("features", "obs_norm")
POLICY_OUTPUTS = {"categorical": ("logits", "value"), "gaussian": ("mean", "log_std", "value")}


def session_options(intra_op_threads: int) -> ort.SessionOptions:
    """Options shared by every session of a server."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    # Spinning worker threads would burn the cores the gRPC loop needs between batches.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def _session(model: bytes, opts: ort.SessionOptions, what: str) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own pybind classes for every malformed model
        raise CorruptHead(f"{what} is not a loadable ONNX model: {type(exc).__name__}: {exc}") from exc


def _static_dim(dim: Any) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


class TrunkRuntime:
    """The shared trunk: one session for the server's lifetime (the trunk never changes while serving).

    ``padded`` (format 1): it takes observations zero-padded to ``input_size`` and returns ``obs_norm``
    too; otherwise (format 2) it takes the encoders' embeddings and returns features only.
    """

    def __init__(
        self,
        model: bytes,
        *,
        input_size: int,
        feature_size: int,
        opts: ort.SessionOptions,
        padded: bool = False,
    ):
        self.input_size = input_size
        self.feature_size = feature_size
        self.padded = padded
        self.session = _session(model, opts, "trunk.onnx")
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        want_in = LEGACY_TRUNK_INPUT if padded else TRUNK_INPUT
        want_out = LEGACY_TRUNK_OUTPUTS if padded else TRUNK_OUTPUTS
        if inputs != [want_in] or not set(want_out) <= set(outputs):
            raise CorruptHead(
                f"trunk.onnx has inputs {inputs} and outputs {outputs}; expected input [{want_in!r}] and "
                f"outputs {list(want_out)} (bundle format {1 if padded else 2})"
            )
        self._input = want_in
        self._outputs = list(want_out)

    def run(self, x: F32) -> tuple[F32, F32 | None]:
        """features [B, F] (and, padded, obs_norm [B, D]) for embeddings [B, E] (padded: observations)."""
        out = self.session.run(self._outputs, {self._input: x})
        return (out[0], out[1]) if self.padded else (out[0], None)

    def warm_up(self, batch_sizes: Sequence[int]) -> None:
        for b in batch_sizes:
            features, obs_norm = self.run(np.zeros((b, self.input_size), dtype=np.float32))
            if features.shape != (b, self.feature_size) or (
                obs_norm is not None and obs_norm.shape != (b, self.input_size)
            ):
                raise CorruptHead(
                    f"trunk.onnx returned features {list(features.shape)} for a batch of {b}; the manifest "
                    f"says [{b}, {self.feature_size}]"
                )


class EncoderRuntime:
    """One task version's encoder session (format 2): ``obs`` [B, d] -> ``embedding`` [B, E], ``obs_norm``.

    Tasks whose versions carry byte-identical encoders share one runtime (the registry dedupes by
    sha256), so the batcher runs their rows through it together.
    """

    def __init__(
        self, model: bytes, *, task_id: str, sha256: str, embedding_size: int, opts: ort.SessionOptions
    ):
        self.sha256 = sha256
        self.embedding_size = embedding_size
        where = f"encoder of task {task_id!r}"
        self.session = _session(model, opts, where)
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != [ENCODER_INPUT] or not set(ENCODER_OUTPUTS) <= set(outputs):
            raise CorruptHead(
                f"{where}: ONNX inputs {inputs} and outputs {outputs}; expected input ['obs'] and outputs "
                f"{list(ENCODER_OUTPUTS)}"
            )
        self._outputs = list(ENCODER_OUTPUTS)

    def run(self, obs: F32) -> tuple[F32, F32]:
        embedding, obs_norm = self.session.run(self._outputs, {ENCODER_INPUT: obs})
        return embedding, obs_norm

    def warm_up(self, batch_sizes: Sequence[int], *, task_id: str, width: int, norm_width: int) -> None:
        """Run once per batch size on [b, width]; raises IncompatibleHead when the shapes are not
        [b, E] and [b, norm_width]."""
        where = f"encoder of task {task_id!r}"
        for b in batch_sizes:
            try:
                embedding, obs_norm = self.run(np.zeros((b, width), dtype=np.float32))
            except Exception as exc:  # shape errors inside the graph surface as onnxruntime exceptions
                raise IncompatibleHead(
                    f"{where}: fails on observations [{b}, {width}]: {type(exc).__name__}: {exc}"
                ) from exc
            if embedding.shape != (b, self.embedding_size) or obs_norm.shape != (b, norm_width):
                raise IncompatibleHead(
                    f"{where}: returned embedding {list(embedding.shape)} and obs_norm "
                    f"{list(obs_norm.shape)} for [{b}, {width}] observations; the trunk takes "
                    f"[{b}, {self.embedding_size}] and head.json says obs_norm [{b}, {norm_width}]"
                )


@dataclass(frozen=True)
class HeadOutputs:
    """One head pass: policy parameters and values for the rows it was given."""

    logits: F32 | None
    mean: F32 | None
    log_std: F32 | None
    value: F32


class HeadRuntime:
    """One loaded head version's session, checked against its metadata and the trunk's sizes."""

    def __init__(self, model: bytes, meta: HeadMeta, *, feature_size: int, opts: ort.SessionOptions):
        self.meta = meta
        self.feature_size = feature_size
        self.action_dim = action_dim(meta.action_space)
        where = f"head for task {meta.task.id!r}"
        self.session = _session(model, opts, where)
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        unknown = set(inputs) - set(HEAD_INPUTS)
        if unknown or not inputs:
            raise CorruptHead(
                f"{where}: ONNX inputs {sorted(inputs)}; expected a non-empty subset of {list(HEAD_INPUTS)}"
            )
        if set(meta.inputs) != set(inputs):
            raise CorruptHead(
                f"{where}: head.json lists inputs {list(meta.inputs)}, the ONNX has {sorted(inputs)}"
            )
        expected = POLICY_OUTPUTS[meta.distribution]
        if not set(expected) <= set(outputs):
            raise CorruptHead(
                f"{where}: ONNX outputs {outputs}; a {meta.distribution} head needs {list(expected)}"
            )
        if "features" in inputs:
            dims = inputs["features"].shape
            width = _static_dim(dims[-1]) if dims else None
            if width is not None and width != feature_size:
                raise IncompatibleHead(
                    f"{where}: takes {width} trunk features; the serving trunk produces {feature_size}"
                )
        self._inputs = [name for name in HEAD_INPUTS if name in inputs]
        self._outputs = list(expected)

    def run(self, features: F32, obs_norm: F32, *, value: bool = True) -> HeadOutputs:  # noqa: ARG002 (the stacked heads' signature)
        """Policy outputs and values for the rows (``value`` is accepted for the stacked heads' interface:
        the session's graph computes the value either way)."""
        feeds = {"features": features, "obs_norm": obs_norm}
        values = self.session.run(self._outputs, {k: feeds[k] for k in self._inputs})
        if self.meta.distribution == "categorical":
            logits, values_out = values
            return HeadOutputs(logits=logits, mean=None, log_std=None, value=values_out.reshape(-1))
        mean, log_std, values_out = values
        return HeadOutputs(logits=None, mean=mean, log_std=log_std, value=values_out.reshape(-1))

    def warm_up(self, batch_sizes: Sequence[int], observation_size: int) -> None:
        """Run once per batch size; raises IncompatibleHead when shapes do not fit the action spec."""
        where = f"head for task {self.meta.task.id!r}"
        for b in batch_sizes:
            features = np.zeros((b, self.feature_size), dtype=np.float32)
            obs_norm = np.zeros((b, observation_size), dtype=np.float32)
            try:
                out = self.run(features, obs_norm)
            except Exception as exc:  # shape errors inside the graph surface as onnxruntime exceptions
                raise IncompatibleHead(
                    f"{where}: fails on trunk outputs features [{b}, {self.feature_size}], obs_norm "
                    f"[{b}, {observation_size}]: {type(exc).__name__}: {exc}"
                ) from exc
            params = out.logits if out.logits is not None else out.mean
            assert params is not None
            if params.shape != (b, self.action_dim) or out.value.shape != (b,):
                raise IncompatibleHead(
                    f"{where}: returned policy outputs {list(params.shape)} and value "
                    f"{list(out.value.shape)} for a batch of {b}; its action space needs "
                    f"[{b}, {self.action_dim}] and [{b}]"
                )
            if out.log_std is not None and out.log_std.shape not in (
                (b, self.action_dim),
                (self.action_dim,),
            ):
                raise IncompatibleHead(
                    f"{where}: log_std shape {list(out.log_std.shape)}; expected [{b}, {self.action_dim}]"
                )
