"""HeadAdmin: hot swap under load, rollback, failed loads keep the old version, unload, token."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from server_helpers import TASKS, act, actions_of, new_head_version, observations

from polyhead.bundle import Bundle
from polyhead.server.app import BackgroundServer
from polyhead.v1 import admin_pb2, admin_pb2_grpc, policy_pb2_grpc


def _load_bytes(
    admin: Any, task: str, onnx: bytes, head_json: str, *, activate: bool, version: int = 0, **kw: Any
) -> admin_pb2.LoadHeadResponse:
    return admin.LoadHead(
        admin_pb2.LoadHeadRequest(
            task_id=task, onnx=onnx, head_json=head_json, activate=activate, version=version
        ),
        timeout=60,
        **kw,
    )


def test_swap_under_load_fails_no_call_and_names_one_of_two_versions(
    server: Any, admin_stub: Any, tiny_bundle: Path
) -> None:
    onnx, head_json = new_head_version(tiny_bundle, "cartpole")
    loaded = _load_bytes(admin_stub, "cartpole", onnx, head_json, activate=False)
    assert loaded.head.version == 2
    assert loaded.active_version == 1

    stop = threading.Event()
    failures: list[BaseException] = []
    versions: dict[str, set[int]] = {t: set() for t in TASKS}
    calls = [0]
    lock = threading.Lock()

    def client(index: int) -> None:
        with grpc.insecure_channel(server.target) as ch:
            stub = policy_pb2_grpc.PolicyServiceStub(ch)
            while not stop.is_set():
                for task in TASKS:
                    try:
                        response = act(stub, task, observations(task, 1 + index % 3, seed=index))
                        with lock:
                            versions[task].add(response.head_version)
                            calls[0] += 1
                    except grpc.RpcError as exc:
                        failures.append(exc)

    def calls_made() -> int:
        with lock:
            return calls[0]

    def wait_for_calls(more_than: int) -> None:
        deadline = time.monotonic() + 30
        while calls_made() <= more_than:
            assert time.monotonic() < deadline, "the clients stopped making calls"
            time.sleep(0.001)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    try:
        wait_for_calls(8 * len(TASKS))  # every client is connected and calling before the first swap
        for i in range(50):
            target = 2 if i % 2 == 0 else 1
            swap = admin_stub.SetActiveVersion(
                admin_pb2.SetActiveVersionRequest(task_id="cartpole", version=target)
            )
            assert swap.active_version == target
            wait_for_calls(calls_made())  # calls are served between every two swaps
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not failures, failures[:3]
    assert calls_made() > 50 + 8 * len(TASKS)
    assert versions["cartpole"] == {1, 2}
    assert versions["acrobot"] == {1}
    assert versions["cartpole-continuous"] == {1}


def test_rollback_serves_the_old_actions_again(
    server: Any, admin_stub: Any, policy_stub: Any, tiny_bundle: Path
) -> None:
    obs = observations("cartpole", 256, seed=11)
    v1 = actions_of(act(policy_stub, "cartpole", obs))
    onnx, head_json = new_head_version(tiny_bundle, "cartpole", seed=3)
    response = _load_bytes(admin_stub, "cartpole", onnx, head_json, activate=True)
    assert response.active_version == 2
    served = act(policy_stub, "cartpole", obs)
    assert served.head_version == 2
    assert not np.array_equal(actions_of(served), v1)  # the perturbed head acts differently
    # A specific version can still be asked for (canary / evaluation).
    np.testing.assert_array_equal(actions_of(act(policy_stub, "cartpole", obs, version=1)), v1)
    back = admin_stub.SetActiveVersion(admin_pb2.SetActiveVersionRequest(task_id="cartpole", version=1))
    assert (back.previous_version, back.active_version) == (2, 1)
    again = act(policy_stub, "cartpole", obs)
    assert again.head_version == 1
    np.testing.assert_array_equal(actions_of(again), v1)


def test_failed_loads_keep_the_old_version_serving(
    server: Any, admin_stub: Any, policy_stub: Any, tiny_bundle: Path
) -> None:
    obs = observations("acrobot", 8)
    before = actions_of(act(policy_stub, "acrobot", obs))
    onnx, head_json = new_head_version(tiny_bundle, "acrobot")
    meta = json.loads(head_json)

    with pytest.raises(grpc.RpcError) as corrupt:
        _load_bytes(admin_stub, "acrobot", b"not an onnx model", head_json, activate=True)
    assert corrupt.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    with pytest.raises(grpc.RpcError) as bad_json:
        _load_bytes(admin_stub, "acrobot", onnx, "{not json", activate=True)
    assert bad_json.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    other_trunk = json.dumps({**meta, "trunk_sha256": "0" * 64})
    with pytest.raises(grpc.RpcError) as incompatible:
        _load_bytes(admin_stub, "acrobot", onnx, other_trunk, activate=True)
    assert incompatible.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "trunk" in (incompatible.value.details() or "")

    wrong_features = json.dumps({**meta, "feature_size": 99})
    with pytest.raises(grpc.RpcError) as features:
        _load_bytes(admin_stub, "acrobot", onnx, wrong_features, activate=True)
    assert features.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    wrong_actions = json.dumps({**meta, "action_space": {"type": "discrete", "n": 5, "start": 0}})
    with pytest.raises(grpc.RpcError) as actions:
        _load_bytes(admin_stub, "acrobot", onnx, wrong_actions, activate=True)
    assert actions.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    # A head of another task uploaded under this task's name: the action spec does not match.
    cart_onnx, cart_json = new_head_version(tiny_bundle, "cartpole")
    with pytest.raises(grpc.RpcError) as other_task:
        _load_bytes(admin_stub, "acrobot", cart_onnx, cart_json, activate=True)
    assert other_task.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    with pytest.raises(grpc.RpcError) as missing:
        admin_stub.LoadHead(admin_pb2.LoadHeadRequest(task_id="acrobot", repository_path="heads/acrobot/9"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND

    with pytest.raises(grpc.RpcError) as outside:
        admin_stub.LoadHead(admin_pb2.LoadHeadRequest(task_id="acrobot", repository_path="../../etc"))
    assert outside.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    # Paths the OS cannot represent (found by the fuzzer: "\x00" made resolve() raise ValueError).
    for bad_path in ("\x00", "heads/acrobot/1\x00", "x" * 5000):
        with pytest.raises(grpc.RpcError) as unusable:
            admin_stub.LoadHead(admin_pb2.LoadHeadRequest(task_id="acrobot", repository_path=bad_path))
        assert unusable.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad_path[:20]
        assert "repository_path" in (unusable.value.details() or "")

    after = act(policy_stub, "acrobot", obs)
    assert after.head_version == 1
    np.testing.assert_array_equal(actions_of(after), before)
    heads = admin_stub.ListHeads(admin_pb2.ListHeadsRequest(task_id="acrobot")).heads
    assert [(h.version, h.active) for h in heads] == [(1, True)]


def test_version_conflict_and_idempotent_reload(server: Any, admin_stub: Any, tiny_bundle: Path) -> None:
    onnx, head_json = new_head_version(tiny_bundle, "cartpole")
    first = _load_bytes(admin_stub, "cartpole", onnx, head_json, activate=False, version=5)
    assert first.head.version == 5
    again = _load_bytes(admin_stub, "cartpole", onnx, head_json, activate=False, version=5)
    assert again.head.version == 5
    other, other_json = new_head_version(tiny_bundle, "cartpole", seed=9)
    with pytest.raises(grpc.RpcError) as conflict:
        _load_bytes(admin_stub, "cartpole", other, other_json, activate=False, version=5)
    assert conflict.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_load_from_the_bundle_repository_path(server: Any, admin_stub: Any) -> None:
    response = admin_stub.LoadHead(
        admin_pb2.LoadHeadRequest(task_id="cartpole", repository_path="heads/cartpole/1", activate=True)
    )
    assert response.head.version == 1
    assert response.head.source == "bundle"


def test_unload(server: Any, admin_stub: Any, policy_stub: Any, tiny_bundle: Path) -> None:
    onnx, head_json = new_head_version(tiny_bundle, "cartpole-continuous")
    _load_bytes(admin_stub, "cartpole-continuous", onnx, head_json, activate=False)
    with pytest.raises(grpc.RpcError) as active:
        admin_stub.UnloadHead(admin_pb2.UnloadHeadRequest(task_id="cartpole-continuous", version=1))
    assert active.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    removed = admin_stub.UnloadHead(admin_pb2.UnloadHeadRequest(task_id="cartpole-continuous", version=2))
    assert list(removed.unloaded_versions) == [2]
    with pytest.raises(grpc.RpcError) as gone:
        act(policy_stub, "cartpole-continuous", observations("cartpole-continuous"), version=2)
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    everything = admin_stub.UnloadHead(
        admin_pb2.UnloadHeadRequest(task_id="cartpole-continuous", all_versions=True)
    )
    assert list(everything.unloaded_versions) == [1]
    with pytest.raises(grpc.RpcError) as unknown:
        act(policy_stub, "cartpole-continuous", observations("cartpole-continuous"))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert act(policy_stub, "cartpole", observations("cartpole")).head_version == 1


def test_unknown_version_and_task_are_not_found(admin_stub: Any, policy_stub: Any) -> None:
    for call in (
        lambda: admin_stub.SetActiveVersion(
            admin_pb2.SetActiveVersionRequest(task_id="cartpole", version=99)
        ),
        lambda: admin_stub.SetActiveVersion(admin_pb2.SetActiveVersionRequest(task_id="nope", version=1)),
        lambda: admin_stub.UnloadHead(admin_pb2.UnloadHeadRequest(task_id="cartpole", version=99)),
        lambda: admin_stub.ListHeads(admin_pb2.ListHeadsRequest(task_id="nope")),
        lambda: act(policy_stub, "cartpole", observations("cartpole"), version=99),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert act(policy_stub, "cartpole", observations("cartpole")).head_version == 1


def test_admin_token_is_required_when_configured(server_settings: Callable[..., Any]) -> None:
    with (
        BackgroundServer(server_settings(admin_token="s3cret", watch_bundle=False)) as srv,
        grpc.insecure_channel(srv.admin_target) as ch,
    ):
        admin = admin_pb2_grpc.HeadAdminStub(ch)
        request = admin_pb2.ListHeadsRequest()
        with pytest.raises(grpc.RpcError) as missing:
            admin.ListHeads(request)
        assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as wrong:
            admin.ListHeads(request, metadata=[("authorization", "Bearer nope")])
        assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED
        stream = admin.StreamExperience(admin_pb2.StreamExperienceRequest())
        with pytest.raises(grpc.RpcError) as streaming:
            next(iter(stream))
        assert streaming.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = admin.ListHeads(request, metadata=[("authorization", "Bearer s3cret")])
        assert len(ok.heads) == 3


def test_shared_admin_port(server_settings: Callable[..., Any]) -> None:
    with (
        BackgroundServer(server_settings(admin_mode="shared", watch_bundle=False)) as srv,
        grpc.insecure_channel(srv.target) as ch,
    ):
        assert srv.admin_port == srv.port
        heads = admin_pb2_grpc.HeadAdminStub(ch).ListHeads(admin_pb2.ListHeadsRequest()).heads
        assert sorted(h.task_id for h in heads) == sorted(TASKS)
        assert Bundle.open(srv.settings.bundle) is not None
