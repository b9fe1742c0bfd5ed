"""numpy <-> ``polyhead.v1.Tensor`` conversion, the one place that knows the tensor wire format."""

from __future__ import annotations

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


def to_proto(array: npt.ArrayLike, out: types_pb2.Tensor | None = None) -> types_pb2.Tensor:
    """Encode an array as raw little-endian bytes (the fast path). Fills ``out`` when given."""
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
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"{field}: negative dimension in shape {list(shape)}")
    count = 1
    for d in shape:
        count *= d
        if count > MAX_ELEMENTS:
            raise InvalidArgument(f"{field}: shape {list(shape)} exceeds {MAX_ELEMENTS} elements")
    sources = sum(1 for present in (tensor.raw_data, len(tensor.float_data), len(tensor.int_data)) if present)
    if sources > 1:
        raise InvalidArgument(f"{field}: set exactly one of raw_data, float_data, int_data (got {sources})")
    if tensor.raw_data:
        dtype = dtype_from_proto(tensor.dtype)
        if len(tensor.raw_data) != count * dtype.itemsize:
            raise InvalidArgument(
                f"{field}: raw_data has {len(tensor.raw_data)} bytes; shape {list(shape)} of {dtype} "
                f"needs {count * dtype.itemsize}"
            )
        return np.frombuffer(tensor.raw_data, dtype=dtype).reshape(shape)
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
