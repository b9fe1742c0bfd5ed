"""A server keeps at most ``max_loaded_versions`` versions of a task loaded (active, previous, newest); older
ones are unloaded, stay on disk and can be loaded again."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from server_helpers import act, new_head_version, observations

from polyhead.bundle import Bundle, HeadMeta
from polyhead.server.app import BackgroundServer
from polyhead.v1 import admin_pb2, admin_pb2_grpc, policy_pb2_grpc


def _loaded(admin: Any, task: str) -> tuple[list[int], int]:
    heads = admin.ListHeads(admin_pb2.ListHeadsRequest(task_id=task), timeout=10).heads
    return sorted(h.version for h in heads), next(h.version for h in heads if h.active)


def test_uploads_keep_active_previous_and_newest(
    server: Any, admin_stub: Any, policy_stub: Any, tiny_bundle: Path
) -> None:
    onnx, head_json = new_head_version(tiny_bundle, "cartpole", seed=3)
    for _ in range(4):
        admin_stub.LoadHead(
            admin_pb2.LoadHeadRequest(task_id="cartpole", onnx=onnx, head_json=head_json, activate=True),
            timeout=60,
        )
    assert _loaded(admin_stub, "cartpole") == ([3, 4, 5], 5)
    # A staged candidate: the active (5) and its predecessor (4) stay, the oldest other one (3) goes.
    admin_stub.LoadHead(
        admin_pb2.LoadHeadRequest(task_id="cartpole", onnx=onnx, head_json=head_json, activate=False),
        timeout=60,
    )
    assert _loaded(admin_stub, "cartpole") == ([4, 5, 6], 5)
    # An unloaded version is no longer served: NOT_FOUND naming what is loaded.
    with pytest.raises(grpc.RpcError) as caught:
        act(policy_stub, "cartpole", observations("cartpole"), version=3)
    error: Any = caught.value
    assert error.code() == grpc.StatusCode.NOT_FOUND and "[4, 5, 6]" in error.details()
    # Rolling back to the previous version works: it was kept.
    admin_stub.SetActiveVersion(admin_pb2.SetActiveVersionRequest(task_id="cartpole", version=4), timeout=10)
    assert act(policy_stub, "cartpole", observations("cartpole")).head_version == 4


def test_bundle_watch_publishes_stay_bounded_and_on_disk(
    bundle_copy: Path, server_settings: Callable[..., Any]
) -> None:
    onnx, head_json = new_head_version(bundle_copy, "cartpole", seed=4)
    meta = HeadMeta.from_json_text(head_json, where="test")
    bundle = Bundle.open(bundle_copy)
    encoder = bundle.head("cartpole").read_encoder()  # None in a format-1 bundle
    with (
        BackgroundServer(server_settings(bundle_copy, watch_interval_s=0.05)) as srv,
        grpc.insecure_channel(srv.admin_target) as ch,
    ):
        admin = admin_pb2_grpc.HeadAdminStub(ch)
        for _ in range(8):
            version = bundle.write_head(meta, onnx, encoder=encoder, activate=True).version
            deadline = time.monotonic() + 30
            while _loaded(admin, "cartpole")[1] != version:
                assert time.monotonic() < deadline, f"version {version} never served"
                time.sleep(0.02)
            assert len(_loaded(admin, "cartpole")[0]) <= 3
        loaded, active = _loaded(admin, "cartpole")
        assert active == version and len(loaded) == 3 and version - 1 in loaded
        assert srv.running.registry.served_versions("cartpole") >= set(range(1, version + 1))
        # Every version stays on disk, and an unloaded one can be served again from there.
        assert bundle.versions("cartpole") == list(range(1, version + 1))
        admin.LoadHead(
            admin_pb2.LoadHeadRequest(task_id="cartpole", repository_path="heads/cartpole/2", activate=True),
            timeout=60,
        )
        with grpc.insecure_channel(srv.target) as data:
            stub = policy_pb2_grpc.PolicyServiceStub(data)
            assert act(stub, "cartpole", observations("cartpole")).head_version == 2
        assert (
            json.loads((bundle_copy / "heads" / "cartpole" / "active.json").read_text())["version"] == version
        )
