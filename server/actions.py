"""From a head's outputs to actions: deterministic or sampled raw actions, their log-probs, env actions.

Conventions (shared with the trainer's torch policy):

* categorical: deterministic = ``argmax(logits)``; sampled = ``Categorical(logits)`` (Gumbel-max);
  log-prob = ``log_softmax(logits)[a]``;
* gaussian: deterministic = ``mean``; sampled = ``mean + exp(log_std) * eps``; log-prob of the raw ``u``
  (summed over dimensions), before :func:`polyhead.spaces.raw_to_env_action` clips and maps it.

Sampling noise comes per request: a request with a seed draws from ``default_rng(seed)`` only, so the same
seed, observations and head version give the same actions whatever else shares the batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from polyhead.server.runtime import HeadOutputs
from polyhead.spaces import DiscreteSpec, SpaceSpec, raw_to_env_action

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass(frozen=True)
class Sampling:
    """How one request's rows are chosen."""

    rows: int
    deterministic: bool
    seed: int | None
    log_prob: bool = True  # False: the caller does not need log-probs (they are returned as NaN)
    value: bool = True  # False: the caller does not need values (stacked heads skip the value MLP; NaN)


@dataclass(frozen=True)
class Actions:
    """Actions for a group of rows: raw (policy frame), env (post-processed), log-probs, values."""

    raw: npt.NDArray[np.generic]
    env: npt.NDArray[np.generic]
    log_prob: npt.NDArray[np.float32]
    value: npt.NDArray[np.float32]


def _noise(
    requests: Sequence[Sampling], shape_tail: tuple[int, ...], rng: np.random.Generator, kind: str
) -> npt.NDArray[np.float64] | None:
    """Per-row noise for the sampled rows (zeros for deterministic rows); None when nothing is sampled."""
    if all(r.deterministic for r in requests):
        return None
    total = sum(r.rows for r in requests)
    out = np.zeros((total, *shape_tail), dtype=np.float64)
    start = 0
    for r in requests:
        if not r.deterministic:
            gen = rng if r.seed is None else np.random.default_rng(r.seed)
            size = (r.rows, *shape_tail)
            out[start : start + r.rows] = (
                gen.gumbel(size=size) if kind == "gumbel" else gen.standard_normal(size)
            )
        start += r.rows
    return out


def choose(
    outputs: HeadOutputs, action_space: SpaceSpec, requests: Sequence[Sampling], rng: np.random.Generator
) -> Actions:
    """Actions for the rows of ``outputs``, which are the rows of ``requests`` concatenated in order."""
    need_log_prob = any(r.log_prob for r in requests)
    if outputs.logits is not None:
        noise = _noise(requests, outputs.logits.shape[1:], rng, "gumbel")
        raw = np.argmax(outputs.logits if noise is None else outputs.logits + noise, axis=1)
        if need_log_prob:
            logits = outputs.logits.astype(np.float64)
            shifted = logits - logits.max(axis=1, keepdims=True)
            log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
            log_prob = np.take_along_axis(log_softmax, raw[:, None], axis=1)[:, 0]
        raw_out: npt.NDArray[np.generic] = raw.astype(np.int64, copy=False)
        # Discrete env action = start + index (raw_to_env_action's rule, without its copies).
        env = raw_out if action_space_start(action_space) == 0 else raw_out + action_space_start(action_space)
    else:
        assert outputs.mean is not None
        assert outputs.log_std is not None
        noise = _noise(requests, outputs.mean.shape[1:], rng, "normal")
        if noise is None:
            u = outputs.mean.astype(np.float64)
        else:
            mean = outputs.mean.astype(np.float64)
            u = mean + np.exp(np.broadcast_to(outputs.log_std, mean.shape)) * noise
        if need_log_prob:
            mean = outputs.mean.astype(np.float64)
            log_std = np.broadcast_to(outputs.log_std.astype(np.float64), mean.shape)
            z = (u - mean) / np.exp(log_std)
            log_prob = (-0.5 * z * z - log_std - _HALF_LOG_2PI).sum(axis=1)
        raw_out = u.astype(np.float32)
        env = raw_to_env_action(raw_out, action_space)
    if not need_log_prob:
        log_prob = _nan_log_probs(raw_out.shape[0])
    return Actions(
        raw=raw_out,
        env=env,
        log_prob=log_prob.astype(np.float32, copy=False),
        value=outputs.value.astype(np.float32, copy=False),
    )


def action_space_start(space: SpaceSpec) -> int:
    return space.start if isinstance(space, DiscreteSpec) else 0


def _nan_log_probs(rows: int) -> npt.NDArray[np.float32]:
    return np.full(rows, np.nan, dtype=np.float32)
