"""Observation and action spaces as plain data, and the numeric conventions tied to them.

A space is either :class:`BoxSpec` or :class:`DiscreteSpec` (the gymnasium spaces a policy head can act
in). This module converts them to and from JSON (bundle metadata), protobuf (the wire) and gymnasium
(lazily imported), and owns the two conventions every part must agree on:

* observations are flattened and zero-padded to the trunk's input size (:func:`pad_observations`);
* a Gaussian head acts in [-1, 1]: the raw action ``u`` is clipped there and mapped affinely onto the
  Box bounds (:func:`raw_to_env_action`); log-probs are always of ``u``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

from polyhead.errors import BatchTooLarge, InvalidArgument, InvalidObservation
from polyhead.tensors import dtype_from_proto, dtype_to_proto
from polyhead.v1 import types_pb2


@dataclass(frozen=True)
class BoxSpec:
    """A real-valued array space with per-element bounds (flattened, C-order)."""

    shape: tuple[int, ...]
    low: tuple[float, ...]
    high: tuple[float, ...]
    dtype: str = "float32"

    def __post_init__(self) -> None:
        n = self.size
        if len(self.low) != n or len(self.high) != n:
            raise InvalidArgument(
                f"Box bounds need {n} values for shape {list(self.shape)}; "
                f"got {len(self.low)} low and {len(self.high)} high"
            )

    @property
    def size(self) -> int:
        return int(math.prod(self.shape))

    @property
    def bounded(self) -> bool:
        return all(math.isfinite(v) for v in (*self.low, *self.high))


@dataclass(frozen=True)
class DiscreteSpec:
    """Integers ``start .. start + n - 1``."""

    n: int
    start: int = 0

    def __post_init__(self) -> None:
        if self.n < 1:
            raise InvalidArgument(f"Discrete space needs n >= 1, got {self.n}")


SpaceSpec: TypeAlias = BoxSpec | DiscreteSpec


# --- JSON (bundle metadata) ---------------------------------------------------------------------------
def _json_float(v: float) -> float | str:
    return v if math.isfinite(v) else ("inf" if v > 0 else "-inf")


def space_to_json(space: SpaceSpec) -> dict[str, Any]:
    if isinstance(space, DiscreteSpec):
        return {"type": "discrete", "n": space.n, "start": space.start}
    return {
        "type": "box",
        "shape": list(space.shape),
        "low": [_json_float(v) for v in space.low],
        "high": [_json_float(v) for v in space.high],
        "dtype": space.dtype,
    }


def space_from_json(data: dict[str, Any]) -> SpaceSpec:
    """Parse :func:`space_to_json` output; raises InvalidArgument on anything else."""
    try:
        kind = data["type"]
        if kind == "discrete":
            return DiscreteSpec(n=int(data["n"]), start=int(data.get("start", 0)))
        if kind == "box":
            return BoxSpec(
                shape=tuple(int(d) for d in data["shape"]),
                low=tuple(float(v) for v in data["low"]),
                high=tuple(float(v) for v in data["high"]),
                dtype=str(data.get("dtype", "float32")),
            )
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidArgument(f"malformed space description {data!r}: {exc}") from exc
    raise InvalidArgument(f"unknown space type {data.get('type')!r}; expected 'box' or 'discrete'")


# --- protobuf (the wire) ------------------------------------------------------------------------------
def space_to_proto(space: SpaceSpec) -> types_pb2.Space:
    msg = types_pb2.Space()
    if isinstance(space, DiscreteSpec):
        msg.discrete.n = space.n
        msg.discrete.start = space.start
    else:
        msg.box.shape[:] = space.shape
        msg.box.low[:] = space.low
        msg.box.high[:] = space.high
        msg.box.dtype = dtype_to_proto(space.dtype)  # type: ignore[assignment]
    return msg


def space_from_proto(msg: types_pb2.Space) -> SpaceSpec:
    kind = msg.WhichOneof("kind")
    if kind == "discrete":
        return DiscreteSpec(n=msg.discrete.n, start=msg.discrete.start)
    if kind == "box":
        return BoxSpec(
            shape=tuple(msg.box.shape),
            low=tuple(msg.box.low),
            high=tuple(msg.box.high),
            dtype=str(dtype_from_proto(msg.box.dtype).newbyteorder("=")),
        )
    raise InvalidArgument("space message has neither box nor discrete set")


# --- gymnasium ----------------------------------------------------------------------------------------
def space_from_gymnasium(space: Any) -> SpaceSpec:
    """Describe a gymnasium Box or Discrete space (duck-typed, so gymnasium need not be imported)."""
    kind = type(space).__name__
    if kind == "Discrete":
        return DiscreteSpec(n=int(space.n), start=int(space.start))
    if kind == "Box":
        return BoxSpec(
            shape=tuple(int(d) for d in space.shape),
            low=tuple(float(v) for v in np.asarray(space.low, dtype=np.float64).ravel()),
            high=tuple(float(v) for v in np.asarray(space.high, dtype=np.float64).ravel()),
            dtype=str(np.dtype(space.dtype)),
        )
    raise InvalidArgument(
        f"unsupported gymnasium space {kind}; a policy head acts in Box or Discrete spaces "
        "(wrap Dict/Tuple observations into a flat Box first)"
    )


def space_to_gymnasium(space: SpaceSpec) -> Any:
    """Build the gymnasium space (imports gymnasium, an optional dependency of clients)."""
    import gymnasium as gym

    if isinstance(space, DiscreteSpec):
        return gym.spaces.Discrete(space.n, start=space.start)
    # Bounds in the space's own dtype: float64 bounds on a float32 Box make gymnasium warn on every build.
    low = np.asarray(space.low, dtype=space.dtype).reshape(space.shape)
    high = np.asarray(space.high, dtype=space.dtype).reshape(space.shape)
    return gym.spaces.Box(low=low, high=high, shape=space.shape, dtype=np.dtype(space.dtype))


# --- conventions --------------------------------------------------------------------------------------
def action_dim(space: SpaceSpec) -> int:
    """Logits for a Discrete space, mean/log-std entries for a Box."""
    return space.n if isinstance(space, DiscreteSpec) else space.size


def observation_size(space: SpaceSpec) -> int:
    """Number of trunk inputs an observation of this space occupies (one-hot not used: Discrete is 1)."""
    return 1 if isinstance(space, DiscreteSpec) else space.size


def validate_observations(
    obs: npt.NDArray[Any], space: SpaceSpec, *, max_batch: int | None = None
) -> tuple[npt.NDArray[np.float32], bool]:
    """Check observations against a task's space; return them as float32 ``[B, size]`` and whether the
    input was a batch.

    Accepts one observation of the space's shape or a batch ``[B, *shape]``. Raises InvalidObservation
    (wrong shape or dtype, NaN/inf, empty batch) or BatchTooLarge.
    """
    shape: tuple[int, ...] = () if isinstance(space, DiscreteSpec) else space.shape
    if obs.dtype.kind not in "fiub":
        raise InvalidObservation(f"observations must be numeric; got dtype {obs.dtype}")
    if tuple(obs.shape) == tuple(shape):
        batched = False
        flat = obs.reshape(1, -1)
    elif tuple(obs.shape[1:]) == tuple(shape):
        batched = True
        flat = obs.reshape(obs.shape[0], max(1, math.prod(shape)))
    else:
        raise InvalidObservation(
            f"observation shape {list(obs.shape)} does not match the task's observation shape "
            f"{list(shape)}; expected {list(shape)} or [batch, {', '.join(map(str, shape))}]"
        )
    if flat.shape[0] == 0:
        raise InvalidObservation(f"empty batch: expected at least one observation of shape {list(shape)}")
    if max_batch is not None and flat.shape[0] > max_batch:
        raise BatchTooLarge(
            f"batch of {flat.shape[0]} observations exceeds the server's max batch size {max_batch}"
        )
    out = flat.astype(np.float32, copy=False)
    if not np.isfinite(out).all():
        bad = np.argwhere(~np.isfinite(out))[0]
        raise InvalidObservation(
            f"observation contains NaN or inf (first at batch row {bad[0]}, element {bad[1]}); "
            "expected finite values"
        )
    return out, batched


def pad_observations(flat: npt.NDArray[np.float32], size: int) -> npt.NDArray[np.float32]:
    """Zero-pad ``[B, d]`` observations to the trunk's input size ``[B, size]`` (d <= size)."""
    b, d = flat.shape
    if d == size:
        return np.ascontiguousarray(flat, dtype=np.float32)
    if d > size:
        raise InvalidObservation(f"observation of {d} values exceeds the trunk input size {size}")
    out = np.zeros((b, size), dtype=np.float32)
    out[:, :d] = flat
    return out


def raw_to_env_action(raw: npt.NDArray[Any], space: SpaceSpec) -> npt.NDArray[Any]:
    """Map raw policy outputs to environment actions.

    Discrete: ``raw`` holds indices ``[B]``; returns ``start + index`` as int64. Box: ``raw`` is
    ``[B, size]`` in the policy's [-1, 1] frame; returns float32 ``[B, *shape]`` within the bounds
    (unbounded dimensions pass through unclipped).
    """
    if isinstance(space, DiscreteSpec):
        return raw.astype(np.int64) + space.start
    u = np.asarray(raw, dtype=np.float32).reshape(-1, space.size)
    low = np.asarray(space.low, dtype=np.float32)
    high = np.asarray(space.high, dtype=np.float32)
    finite = np.isfinite(low) & np.isfinite(high)
    scaled = np.where(finite, low + (np.clip(u, -1.0, 1.0) + 1.0) * 0.5 * (high - low), u)
    return scaled.astype(np.float32).reshape((-1, *space.shape))
