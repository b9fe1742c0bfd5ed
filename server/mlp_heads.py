"""Heads whose ONNX graphs are plain MLPs, run as stacked weights: one grouped matmul per batch, many heads.

Multi-adapter LLM servers (S-LoRA, Punica, vLLM multi-LoRA) keep thousands of adapters as data and apply
them with one grouped kernel per batch. Policy heads are small MLPs on the trunk features, so the same
works here: :func:`parse_mlp_head` reads a ``head.onnx`` protobuf (no onnxruntime session) and recognises

* the policy output (``logits`` or ``mean``): a chain of ``Gemm`` / ``MatMul`` (+ ``Add``) layers with
  optional ``Tanh`` / ``Relu`` between them, reading ``features`` (or ``obs_norm``);
* ``log_std`` (Gaussian): a constant, or a constant ``Expand``-ed to the batch (``log_std.expand_as``);
* ``value``: the same kind of chain on ``features`` or ``obs_norm`` (optionally ``Slice``-d to its first
  columns), ending in ``Squeeze`` / ``Reshape`` to [B] or left at [B, 1].

Anything else (another op, a weight computed at run time, an attribute we do not model) returns None and
the head runs through onnxruntime as before. Recognised chains of the same layer shapes share a
:class:`ChainBank`: weights stacked as [capacity, in, out], grown geometrically, slots reused through a
free list. A :class:`StackedHead` holds its slots; the slots go back to the free list only when the
object is garbage (``__del__``), that is after the registry dropped it *and* the last in-flight request
that resolved it finished, so a reused slot never serves a request that resolved the old head (the same
lifetime an onnxruntime session had).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
from onnx import AttributeProto, ModelProto, TensorProto, numpy_helper

from polyhead.bundle import HeadMeta
from polyhead.errors import IncompatibleHead
from polyhead.server.runtime import F32, HEAD_INPUTS, POLICY_OUTPUTS, HeadOutputs
from polyhead.spaces import action_dim

ACTIVATIONS = ("tanh", "relu")
_INITIAL_CAPACITY = 8


@dataclass(frozen=True, eq=False)
class Layer:
    """``act(x @ weight + bias)``; ``activation`` is "" (identity), "tanh" or "relu"."""

    weight: F32  # [in, out]
    bias: F32  # [out]
    activation: str = ""


@dataclass(frozen=True, eq=False)
class Chain:
    """An MLP from one head input: ``source[:, :columns]`` through ``layers``."""

    source: str  # "features" or "obs_norm"
    columns: int  # input columns read (the first layer's width)
    sliced: bool  # True when the graph slices ``source`` to its first ``columns`` columns
    layers: tuple[Layer, ...]

    @property
    def signature(self) -> tuple[Any, ...]:
        """Chains with equal signatures stack in one bank."""
        return (
            self.source,
            self.sliced,
            tuple((la.weight.shape[0], la.weight.shape[1], la.activation) for la in self.layers),
        )

    @property
    def out_size(self) -> int:
        return int(self.layers[-1].weight.shape[1])


@dataclass(frozen=True, eq=False)
class MlpHead:
    """A recognised head graph: its policy chain, Gaussian ``log_std`` ([a]) and value chain."""

    policy: Chain
    log_std: F32 | None
    value: Chain


class NotAnMlp(Exception):
    """The graph is outside what :func:`parse_mlp_head` models (the message says where)."""


# --- recognition --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class _Partial:
    """A chain while its graph is walked."""

    source: str
    columns: int | None  # None until a Slice or the first layer fixes it
    sliced: bool
    layers: tuple[Layer, ...]
    squeezed: bool = False


class _ShapeExpr:
    """Some value computed from tensor shapes only (Shape, Concat of shape parts, ...)."""


@dataclass(frozen=True, eq=False)
class _Broadcast:
    value: npt.NDArray[Any]


_SHAPE = _ShapeExpr()  # the only _ShapeExpr there is
_MISSING = object()
_SHAPE_OPS = frozenset({"Shape", "Concat", "Gather", "Slice", "Unsqueeze", "Squeeze", "Cast", "Reshape"})


def _attrs(node: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for a in node.attribute:
        if a.type == AttributeProto.FLOAT:
            out[a.name] = a.f
        elif a.type == AttributeProto.INT:
            out[a.name] = a.i
        elif a.type == AttributeProto.INTS:
            out[a.name] = list(a.ints)
        elif a.type == AttributeProto.FLOATS:
            out[a.name] = list(a.floats)
        elif a.type == AttributeProto.TENSOR:
            out[a.name] = numpy_helper.to_array(a.t)
        else:
            raise NotAnMlp(
                f"{node.op_type} node {node.name!r} has attribute {a.name!r} of an unmodelled type"
            )
    return out


def _vector(value: npt.NDArray[Any], size: int, what: str) -> F32:
    """``value`` as a float32 [size] vector when it broadcasts to [B, size] along the batch."""
    arr = np.asarray(value, dtype=np.float32)
    if arr.ndim == 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 0 or arr.shape == (1,):
        return np.full(size, float(arr.reshape(())), dtype=np.float32)
    if arr.shape != (size,):
        raise NotAnMlp(f"{what} has shape {list(value.shape)}; expected [{size}]")
    return arr


def _linear(chain: _Partial, weight: F32, bias: F32, node: Any) -> _Partial:
    if chain.squeezed:
        raise NotAnMlp(f"{node.op_type} after a Squeeze")
    width = chain.layers[-1].weight.shape[1] if chain.layers else chain.columns
    if width is not None and width != weight.shape[0]:
        raise NotAnMlp(f"{node.op_type} {node.name!r} takes {weight.shape[0]} inputs, gets {width}")
    columns = chain.columns if chain.columns is not None else int(weight.shape[0])
    # No copies here: the bank copies each layer into its slot, and a load is mostly such small costs.
    layer = Layer(weight.astype(np.float32, copy=False), bias.astype(np.float32, copy=False), "")
    return _Partial(chain.source, columns, chain.sliced, (*chain.layers, layer))


def _const(env: dict[str, Any], name: str, node: Any) -> npt.NDArray[Any]:
    value = env.get(name)
    if not isinstance(value, np.ndarray):
        raise NotAnMlp(f"{node.op_type} {node.name!r}: input {name!r} is not a constant")
    return value


class _Op(NamedTuple):
    """One node while the graph is walked: its proto, symbolic inputs, attributes, everything so far.
    (A NamedTuple: a frozen dataclass's __init__ was a tenth of a parse.)"""

    node: Any
    ins: list[Any]
    attrs: dict[str, Any]
    env: dict[str, Any]


def _constant(o: _Op) -> Any:
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in o.attrs:
            return np.asarray(o.attrs[key])
    raise NotAnMlp(f"Constant {o.node.name!r} without a supported value attribute")


def _gemm(o: _Op) -> Any:
    chain = o.ins[0]
    if not isinstance(chain, _Partial) or o.attrs.get("transA", 0):
        raise NotAnMlp(f"Gemm {o.node.name!r} is not data @ constant")
    b = _const(o.env, o.node.input[1], o.node).astype(np.float32, copy=False)
    if b.ndim != 2:
        raise NotAnMlp(f"Gemm {o.node.name!r} weight is not a matrix")
    weight = b.T if o.attrs.get("transB", 0) else b
    alpha, beta = o.attrs.get("alpha", 1.0), o.attrs.get("beta", 1.0)
    if alpha != 1.0:  # exporters write 1.0; scaling by it would only copy
        weight = weight * np.float32(alpha)
    bias = np.zeros(weight.shape[1], dtype=np.float32)
    if len(o.node.input) > 2 and o.node.input[2]:
        c = _const(o.env, o.node.input[2], o.node)
        bias = _vector(c, weight.shape[1], f"Gemm {o.node.name!r} bias")
        if beta != 1.0:
            bias = bias * np.float32(beta)
    return _linear(chain, weight, bias, o.node)


def _matmul(o: _Op) -> Any:
    chain = o.ins[0]
    if not isinstance(chain, _Partial):
        raise NotAnMlp(f"MatMul {o.node.name!r} is not data @ constant matrix")
    b = _const(o.env, o.node.input[1], o.node)
    if b.ndim != 2:
        raise NotAnMlp(f"MatMul {o.node.name!r} is not data @ constant matrix")
    return _linear(chain, b, np.zeros(b.shape[1], dtype=np.float32), o.node)


def _add(o: _Op) -> Any:
    data, other = (o.ins[0], o.ins[1]) if isinstance(o.ins[0], _Partial) else (o.ins[1], o.ins[0])
    if not isinstance(data, _Partial) or not isinstance(other, np.ndarray) or not data.layers:
        raise NotAnMlp(f"Add {o.node.name!r} is not a bias after a linear layer")
    last = data.layers[-1]
    if last.activation or data.squeezed:
        raise NotAnMlp(f"Add {o.node.name!r} after an activation")
    bias = last.bias + _vector(other, last.weight.shape[1], f"Add {o.node.name!r}")
    return _Partial(data.source, data.columns, data.sliced, (*data.layers[:-1], Layer(last.weight, bias, "")))


def _activation(o: _Op) -> Any:
    chain = o.ins[0]
    if not isinstance(chain, _Partial) or not chain.layers or chain.layers[-1].activation or chain.squeezed:
        raise NotAnMlp(f"{o.node.op_type} {o.node.name!r} is not one activation after a linear layer")
    last = chain.layers[-1]
    layer = Layer(last.weight, last.bias, o.node.op_type.lower())
    return _Partial(chain.source, chain.columns, chain.sliced, (*chain.layers[:-1], layer))


def _to_vector(o: _Op) -> Any:
    """Squeeze / Reshape / Flatten of a [B, 1] value chain."""
    chain, op = o.ins[0], o.node.op_type
    if not isinstance(chain, _Partial) or not chain.layers or chain.layers[-1].weight.shape[1] != 1:
        raise NotAnMlp(f"{op} {o.node.name!r} not on a [B, 1] value")
    if op == "Reshape" and list(_const(o.env, o.node.input[1], o.node).reshape(-1)) not in ([-1], [0]):
        raise NotAnMlp(f"Reshape {o.node.name!r} to other than [-1]")
    if op == "Squeeze":
        axes = o.attrs.get("axes")
        if len(o.node.input) > 1 and o.node.input[1]:
            axes = list(_const(o.env, o.node.input[1], o.node).reshape(-1))
        if axes is not None and [int(a) for a in axes] not in ([1], [-1]):
            raise NotAnMlp(f"Squeeze {o.node.name!r} of axes {axes}")
    if op == "Flatten":
        return chain  # [B, 1] stays [B, 1]
    return _Partial(chain.source, chain.columns, chain.sliced, chain.layers, squeezed=True)


def _slice(o: _Op) -> Any:
    chain = o.ins[0]

    def optional(k: int) -> list[int] | None:
        if len(o.node.input) > k and o.node.input[k]:
            return [int(v) for v in _const(o.env, o.node.input[k], o.node).reshape(-1)]
        return None

    starts, ends, axes, steps = optional(1), optional(2), optional(3), optional(4)
    if (
        not isinstance(chain, _Partial)
        or chain.layers
        or chain.sliced
        or starts != [0]
        or ends is None
        or ends[0] <= 0
        or axes not in ([1], [-1])
        or steps not in (None, [1])
    ):
        raise NotAnMlp(f"Slice {o.node.name!r} is not input[:, :k]")
    return _Partial(chain.source, ends[0], True, ())


_Handler = Callable[[_Op], Any]
_HANDLERS: dict[str, _Handler] = {
    "Constant": _constant,
    "Identity": lambda o: o.ins[0],
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Add": _add,
    "Tanh": _activation,
    "Relu": _activation,
    "Squeeze": _to_vector,
    "Reshape": _to_vector,
    "Flatten": _to_vector,
    "Slice": _slice,
}


def _step(node: Any, env: dict[str, Any]) -> Any:
    """The symbolic value of ``node``'s (single) output."""
    op = node.op_type
    ins: list[Any] = []
    on_shape = False
    for i in node.input:  # a plain loop: this runs for every node of every head loaded
        if not i:
            ins.append(None)
            continue
        value = env.get(i, _MISSING)
        if value is _MISSING:
            raise NotAnMlp(f"{op} {node.name!r} reads an unknown value")
        on_shape = on_shape or value is _SHAPE
        ins.append(value)
    attrs = _attrs(node) if len(node.attribute) else {}
    if op == "Expand" and isinstance(ins[0], np.ndarray) and isinstance(ins[1], _ShapeExpr):
        return _Broadcast(ins[0])  # log_std.expand_as(mean): a constant row per batch row
    if op == "Shape" or on_shape:
        if op not in _SHAPE_OPS:
            raise NotAnMlp(f"{op} on a shape")
        return _SHAPE
    handler = _HANDLERS.get(op)
    if handler is None:
        raise NotAnMlp(f"op {op} ({node.name!r}) is not modelled")
    return handler(_Op(node, ins, attrs, env))


def _finish(value: Any, name: str, *, out: int) -> Chain:
    if not isinstance(value, _Partial) or not value.layers:
        raise NotAnMlp(f"output {name!r} is not an MLP of a head input")
    if value.layers[-1].weight.shape[1] != out:
        raise NotAnMlp(f"output {name!r} has {value.layers[-1].weight.shape[1]} columns, expected {out}")
    assert value.columns is not None
    return Chain(value.source, value.columns, value.sliced, value.layers)


_RAW_DTYPES: dict[int, np.dtype[Any]] = {
    int(TensorProto.FLOAT): np.dtype("<f4"),
    int(TensorProto.INT64): np.dtype("<i8"),
}


def _array(tensor: TensorProto) -> npt.NDArray[Any]:
    """An initializer's values; the exporters' raw little-endian bytes are read directly (3x faster than
    ``numpy_helper.to_array``, which is a fifth of a load)."""
    dtype = _RAW_DTYPES.get(int(tensor.data_type))
    if dtype is not None and tensor.raw_data:
        return np.frombuffer(tensor.raw_data, dtype=dtype).reshape(tuple(tensor.dims))
    return numpy_helper.to_array(tensor)


def parse_mlp_head(model: bytes, meta: HeadMeta) -> MlpHead:
    """The head's MLPs read off its ONNX graph. Raises NotAnMlp for anything else (run it by onnxruntime)."""
    try:
        proto = ModelProto.FromString(model)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise NotAnMlp(f"not an ONNX protobuf: {exc}") from exc
    graph = proto.graph
    if any(op.domain not in ("", "ai.onnx") for op in proto.opset_import) or len(proto.functions):
        raise NotAnMlp("custom domains or local functions")
    initializers = {t.name for t in graph.initializer}
    env: dict[str, Any] = {}
    for tensor in graph.initializer:
        if tensor.data_location != 0:
            raise NotAnMlp(f"initializer {tensor.name!r} is stored outside the model")
        env[tensor.name] = _array(tensor)
    for inp in graph.input:
        if inp.name in initializers:
            continue
        if inp.name not in HEAD_INPUTS:
            raise NotAnMlp(f"input {inp.name!r}")
        if inp.type.tensor_type.elem_type != 1:  # FLOAT
            raise NotAnMlp(f"input {inp.name!r} is not float32")
        env[inp.name] = _Partial(inp.name, None, False, ())
    for node in graph.node:
        if len(node.output) != 1 or node.domain not in ("", "ai.onnx"):
            raise NotAnMlp(f"{node.op_type} {node.name!r} has {len(node.output)} outputs or a custom domain")
        env[node.output[0]] = _step(node, env)
    outputs = {o.name for o in graph.output}
    expected = POLICY_OUTPUTS[meta.distribution]
    if outputs != set(expected):
        raise NotAnMlp(f"outputs {sorted(outputs)}; expected exactly {list(expected)}")
    n = action_dim(meta.action_space)
    policy = _finish(env[expected[0]], expected[0], out=n)
    log_std = None
    if meta.distribution == "gaussian":
        raw = env["log_std"]
        raw = raw.value if isinstance(raw, _Broadcast) else raw
        if not isinstance(raw, np.ndarray):
            raise NotAnMlp("log_std is not a constant")
        log_std = _vector(raw, n, "log_std")
    value = _finish(env["value"], "value", out=1)
    return MlpHead(policy=policy, log_std=log_std, value=value)


# --- stacked execution --------------------------------------------------------------------------------------
def _activate(x: F32, activation: str) -> F32:
    if activation == "tanh":
        return np.tanh(x, out=x)
    if activation == "relu":
        return np.maximum(x, 0.0, out=x)
    return x


class ChainBank:
    """The weights of every loaded chain with one signature, stacked in chunks: chunk 0 holds slots
    ``[0, C)`` and chunk k >= 1 slots ``[C 2^(k-1), C 2^k)``, each layer k as [chunk size, in_k, out_k].

    Chunks, not one array grown by copying: the capacity still doubles, but a new chunk is only allocated,
    never filled from the old (copying 10,000 heads' weights, hundreds of MB, took 0.7 s per doubling and
    a fifth of a 10,000-head startup), and no slot ever moves. Writers (``add``, ``free``) hold the bank's
    lock; a pass reads the chunk tuple once, and a slot it uses is never written: it belongs to a live head.
    """

    def __init__(self, signature: tuple[Any, ...]) -> None:
        self.signature = signature
        # Reentrant: the cyclic GC may run a StackedHead's __del__ (free) in the middle of an add.
        self._lock = threading.RLock()
        self._free: list[int] = []
        self._used = 0  # slots ever handed out (high-water mark)
        self._live = 0
        self._chunks: tuple[tuple[tuple[F32, F32], ...], ...] = (self._alloc(_INITIAL_CAPACITY),)
        self._local = threading.local()  # per-thread gather buffers (passes run on two threads)

    def _alloc(self, size: int) -> tuple[tuple[F32, F32], ...]:
        return tuple(
            (np.zeros((size, i, o), dtype=np.float32), np.zeros((size, o), dtype=np.float32))
            for i, o, _ in self.signature[2]
        )

    @property
    def capacity(self) -> int:
        return _INITIAL_CAPACITY << (len(self._chunks) - 1)

    @property
    def live(self) -> int:
        """Slots held by loaded (or still referenced) heads."""
        return self._live

    def add(self, chain: Chain) -> int:
        """Copy ``chain``'s weights into a free slot (doubling the capacity with a new chunk when full);
        returns the slot."""
        with self._lock:
            if self._free:
                slot = self._free.pop()
            else:
                slot = self._used
                self._used += 1
                if slot >= self.capacity:
                    self._chunks = (*self._chunks, self._alloc(self.capacity))
            chunk, row = _locate(slot)
            for (w, b), layer in zip(self._chunks[chunk], chain.layers, strict=True):
                w[row] = layer.weight
                b[row] = layer.bias
            self._live += 1
            return slot

    def free(self, slot: int) -> None:
        """Give ``slot`` back (its head is garbage: nothing can read it any more)."""
        with self._lock:
            self._free.append(slot)
            self._live -= 1

    def run(self, x: F32, slots: npt.NDArray[np.intp]) -> F32:
        """Row r through the chain in slot ``slots[r]``: x [R, in] -> [R, out].

        One slot: plain matmuls on that slot's weights. Several: one batched matmul per layer over the
        gathered per-row weights (measured faster than a matmul per contiguous segment once rows come from
        more than a few heads; benchmarks/server_heads.py --kernels)."""
        chunks = self._chunks
        activations = [a for _, _, a in self.signature[2]]
        first = int(slots[0])
        if len(slots) == 1 or not (slots != first).any():
            chunk, row = _locate(first)
            for (w, b), act in zip(chunks[chunk], activations, strict=True):
                x = _activate(x @ w[row] + b[row], act)
            return x
        where, rows = _locate_many(slots)
        order = None
        if (where != where[0]).any():
            # Rows ordered by chunk, so each chunk's weights gather straight into one contiguous slice.
            order = np.argsort(where, kind="stable")
            where, rows, x = where[order], rows[order], x[order]
        cuts = [0, *(np.flatnonzero(np.diff(where)) + 1).tolist(), len(rows)]
        segments = [(lo, hi, int(where[lo])) for lo, hi in itertools.pairwise(cuts)]
        n = len(rows)
        for layer, ((weights, biases), act) in enumerate(zip(self._scratch(n), activations, strict=True)):
            for lo, hi, chunk in segments:
                w, bias = chunks[chunk][layer]
                # mode="clip": with the default "raise" numpy buffers `out` (a copy again); rows are valid
                np.take(w, rows[lo:hi], axis=0, out=weights[lo:hi], mode="clip")
                np.take(bias, rows[lo:hi], axis=0, out=biases[lo:hi], mode="clip")
            x = _activate(np.matmul(x[:, None, :], weights[:n])[:, 0, :] + biases[:n], act)
        if order is None:
            return x
        out = np.empty_like(x)
        out[order] = x
        return out

    def _scratch(self, rows: int) -> list[tuple[F32, F32]]:
        """This thread's gather buffers, one per layer, for at least ``rows`` rows. Reused: fresh buffers
        (a MB per layer at 64 rows of a 64x64 layer) went back to the OS after each pass and were faulted
        in again by the next, which cost more than the pass itself here (1 ms against 0.1)."""
        buffers: list[tuple[F32, F32]] | None = getattr(self._local, "buffers", None)
        if buffers is None or buffers[0][0].shape[0] < rows:
            size = max(rows, 2 * buffers[0][0].shape[0] if buffers else 64)
            buffers = [
                (np.empty((size, i, o), dtype=np.float32), np.empty((size, o), dtype=np.float32))
                for i, o, _ in self.signature[2]
            ]
            self._local.buffers = buffers
        return buffers

    def run_segments(self, x: F32, slots: npt.NDArray[np.intp]) -> F32:
        """Same result as :meth:`run`, one matmul per run of equal slots (kept for the kernel benchmark)."""
        chunks = self._chunks
        activations = [a for _, _, a in self.signature[2]]
        bounds = np.flatnonzero(np.diff(slots)) + 1
        starts = np.concatenate(([0], bounds))
        ends = np.concatenate((bounds, [len(slots)]))
        parts = []
        for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
            h = x[s:e]
            chunk, row = _locate(int(slots[s]))
            for (w, b), act in zip(chunks[chunk], activations, strict=True):
                h = _activate(h @ w[row] + b[row], act)
            parts.append(h)
        return np.concatenate(parts)


def _locate(slot: int) -> tuple[int, int]:
    """(chunk, row in it) of ``slot``: chunk 0 is [0, C), chunk k >= 1 is [C 2^(k-1), C 2^k)."""
    q = slot // _INITIAL_CAPACITY
    if q == 0:
        return 0, slot
    chunk = q.bit_length()
    return chunk, slot - (_INITIAL_CAPACITY << (chunk - 1))


def _locate_many(slots: npt.NDArray[np.intp]) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    q = slots // _INITIAL_CAPACITY
    chunk = np.where(q == 0, 0, np.frexp(q.astype(np.float64))[1]).astype(np.intp)
    base = np.where(chunk == 0, 0, _INITIAL_CAPACITY << np.maximum(chunk - 1, 0))
    return chunk, slots - base


class HeadBanks:
    """Every :class:`ChainBank` of a server, by signature."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._banks: dict[tuple[Any, ...], ChainBank] = {}

    def bank(self, chain: Chain) -> ChainBank:
        signature = chain.signature
        found = self._banks.get(signature)
        if found is None:
            with self._lock:
                found = self._banks.setdefault(signature, ChainBank(signature))
        return found

    @property
    def banks(self) -> list[ChainBank]:
        return list(self._banks.values())

    def stack(self, parsed: MlpHead, meta: HeadMeta, *, feature_size: int) -> StackedHead:
        """A :class:`StackedHead` holding slots for ``parsed``'s chains."""
        return StackedHead(self, parsed, meta, feature_size=feature_size)


class StackedHead:
    """One loaded head version as bank slots (the stacked counterpart of ``HeadRuntime``)."""

    __slots__ = (
        "action_dim",
        "feature_size",
        "log_std",
        "meta",
        "policy_bank",
        "policy_slot",
        "value_bank",
        "value_columns",
        "value_slot",
        "value_source",
    )

    def __init__(self, banks: HeadBanks, parsed: MlpHead, meta: HeadMeta, *, feature_size: int) -> None:
        self.meta = meta
        self.feature_size = feature_size
        self.action_dim = action_dim(meta.action_space)
        self.log_std = parsed.log_std
        self.value_source = parsed.value.source
        self.value_columns = parsed.value.columns
        self.policy_bank = banks.bank(parsed.policy)
        self.value_bank = banks.bank(parsed.value)
        self.policy_slot = self.policy_bank.add(parsed.policy)
        try:
            self.value_slot = self.value_bank.add(parsed.value)
        except BaseException:
            self.policy_bank.free(self.policy_slot)
            del self.policy_slot
            raise

    def __del__(self) -> None:
        # Runs when the registry has dropped this version and no in-flight request holds it any more.
        try:
            slot = self.policy_slot
        except AttributeError:  # __init__ failed part-way
            return
        self.policy_bank.free(slot)
        self.value_bank.free(self.value_slot)

    def run(self, features: F32, obs_norm: F32, *, value: bool = True) -> HeadOutputs:
        """This head alone on all rows (``value``: False leaves the value column NaN)."""
        return run_stacked([self], [features.shape[0]], features, [obs_norm], [value])

    def warm_up(self, batch_sizes: Sequence[int], observation_size: int) -> None:  # noqa: ARG002 (HeadRuntime's signature)
        """Check the chains' input widths against the trunk and ``obs_norm``; raises IncompatibleHead.

        Unlike a session, nothing runs: the parse fixed every shape, and numpy has nothing to warm up."""
        where = f"head for task {self.meta.task.id!r}"
        for source, columns, sliced in (
            (
                self.policy_bank.signature[0],
                self.policy_bank.signature[2][0][0],
                self.policy_bank.signature[1],
            ),
            (self.value_source, self.value_columns, self.value_bank.signature[1]),
        ):
            width = self.feature_size if source == "features" else observation_size
            if columns > width if sliced else columns != width:
                raise IncompatibleHead(
                    f"{where}: reads {columns} columns of {source}; the server provides {width}"
                )


def _rows(
    chain: tuple[str, int],
    features: F32,
    obs_norms: Sequence[F32],
    offsets: Sequence[int],
    members: list[int],
) -> F32:
    """The chain input of blocks ``members``: trunk features, or each block's own obs_norm (widths differ
    between tasks) cut to ``columns``."""
    source, columns = chain
    if source == "features":
        if len(members) == len(obs_norms):
            return features
        picked: F32 = features[np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in members])]
        return picked
    parts = [obs_norms[i] if obs_norms[i].shape[1] == columns else obs_norms[i][:, :columns] for i in members]
    out: F32 = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return out


def run_stacked(
    heads: Sequence[StackedHead],
    rows: Sequence[int],
    features: F32,
    obs_norms: Sequence[F32],
    want_value: Sequence[bool],
) -> HeadOutputs:
    """Consecutive row blocks of ``features`` (``rows[i]`` rows for ``heads[i]``, whose ``obs_norm`` is
    ``obs_norms[i]``) through their heads, which share one policy bank (so one distribution and action
    width). Values are computed only for blocks whose ``want_value`` is set (one grouped pass per value
    bank); the others are NaN."""
    bank = heads[0].policy_bank
    every = list(range(len(heads)))
    offsets = [0, *itertools.accumulate(rows)]
    slots = np.repeat(np.fromiter((h.policy_slot for h in heads), np.intp, len(heads)), rows)
    source, columns = bank.signature[0], bank.signature[2][0][0]
    policy = bank.run(_rows((source, columns), features, obs_norms, offsets, every), slots)
    log_std = None
    if heads[0].log_std is not None:
        if all(h.log_std is heads[0].log_std for h in heads):
            log_std = heads[0].log_std
        else:
            log_std = np.repeat(np.stack([h.log_std for h in heads]), rows, axis=0)  # type: ignore[misc]
    value = np.full(offsets[-1], np.nan, dtype=np.float32)
    if any(want_value):
        by_bank: dict[int, list[int]] = {}
        for i, (h, want) in enumerate(zip(heads, want_value, strict=True)):
            if want:
                by_bank.setdefault(id(h.value_bank), []).append(i)
        for members in by_bank.values():
            first = heads[members[0]]
            vslots = np.repeat(
                np.fromiter((heads[i].value_slot for i in members), np.intp, len(members)),
                [rows[i] for i in members],
            )
            x = _rows((first.value_source, first.value_columns), features, obs_norms, offsets, members)
            out = first.value_bank.run(x, vslots)[:, 0]
            if len(members) == len(heads):
                value = out
            else:
                value[np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in members])] = out
    if heads[0].meta.distribution == "categorical":
        return HeadOutputs(logits=policy, mean=None, log_std=None, value=value)
    return HeadOutputs(logits=None, mean=policy, log_std=log_std, value=value)
