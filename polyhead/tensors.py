"""numpy <-> ``polyhead.v1.Tensor`` conversion, the one place that knows the tensor wire format."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from polyhead.errors import InvalidArgument
from polyhead.v1 import types_pb2

_TO_NUMPY: dict[int, np.dtype[np.generic]] = {
    types_pb2.DTYPE_FLOAT32: np.dtype("<f4"),
    types_pb2.DTYPE_FLOAT64: np.dtype("<f8"),
    types_pb2.DTYPE_INT64: np.dtype("<i8"),
    types_pb2.DTYPE_INT32: np.dtype("<i4"),
    types_pb2.DTYPE_UINT8: np.dtype("u1"),
}
_FROM_NUMPY: dict[np.dtype[np.generic], int] = {v.newbyteorder("="): k for k, v in _TO_NUMPY.items()}

# A single message may not describe more elements than this (protects against a 1e12 shape with no data).
MAX_ELEMENTS = 1 << 26


def dtype_to_proto(dtype: npt.DTypeLike) -> int:
    """The wire enum for a numpy dtype; raises InvalidArgument for unsupported dtypes."""
    dt = np.dtype(dtype).newbyteorder("=")
    try:
        return _FROM_NUMPY[dt]
    except KeyError:
        supported = ", ".join(sorted(str(d) for d in _FROM_NUMPY))
        raise InvalidArgument(f"unsupported tensor dtype {dt}; expected one of {supported}") from None


def dtype_from_proto(dtype: int) -> np.dtype[np.generic]:
    """The numpy dtype for a wire enum value (UNSPECIFIED means float32)."""
    if dtype == types_pb2.DTYPE_UNSPECIFIED:
        return np.dtype("<f4")
    try:
        return _TO_NUMPY[dtype]
    except KeyError:
        raise InvalidArgument(f"unknown tensor dtype enum value {dtype}") from None


# ndarray dtypes whose bytes are already the wire format (native order equals little-endian here).
_WIRE_READY: dict[np.dtype[np.generic], int] = {
    np.dtype(dt): code for code, dt in _TO_NUMPY.items() if np.dtype(dt) == np.dtype(dt).newbyteorder("=")
}


def to_proto(array: npt.ArrayLike, out: types_pb2.Tensor | None = None) -> types_pb2.Tensor:
    """Encode an array as raw little-endian bytes. Fills ``out`` when given.

    An ndarray (any shape, 0-d included) of a wire dtype in native little-endian order is encoded
    straight from its bytes, which is what the server's responses are; anything else goes through
    :func:`to_proto_converting`. Both give the same message (``tests/contract/test_tensors_spaces.py``)."""
    if type(array) is np.ndarray:
        code = _WIRE_READY.get(array.dtype)
        if code is not None:
            tensor = out if out is not None else types_pb2.Tensor()
            tensor.dtype = code  # type: ignore[assignment]
            tensor.shape[:] = array.shape
            tensor.raw_data = array.tobytes()  # C order, whatever the strides
            return tensor
    return to_proto_converting(array, out)


def to_proto_converting(array: npt.ArrayLike, out: types_pb2.Tensor | None = None) -> types_pb2.Tensor:
    """:func:`to_proto` for any array-like: converts bools, float16 and friends, other byte orders."""
    arr = np.asarray(array)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    elif arr.dtype.kind == "f" and arr.dtype != np.float64:
        arr = arr.astype(np.float32, copy=False)
    code = dtype_to_proto(arr.dtype)
    tensor = out if out is not None else types_pb2.Tensor()
    tensor.dtype = code  # type: ignore[assignment]
    tensor.shape[:] = arr.shape
    tensor.raw_data = np.ascontiguousarray(arr, dtype=_TO_NUMPY[code]).tobytes()
    return tensor


def from_proto(tensor: types_pb2.Tensor, *, field: str = "tensor") -> npt.NDArray[np.generic]:
    """Decode a Tensor, checking that its data matches its shape and dtype.

    Raises InvalidArgument naming ``field`` when the message is inconsistent.
    """
    shape = tuple(tensor.shape)
    if shape and min(shape) < 0:
        raise InvalidArgument(f"{field}: negative dimension in shape {list(shape)}")
    count = math.prod(shape)
    if count > MAX_ELEMENTS:
        raise InvalidArgument(f"{field}: shape {list(shape)} exceeds {MAX_ELEMENTS} elements")
    raw = tensor.raw_data
    if raw and not tensor.float_data and not tensor.int_data:  # what every client of ours sends
        dtype = dtype_from_proto(tensor.dtype)
        if len(raw) != count * dtype.itemsize:
            raise InvalidArgument(
                f"{field}: raw_data has {len(raw)} bytes; shape {list(shape)} of {dtype} "
                f"needs {count * dtype.itemsize}"
            )
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    sources = sum(1 for present in (raw, len(tensor.float_data), len(tensor.int_data)) if present)
    if sources > 1:
        raise InvalidArgument(f"{field}: set exactly one of raw_data, float_data, int_data (got {sources})")
    if len(tensor.int_data):
        data: npt.NDArray[np.generic] = np.asarray(tensor.int_data, dtype=np.int64)
    else:
        data = np.asarray(tensor.float_data, dtype=np.float32)
    if data.size != count:
        raise InvalidArgument(f"{field}: {data.size} values given; shape {list(shape)} needs {count}")
    return data.reshape(shape)


def is_empty(tensor: types_pb2.Tensor) -> bool:
    """True when the message carries no shape and no data (an unset optional tensor)."""
    return not tensor.shape and not tensor.raw_data and not tensor.float_data and not tensor.int_data
