"""Tensor wire conversion and the observation/action conventions shared by server, trainer and clients."""

from __future__ import annotations

import math

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given

from polyhead.errors import BatchTooLarge, InvalidArgument, InvalidObservation
from polyhead.spaces import (
    BoxSpec,
    DiscreteSpec,
    pad_observations,
    raw_to_env_action,
    space_from_json,
    space_from_proto,
    space_to_json,
    space_to_proto,
    validate_observations,
)
from polyhead.tensors import from_proto, to_proto
from polyhead.v1 import types_pb2

BOX4 = BoxSpec(shape=(4,), low=(-math.inf,) * 4, high=(math.inf,) * 4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.int32, np.uint8])
def test_tensor_round_trip(dtype: type) -> None:
    arr = (np.arange(12).reshape(3, 4) * 3).astype(dtype)
    back = from_proto(to_proto(arr))
    assert back.dtype == arr.dtype and back.shape == arr.shape and (back == arr).all()


def test_tensor_float_data_path() -> None:
    msg = types_pb2.Tensor(shape=[2, 2], float_data=[1, 2, 3, 4])
    assert from_proto(msg).tolist() == [[1, 2], [3, 4]]


@pytest.mark.parametrize(
    ("msg", "fragment"),
    [
        (types_pb2.Tensor(dtype=types_pb2.DTYPE_FLOAT32, shape=[2, 2], raw_data=b"\0" * 12), "needs 16"),
        (types_pb2.Tensor(shape=[3], float_data=[1, 2]), "needs 3"),
        (types_pb2.Tensor(shape=[-1], float_data=[1]), "negative"),
        (types_pb2.Tensor(shape=[1 << 20, 1 << 20], float_data=[1]), "exceeds"),
        (types_pb2.Tensor(shape=[1], float_data=[1], int_data=[1]), "exactly one"),
        (types_pb2.Tensor(dtype=77, shape=[1], raw_data=b"\0" * 4), "unknown tensor dtype"),
    ],
)
def test_malformed_tensors(msg: types_pb2.Tensor, fragment: str) -> None:
    with pytest.raises(InvalidArgument, match=fragment):
        from_proto(msg, field="observations")


def test_validate_single_and_batch() -> None:
    one, batched = validate_observations(np.zeros(4, np.float32), BOX4)
    assert one.shape == (1, 4) and not batched
    many, batched = validate_observations(np.zeros((5, 4), np.float64), BOX4, max_batch=8)
    assert many.shape == (5, 4) and many.dtype == np.float32 and batched


@pytest.mark.parametrize(
    ("obs", "error", "fragment"),
    [
        (np.zeros(3, np.float32), InvalidObservation, r"expected \[4\] or \[batch, 4\]"),
        (np.zeros((2, 5), np.float32), InvalidObservation, "does not match"),
        (np.array([0.0, np.nan, 0.0, 0.0], np.float32), InvalidObservation, "NaN or inf"),
        (np.array([[0.0, 0, 0, 0], [0, 0, np.inf, 0]], np.float32), InvalidObservation, "batch row 1"),
        (np.zeros((0, 4), np.float32), InvalidObservation, "empty batch"),
        (np.zeros((9, 4), np.float32), BatchTooLarge, "max batch size 8"),
        (np.array(["a", "b", "c", "d"]), InvalidObservation, "numeric"),
    ],
)
def test_bad_observations(obs: np.ndarray, error: type, fragment: str) -> None:
    with pytest.raises(error, match=fragment):
        validate_observations(obs, BOX4, max_batch=8)


def test_padding() -> None:
    padded = pad_observations(np.ones((2, 4), np.float32), 6)
    assert padded.shape == (2, 6) and padded[:, 4:].sum() == 0 and padded[:, :4].sum() == 8
    with pytest.raises(InvalidObservation):
        pad_observations(np.ones((1, 7), np.float32), 6)


def test_actions_mapped_to_bounds() -> None:
    space = BoxSpec(shape=(2,), low=(-2.0, 0.0), high=(2.0, 10.0))
    out = raw_to_env_action(np.array([[-5.0, 0.0], [0.5, 1.0]], np.float32), space)
    assert out.shape == (2, 2) and out.dtype == np.float32
    assert np.allclose(out, [[-2.0, 5.0], [1.0, 10.0]])
    disc = raw_to_env_action(np.array([0, 2]), DiscreteSpec(n=3, start=-1))
    assert disc.tolist() == [-1, 1]


@pytest.mark.parametrize("space", [BOX4, DiscreteSpec(n=3, start=1), BoxSpec((1,), (-1.0,), (1.0,))])
def test_space_round_trips(space: BoxSpec | DiscreteSpec) -> None:
    assert space_from_json(space_to_json(space)) == space
    assert space_from_proto(space_to_proto(space)) == space


_WIRE_DTYPES = [np.float32, np.float64, np.int64, np.int32, np.uint8]


@st.composite
def _arrays(draw: st.DrawFn) -> np.ndarray:
    """Arrays of every wire dtype, 0-d to 3-d, some empty, some non-contiguous views."""
    dtype = draw(st.sampled_from(_WIRE_DTYPES))
    shape = draw(st.lists(st.integers(0, 4), min_size=0, max_size=3))
    arr = draw(hnp.arrays(dtype, tuple(shape)))
    if arr.ndim >= 2 and draw(st.booleans()):
        arr = arr.T
    if arr.ndim >= 1 and arr.shape[0] > 1 and draw(st.booleans()):
        arr = arr[::2]
    return arr


@given(_arrays())
def test_fast_tensor_encoding_parses_back_equal_to_the_converting_path(arr: np.ndarray) -> None:
    from polyhead.tensors import to_proto_converting

    fast = types_pb2.Tensor.FromString(to_proto(arr).SerializeToString())
    assert fast == to_proto_converting(arr)
    np.testing.assert_array_equal(from_proto(fast), arr)
    # Filling a message that already holds a tensor replaces it, on both paths.
    out = to_proto(np.zeros((2, 3), np.float32))
    assert to_proto(arr, out) == to_proto_converting(arr)
