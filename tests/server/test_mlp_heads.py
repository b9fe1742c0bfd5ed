"""Stacked MLP heads (polyhead.server.mlp_heads): graph recognition, the onnxruntime fallback, parity with
onnxruntime over random heads and mixed batches, and the weight banks' slot lifecycle."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from polyhead.bundle import Bundle, HeadMeta
from polyhead.errors import IncompatibleHead
from polyhead.server.mlp_heads import HeadBanks, NotAnMlp, StackedHead, parse_mlp_head, run_stacked
from polyhead.server.runtime import HeadRuntime, session_options
from polyhead.spaces import action_dim

F = 16  # the tiny bundle's feature size
OPTS = session_options(1)


def _meta(bundle: Path, task: str) -> HeadMeta:
    return Bundle.open(bundle).head(task).meta


def _layer(
    nodes: list[Any],
    inits: list[Any],
    x: str,
    *,
    w: npt.NDArray[Any],
    b: npt.NDArray[Any],
    act: str,
    style: str,
    tag: str,
) -> str:
    """Append ``act(x @ w + b)`` in one of the exporters' spellings; returns the output name."""
    wn, bn, out = f"{tag}_w", f"{tag}_b", f"{tag}_y"
    if style == "gemm":
        inits += [numpy_helper.from_array(w.T.copy(), wn), numpy_helper.from_array(b, bn)]
        nodes.append(helper.make_node("Gemm", [x, wn, bn], [out], transB=1))
    elif style == "gemm-nobias":  # the dynamo exporter drops all-zero biases
        inits.append(numpy_helper.from_array(w, wn))
        nodes.append(helper.make_node("Gemm", [x, wn], [out]))
        if b.any():
            inits.append(numpy_helper.from_array(b, bn))
            nodes.append(helper.make_node("Add", [out, bn], [out + "_b"]))
            out += "_b"
    else:  # matmul + add (bias first, as some exporters write it)
        inits += [numpy_helper.from_array(w, wn), numpy_helper.from_array(b, bn)]
        nodes.append(helper.make_node("MatMul", [x, wn], [out + "_m"]))
        nodes.append(helper.make_node("Add", [bn, out + "_m"], [out]))
    if act:
        nodes.append(helper.make_node(act, [out], [out + "_a"]))
        out += "_a"
    return out


def make_head(
    meta: HeadMeta,
    rng: np.random.Generator,
    *,
    hidden: tuple[int, ...] = (8,),
    value_hidden: tuple[int, ...] = (8,),
    act: str = "Tanh",
    style: str = "gemm",
    value_source: str = "obs_norm",
    extra_op: str = "",
) -> bytes:
    """A random head ONNX for ``meta``'s action space; ``extra_op`` adds an op outside the MLP subset."""
    n = action_dim(meta.action_space)
    nodes: list[Any] = []
    inits: list[Any] = []

    def chain(x: str, sizes: tuple[int, ...], tag: str) -> str:
        for k in range(len(sizes) - 1):
            w = rng.standard_normal((sizes[k], sizes[k + 1])).astype(np.float32) * 0.5
            b = rng.standard_normal(sizes[k + 1]).astype(np.float32) * 0.1
            last = k == len(sizes) - 2
            x = _layer(nodes, inits, x, w=w, b=b, act="" if last else act, style=style, tag=f"{tag}{k}")
        return x

    policy = chain("features", (F, *hidden, n), "p")
    if extra_op:
        nodes.append(helper.make_node(extra_op, [policy], [policy + "_x"]))
        policy += "_x"
    first = "logits" if meta.distribution == "categorical" else "mean"
    nodes.append(helper.make_node("Identity", [policy], [first]))
    width = F if value_source == "features" else meta.observation_size
    value = chain(value_source, (width, *value_hidden, 1), "v")
    inits.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"))
    nodes.append(helper.make_node("Squeeze", [value, "axis1"], ["value"]))
    outputs = [helper.make_tensor_value_info(first, TensorProto.FLOAT, ["batch", n])]
    if meta.distribution == "gaussian":
        inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(np.float32) * 0.3, "log_std_p"))
        inits.append(numpy_helper.from_array(np.array([n], dtype=np.int64), "n"))
        nodes.append(helper.make_node("Shape", ["features"], ["shape"], end=1))
        nodes.append(helper.make_node("Concat", ["shape", "n"], ["bn"], axis=0))
        nodes.append(helper.make_node("Expand", ["log_std_p", "bn"], ["log_std"]))
        outputs.append(helper.make_tensor_value_info("log_std", TensorProto.FLOAT, ["batch", n]))
    outputs.append(helper.make_tensor_value_info("value", TensorProto.FLOAT, ["batch"]))
    inputs = [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", F])]
    if value_source == "obs_norm":
        inputs.append(helper.make_tensor_value_info("obs_norm", TensorProto.FLOAT, ["batch", width]))
    graph = helper.make_graph(nodes, "head", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _meta_for(meta: HeadMeta, value_source: str) -> HeadMeta:
    inputs = ("features",) if value_source == "features" else ("features", "obs_norm")
    return meta.with_(inputs=inputs)


def _assert_close(expected: Any, actual: Any, rows: int) -> None:
    for name in ("logits", "mean", "log_std", "value"):
        e, a = getattr(expected, name), getattr(actual, name)
        assert (e is None) == (a is None), name
        if e is not None:
            np.testing.assert_allclose(np.broadcast_to(a, e.shape), e, rtol=1e-5, atol=1e-5, err_msg=name)
    assert expected.value.shape == (rows,)


TASKS = ("cartpole", "acrobot", "cartpole-continuous")


def test_exported_heads_of_a_real_bundle_are_recognised_and_match_onnxruntime(tiny_bundle: Path) -> None:
    bundle = Bundle.open(tiny_bundle)
    banks = HeadBanks()
    rng = np.random.default_rng(0)
    for task in bundle.task_ids():
        record = bundle.head(task)
        model, meta = record.read_onnx(), record.meta
        stacked = banks.stack(parse_mlp_head(model, meta), meta, feature_size=F)
        session = HeadRuntime(model, meta, feature_size=F, opts=OPTS)
        features = rng.standard_normal((7, F)).astype(np.float32)
        obs_norm = rng.standard_normal((7, meta.observation_size)).astype(np.float32)
        _assert_close(session.run(features, obs_norm), stacked.run(features, obs_norm), 7)


@pytest.mark.parametrize("extra_op", ["Sigmoid", "Softmax", "Abs"])
def test_graphs_outside_the_mlp_subset_are_refused_and_still_load_in_onnxruntime(
    tiny_bundle: Path, extra_op: str
) -> None:
    meta = _meta(tiny_bundle, "acrobot")
    model = make_head(meta, np.random.default_rng(1), extra_op=extra_op)
    with pytest.raises(NotAnMlp, match=extra_op):
        parse_mlp_head(model, meta)
    HeadRuntime(model, meta, feature_size=F, opts=OPTS).warm_up((1, 4), meta.observation_size)


def test_weights_computed_at_run_time_and_garbage_bytes_are_not_an_mlp(tiny_bundle: Path) -> None:
    meta = _meta(tiny_bundle, "cartpole")
    with pytest.raises(NotAnMlp, match="protobuf"):
        parse_mlp_head(b"\x00not onnx at all\xff", meta)
    model = onnx.load_from_string(make_head(meta, np.random.default_rng(2)))
    # Make the first weight an input-dependent value: features @ (features^T ...) is not a constant matmul.
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    gemm.input[1] = "features"
    with pytest.raises(NotAnMlp):
        parse_mlp_head(model.SerializeToString(), meta)


def test_a_head_reading_more_features_than_the_trunk_has_is_incompatible(tiny_bundle: Path) -> None:
    meta = _meta_for(_meta(tiny_bundle, "cartpole"), "obs_norm")
    parsed = parse_mlp_head(make_head(meta, np.random.default_rng(3)), meta)
    head = HeadBanks().stack(parsed, meta, feature_size=F + 4)
    with pytest.raises(IncompatibleHead, match=f"reads {F} columns of features"):
        head.warm_up((1,), meta.observation_size)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.data(),
    n_heads=st.integers(1, 6),
    hidden=st.lists(st.integers(1, 12), min_size=0, max_size=2).map(tuple),
    value_hidden=st.lists(st.integers(1, 12), min_size=0, max_size=2).map(tuple),
    act=st.sampled_from(["Tanh", "Relu"]),
    style=st.sampled_from(["gemm", "gemm-nobias", "matmul"]),
    value_source=st.sampled_from(["features", "obs_norm"]),
    task=st.sampled_from(TASKS),
)
def test_stacked_heads_match_onnxruntime_on_mixed_batches(
    tiny_bundle: Path,
    *,
    data: st.DataObject,
    n_heads: int,
    hidden: tuple[int, ...],
    value_hidden: tuple[int, ...],
    act: str,
    style: str,
    value_source: str,
    task: str,
) -> None:
    meta = _meta_for(_meta(tiny_bundle, task), value_source)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    banks = HeadBanks()
    models = [
        make_head(
            meta,
            rng,
            hidden=hidden,
            value_hidden=value_hidden,
            act=act,
            style=style,
            value_source=value_source,
        )
        for _ in range(n_heads)
    ]
    stacked = [banks.stack(parse_mlp_head(m, meta), meta, feature_size=F) for m in models]
    sessions = [HeadRuntime(m, meta, feature_size=F, opts=OPTS) for m in models]
    # A batch: blocks of rows, each from some head (heads may repeat, in any order), some wanting values.
    blocks = data.draw(
        st.lists(
            st.tuples(st.integers(0, n_heads - 1), st.integers(1, 5), st.booleans()), min_size=1, max_size=8
        )
    )
    rows = [r for _, r, _ in blocks]
    features = rng.standard_normal((sum(rows), F)).astype(np.float32)
    norms = [rng.standard_normal((r, meta.observation_size)).astype(np.float32) for r in rows]
    out = run_stacked([stacked[h] for h, _, _ in blocks], rows, features, norms, [v for _, _, v in blocks])
    at = 0
    for (h, r, want_value), norm in zip(blocks, norms, strict=True):
        expected = sessions[h].run(features[at : at + r], norm)
        first = "logits" if meta.distribution == "categorical" else "mean"
        np.testing.assert_allclose(
            getattr(out, first)[at : at + r], getattr(expected, first), rtol=1e-5, atol=1e-5
        )
        if out.log_std is not None:
            got = np.broadcast_to(out.log_std, (sum(rows), expected.log_std.shape[-1]))[at : at + r]
            np.testing.assert_allclose(got, np.broadcast_to(expected.log_std, got.shape), rtol=1e-6)
        if want_value:
            np.testing.assert_allclose(out.value[at : at + r], expected.value, rtol=1e-5, atol=1e-5)
        else:
            assert np.isnan(out.value[at : at + r]).all()
        at += r


def test_banks_grow_free_and_reuse_slots_only_after_the_last_holder_lets_go(tiny_bundle: Path) -> None:
    meta = _meta_for(_meta(tiny_bundle, "cartpole"), "features")
    rng = np.random.default_rng(4)
    banks = HeadBanks()
    parsed = [parse_mlp_head(make_head(meta, rng, value_source="features"), meta) for _ in range(20)]
    heads: list[StackedHead | None] = [banks.stack(p, meta, feature_size=F) for p in parsed]
    bank = heads[0].policy_bank  # type: ignore[union-attr]
    assert len(banks.banks) == 2  # one policy bank, one value bank: same shapes, every head
    assert bank.live == 20 and bank.capacity == 32  # 8 -> 16 -> 32
    features = rng.standard_normal((3, F)).astype(np.float32)
    held = heads[5]  # an in-flight request holds the head it resolved
    assert held is not None
    before = held.run(features, features).logits
    slot = held.policy_slot
    heads[5] = None  # the registry unloads it
    assert bank.live == 20  # still held: its slot must not be reused
    newcomer = banks.stack(parsed[0], meta, feature_size=F)
    assert newcomer.policy_slot != slot
    np.testing.assert_array_equal(held.run(features, features).logits, before)
    del held
    gc.collect()
    assert bank.live == 20  # 19 + the newcomer
    reused = banks.stack(parsed[1], meta, feature_size=F)
    assert reused.policy_slot == slot  # the free list hands the slot out again
    np.testing.assert_allclose(reused.run(features, features).logits, heads[1].run(features, features).logits)  # type: ignore[union-attr]
    heads.clear()
    del newcomer, reused
    gc.collect()
    assert bank.live == 0 and bank.capacity == 32


def test_a_batch_over_every_chunk_of_a_bank_equals_each_head_alone(tiny_bundle: Path) -> None:
    """Slots live in chunks of 8, 8, 16, 32 ... rows; one grouped pass gathers weights from several."""
    meta = _meta_for(_meta(tiny_bundle, "cartpole"), "features")
    rng = np.random.default_rng(7)
    banks = HeadBanks()
    heads = [
        banks.stack(parse_mlp_head(make_head(meta, rng, value_source="features"), meta), meta, feature_size=F)
        for _ in range(40)
    ]
    bank = heads[0].policy_bank
    assert bank.capacity == 64 and len({h.policy_slot for h in heads}) == 40
    picked = [heads[i] for i in (39, 0, 12, 7, 8, 25, 16, 3, 33)]  # chunks 3, 0, 1, 0, 1, 2, 2, 0, 3
    rows = [1, 2, 1, 3, 1, 2, 1, 1, 2]
    features = rng.standard_normal((sum(rows), F)).astype(np.float32)
    obs_norms = [rng.standard_normal((r, 4)).astype(np.float32) for r in rows]
    out = run_stacked(picked, rows, features, obs_norms, [True] * len(picked))
    at = 0
    for head, r, obs in zip(picked, rows, obs_norms, strict=True):
        alone = head.run(features[at : at + r], obs)
        np.testing.assert_allclose(out.logits[at : at + r], alone.logits, rtol=1e-6, atol=1e-6)  # type: ignore[index]
        np.testing.assert_allclose(out.value[at : at + r], alone.value, rtol=1e-6, atol=1e-6)
        at += r
