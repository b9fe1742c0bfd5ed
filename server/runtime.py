"""onnxruntime sessions for the trunk and the heads: build, check against the ONNX contract, warm up, run.

The contract (fixed between trainer and server):

* ``trunk.onnx``: ``obs`` float32 [B, D] -> ``features`` float32 [B, F], ``obs_norm`` float32 [B, D];
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
TRUNK_INPUT = "obs"
TRUNK_OUTPUTS = ("features", "obs_norm")
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
    """The shared trunk: one session for the server's lifetime (the trunk never changes while serving)."""

    def __init__(self, model: bytes, *, observation_size: int, feature_size: int, opts: ort.SessionOptions):
        self.observation_size = observation_size
        self.feature_size = feature_size
        self.session = _session(model, opts, "trunk.onnx")
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != [TRUNK_INPUT] or not set(TRUNK_OUTPUTS) <= set(outputs):
            raise CorruptHead(
                f"trunk.onnx has inputs {inputs} and outputs {outputs}; expected input ['obs'] and outputs "
                f"{list(TRUNK_OUTPUTS)}"
            )
        self._outputs = list(TRUNK_OUTPUTS)

    def run(self, obs: F32) -> tuple[F32, F32]:
        """features [B, F] and obs_norm [B, D] for padded observations [B, D]."""
        features, obs_norm = self.session.run(self._outputs, {TRUNK_INPUT: obs})
        return features, obs_norm

    def warm_up(self, batch_sizes: Sequence[int]) -> None:
        for b in batch_sizes:
            features, obs_norm = self.run(np.zeros((b, self.observation_size), dtype=np.float32))
            if features.shape != (b, self.feature_size) or obs_norm.shape != (b, self.observation_size):
                raise CorruptHead(
                    f"trunk.onnx returned features {list(features.shape)} and obs_norm "
                    f"{list(obs_norm.shape)} for a batch of {b}; the manifest says "
                    f"[{b}, {self.feature_size}] and [{b}, {self.observation_size}]"
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

    def run(self, features: F32, obs_norm: F32) -> HeadOutputs:
        feeds = {"features": features, "obs_norm": obs_norm}
        values = self.session.run(self._outputs, {k: feeds[k] for k in self._inputs})
        if self.meta.distribution == "categorical":
            logits, value = values
            return HeadOutputs(logits=logits, mean=None, log_std=None, value=value.reshape(-1))
        mean, log_std, value = values
        return HeadOutputs(logits=None, mean=mean, log_std=log_std, value=value.reshape(-1))

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
