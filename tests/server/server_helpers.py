"""Helpers of the server tests: requests, a second head version, the torch reference."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from polyhead.bundle import Bundle
from polyhead.tensors import from_proto, to_proto
from polyhead.v1 import policy_pb2, policy_pb2_grpc

OBS_SIZE = {"cartpole": 4, "acrobot": 6, "cartpole-continuous": 4}
TASKS = tuple(OBS_SIZE)


def observations(task: str, rows: int | None = None, *, seed: int = 0) -> npt.NDArray[np.float32]:
    rng = np.random.default_rng(seed)
    shape = (OBS_SIZE[task],) if rows is None else (rows, OBS_SIZE[task])
    return (rng.standard_normal(shape) * 0.5).astype(np.float32)


def act(
    stub: policy_pb2_grpc.PolicyServiceStub, task: str, obs: npt.NDArray[Any], **fields: Any
) -> policy_pb2.ActResponse:
    fields.setdefault("deterministic", True)
    return stub.Act(policy_pb2.ActRequest(task_id=task, observations=to_proto(obs), **fields), timeout=30)


def actions_of(response: policy_pb2.ActResponse) -> npt.NDArray[Any]:
    return from_proto(response.actions)


def new_head_version(bundle_dir: Path, task: str, *, seed: int = 1) -> tuple[bytes, str]:
    """A different head for ``task`` on the same trunk: (head.onnx bytes, head.json text)."""
    import torch

    from polyhead.trainer.export import export_head
    from polyhead.trainer.policy import load_policy

    bundle = Bundle.open(bundle_dir)
    policy = load_policy(bundle)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in policy.head(task).actor.parameters():
            p.add_(torch.randn_like(p) * 2.0)
    onnx_bytes = export_head(policy, task)
    meta = bundle.head(task).meta.with_(version=0, head_sha256="")
    return onnx_bytes, json.dumps(meta.to_json())
