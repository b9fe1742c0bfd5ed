"""Per-task encoders in the server: format-1 bundles still serve, encoder and head swap as one version under
live clients, each task's own observation shape is enforced, byte-identical encoders are shared."""

from __future__ import annotations

import copy
import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from server_helpers import act, actions_of, observations

from polyhead.bundle import Bundle
from polyhead.server.app import BackgroundServer
from polyhead.tensors import to_proto
from polyhead.v1 import admin_pb2, admin_pb2_grpc, policy_pb2, policy_pb2_grpc

FIXTURES = Path(__file__).parent.parent / "fixtures"


def test_a_format_1_bundle_still_serves_what_it_served(server_settings: Any, tmp_path: Path) -> None:
    """The checked-in format-1 bundle (padded trunk, no encoders) serves the actions the polyhead that
    wrote it computed (recorded beside it), alone and in one mixed batch."""
    bundle_dir = tmp_path / "v1"
    shutil.copytree(FIXTURES / "bundle_v1", bundle_dir)
    expected = json.loads((FIXTURES / "bundle_v1_expected.json").read_text())
    obs = np.asarray(expected["observations"], np.float32)
    with BackgroundServer(server_settings(bundle=bundle_dir)) as srv, grpc.insecure_channel(srv.target) as ch:
        stub = policy_pb2_grpc.PolicyServiceStub(ch)
        listed = stub.ListTasks(policy_pb2.ListTasksRequest())
        assert listed.observation_size == 4
        assert {t.task_id for t in listed.tasks} == set(expected["actions"])
        for task_id, actions in expected["actions"].items():
            response = act(stub, task_id, obs)
            assert response.head_version == 1
            np.testing.assert_array_equal(actions_of(response), actions)
        before = srv.running.batcher.stats
        futures = [
            stub.Act.future(
                policy_pb2.ActRequest(task_id=t, observations=to_proto(obs), deterministic=True), timeout=30
            )
            for _ in range(20)
            for t in expected["actions"]
        ]
        for future, task_id in zip(futures, [t for _ in range(20) for t in expected["actions"]], strict=True):
            np.testing.assert_array_equal(actions_of(future.result()), expected["actions"][task_id])
        after = srv.running.batcher.stats
        assert after.encoder_runs == before.encoder_runs  # format 1: no encoders, the trunk pads


def _reference(policy: Any, task: str, obs: np.ndarray) -> np.ndarray:
    return np.asarray(policy.act_deterministic(task, obs))


def _new_adapter_version(bundle_dir: Path, task: str) -> dict[str, Any]:
    """A version of ``task`` whose encoder and head both differ from version 1; the torch policies of
    version 1, version 2, and of the mix no swap may ever serve (v1 encoder with v2 head)."""
    from polyhead.trainer.export import export_encoder, export_head
    from polyhead.trainer.policy import load_policy

    bundle = Bundle.open(bundle_dir)
    v1 = load_policy(bundle)
    v2 = copy.deepcopy(v1)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in v2.encoder_of(task).parameters():
            p.add_(torch.randn_like(p) * 1.0)
        for p in v2.head(task).actor.parameters():
            p.add_(torch.randn_like(p) * 2.0)
    mixed = copy.deepcopy(v1)
    mixed.head(task).load_state_dict(v2.head(task).state_dict())
    meta = bundle.head(task).meta.with_(version=0, head_sha256="", encoder_sha256="")
    return {
        "onnx": export_head(v2, task, exporter="torchscript"),
        "encoder": export_encoder(v2, task, exporter="torchscript"),
        "head_json": json.dumps(meta.to_json()),
        "policies": {1: v1, 2: v2, "mixed": mixed},
    }


def test_encoder_and_head_swap_atomically_under_live_clients(
    server: Any, admin_stub: Any, tiny_bundle: Path
) -> None:
    task = "cartpole"
    obs = observations(task, 64, seed=21)
    new = _new_adapter_version(tiny_bundle, task)
    expected = {v: _reference(p, task, obs) for v, p in new["policies"].items()}
    # The test can tell a torn swap apart: the forbidden mix acts differently from both versions.
    assert not np.array_equal(expected["mixed"], expected[2])
    assert not np.array_equal(expected[1], expected[2])
    loaded = admin_stub.LoadHead(
        admin_pb2.LoadHeadRequest(
            task_id=task,
            onnx=new["onnx"],
            encoder_onnx=new["encoder"],
            head_json=new["head_json"],
            activate=False,
        ),
        timeout=60,
    )
    assert loaded.head.version == 2 and loaded.active_version == 1

    stop = threading.Event()
    failures: list[BaseException] = []
    seen: dict[int, int] = {1: 0, 2: 0}
    lock = threading.Lock()

    def client() -> None:
        with grpc.insecure_channel(server.target) as ch:
            stub = policy_pb2_grpc.PolicyServiceStub(ch)
            while not stop.is_set():
                try:
                    response = act(stub, task, obs)
                    served = actions_of(response)
                    version = response.head_version
                    if not np.array_equal(served, expected[version]):
                        failures.append(AssertionError(f"version {version} served other actions"))
                    with lock:
                        seen[version] += 1
                except grpc.RpcError as exc:
                    failures.append(exc)

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        for i in range(40):
            target = 2 if i % 2 == 0 else 1
            swap = admin_stub.SetActiveVersion(
                admin_pb2.SetActiveVersionRequest(task_id=task, version=target)
            )
            assert swap.active_version == target
            time.sleep(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not failures, failures[:3]
    assert seen[1] > 0 and seen[2] > 0, seen


def test_wrong_observation_shapes_name_each_tasks_own_shape(policy_stub: Any) -> None:
    """No padding is visible: Acrobot takes exactly its 6 numbers, CartPole exactly its 4."""
    for task, wrong, shape in (
        ("acrobot", 4, "[6]"),
        ("cartpole", 6, "[4]"),
        ("cartpole-continuous", 6, "[4]"),
    ):
        with pytest.raises(grpc.RpcError) as err:
            act(policy_stub, task, np.zeros((2, wrong), np.float32))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = err.value.details() or ""
        assert shape in details, details


def test_an_uploaded_head_may_name_a_loaded_encoder_instead_of_sending_it(
    server: Any, admin_stub: Any, tiny_bundle: Path
) -> None:
    """A new head on an unchanged (shared, frozen) encoder uploads no encoder bytes: head.json names it by
    sha256 and the server reuses the loaded session; an unknown sha256 is INVALID_ARGUMENT."""
    task = "acrobot"
    record = Bundle.open(tiny_bundle).head(task)
    head_json = json.dumps(record.meta.with_(version=0, head_sha256="").to_json())
    loaded = admin_stub.LoadHead(
        admin_pb2.LoadHeadRequest(task_id=task, onnx=record.read_onnx(), head_json=head_json, activate=False),
        timeout=60,
    )
    assert loaded.head.version == 2
    registry = server.running.registry
    versions = registry.tasks[task].versions
    assert versions[2].encoder is versions[1].encoder  # one session for identical encoder bytes
    unknown = json.dumps(record.meta.with_(version=0, head_sha256="", encoder_sha256="0" * 64).to_json())
    with pytest.raises(grpc.RpcError) as err:
        admin_stub.LoadHead(
            admin_pb2.LoadHeadRequest(task_id=task, onnx=record.read_onnx(), head_json=unknown), timeout=60
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "encoder" in (err.value.details() or "")


def test_a_version_with_an_encoder_is_refused_by_a_format_1_server(
    server_settings: Any, tmp_path: Path, tiny_bundle: Path
) -> None:
    bundle_dir = tmp_path / "v1"
    shutil.copytree(FIXTURES / "bundle_v1", bundle_dir)
    v2_record = Bundle.open(tiny_bundle).head("cartpole")
    with (
        BackgroundServer(server_settings(bundle=bundle_dir)) as srv,
        grpc.insecure_channel(srv.admin_target) as ch,
    ):
        stub = admin_pb2_grpc.HeadAdminStub(ch)
        # Bound to the served trunk's hash, so what is refused is the format, not the trunk.
        trunk = Bundle.open(bundle_dir).manifest.trunk_sha256
        meta = v2_record.meta.with_(version=0, head_sha256="", trunk_sha256=trunk)
        with pytest.raises(grpc.RpcError) as err:
            stub.LoadHead(
                admin_pb2.LoadHeadRequest(
                    task_id="cartpole",
                    onnx=v2_record.read_onnx(),
                    encoder_onnx=v2_record.read_encoder() or b"",
                    head_json=json.dumps(meta.to_json()),
                ),
                timeout=60,
            )
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "format" in (err.value.details() or "")
