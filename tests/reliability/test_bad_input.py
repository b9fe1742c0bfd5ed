"""Property-based bad input over every RPC of PolicyService, Diagnostics and HeadAdmin (hypothesis).

One real server (in-process, ports 0) takes random and malformed requests: random field values, empty and
huge shapes, NaN/inf, wrong and unknown dtypes, unknown tasks and versions, random bytes as head ONNX and
as head.json, mutated head.json documents, raw random bytes as the request message itself (sent through a
generic channel method without a serializer) and messages over the size limits. For every case:

* the server does not crash, and the call ends OK or with a client-mistake code (never INTERNAL, UNKNOWN
  or UNAVAILABLE), with a non-empty message;
* afterwards the server still serves the reference actions (deterministic Act on fixed observations of
  every task, compared with the first answers) from version 1 of every head.

Deterministic (``derandomize=True``, no example database) and bounded (``max_examples`` per test); the
number of cases run is printed in the terminal summary.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_helpers import CASES, CLIENT_MISTAKE_CODES, OUTCOMES

from polyhead.bundle import Bundle
from polyhead.server.app import BackgroundServer
from polyhead.tensors import from_proto, to_proto
from polyhead.v1 import admin_pb2, admin_pb2_grpc, policy_pb2, policy_pb2_grpc, types_pb2

TASKS = {"cartpole": 4, "acrobot": 6, "cartpole-continuous": 4}
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
MAX_HEAD_BYTES = 1024 * 1024
STREAM_TIMEOUT_S = 0.3


def fuzz_settings(examples: int) -> Any:
    return settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )


@dataclass
class Target:
    server: BackgroundServer
    channel: grpc.Channel
    admin_channel: grpc.Channel
    policy: policy_pb2_grpc.PolicyServiceStub
    diagnostics: policy_pb2_grpc.DiagnosticsStub
    admin: admin_pb2_grpc.HeadAdminStub
    reference: dict[str, np.ndarray[Any, Any]]
    head_json: str  # cartpole v1's head.json, with head_sha256 cleared (so any bytes reach the ONNX check)
    head_onnx: bytes


REFERENCE_OBS = {
    task: (np.arange(8 * size, dtype=np.float32).reshape(8, size) % 7 - 3) * 0.1
    for task, size in TASKS.items()
}


@pytest.fixture(scope="module")
def target(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    from polyhead.server.settings import ServerSettings

    settings_ = ServerSettings(
        bundle=tiny_bundle,
        host="127.0.0.1",
        port=0,
        admin_port=0,
        metrics_port=None,
        watch_bundle=False,
        grace_period_s=1.0,
        max_message_bytes=MAX_MESSAGE_BYTES,
        max_head_bytes=MAX_HEAD_BYTES,
        episode_ttl_s=5.0,
    )
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    with (
        BackgroundServer(settings_) as srv,
        grpc.insecure_channel(srv.target, options=options) as ch,
        grpc.insecure_channel(srv.admin_target, options=options) as admin_ch,
    ):
        policy = policy_pb2_grpc.PolicyServiceStub(ch)
        reference = {}
        for task, obs in REFERENCE_OBS.items():
            resp = policy.Act(
                policy_pb2.ActRequest(task_id=task, observations=to_proto(obs), deterministic=True)
            )
            assert resp.head_version == 1
            reference[task] = np.array(from_proto(resp.actions))
        head = Bundle.open(tiny_bundle).head("cartpole")
        head_json = json.dumps(head.meta.with_(version=0, head_sha256="").to_json())
        yield Target(
            server=srv,
            channel=ch,
            admin_channel=admin_ch,
            policy=policy,
            diagnostics=policy_pb2_grpc.DiagnosticsStub(ch),
            admin=admin_pb2_grpc.HeadAdminStub(admin_ch),
            reference=reference,
            head_json=head_json,
            head_onnx=head.read_onnx(),
        )


def restore_and_check(t: Target) -> None:
    """Version 1 serves every task again (fuzzed admin calls may have moved or unloaded it), and its
    actions are the reference ones."""
    for task in TASKS:
        missing: grpc.RpcError | None = None
        try:
            t.admin.SetActiveVersion(admin_pb2.SetActiveVersionRequest(task_id=task, version=1), timeout=10)
        except grpc.RpcError as exc:
            missing = exc
        if missing is not None:  # unloaded by a fuzzed call: load version 1 again
            assert missing.code() == grpc.StatusCode.NOT_FOUND, missing
            t.admin.LoadHead(
                admin_pb2.LoadHeadRequest(
                    task_id=task, repository_path=f"heads/{task}/1", version=1, activate=True
                ),
                timeout=30,
            )
            t.admin.SetActiveVersion(admin_pb2.SetActiveVersionRequest(task_id=task, version=1), timeout=10)
        resp = t.policy.Act(
            policy_pb2.ActRequest(
                task_id=task, observations=to_proto(REFERENCE_OBS[task]), deterministic=True
            ),
            timeout=10,
        )
        assert resp.head_version == 1
        np.testing.assert_array_equal(from_proto(resp.actions), t.reference[task])


def check_outcome(
    call: Callable[[], Any], what: str, *, allow: frozenset[grpc.StatusCode] = frozenset()
) -> None:
    """The call succeeds, or fails with a client-mistake code (or one in ``allow``) and a message."""
    failure: grpc.RpcError | None = None
    try:
        call()
    except grpc.RpcError as exc:
        failure = exc
    OUTCOMES["OK" if failure is None else failure.code().name] += 1
    if failure is not None:
        code = failure.code()
        assert code in CLIENT_MISTAKE_CODES | allow, f"{what}: {code} {failure.details()!r}"
        assert (failure.details() or "").strip(), f"{what}: {code} without a message"


# --- strategies -----------------------------------------------------------------------------------------
TASK_IDS = st.sampled_from([*TASKS, "", "no-such-task", "CARTPOLE", "cartpole ", "../cartpole"]) | st.text(
    max_size=40
)
DTYPES = st.sampled_from([0, 1, 2, 3, 4, 5]) | st.integers(-(2**31), 2**31 - 1)
SHAPES = st.lists(st.sampled_from([0, 1, 2, 4, 6, 256, 257]) | st.integers(-(2**63), 2**63 - 1), max_size=4)
FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=32)


@st.composite
def tensors(draw: st.DrawFn) -> types_pb2.Tensor:
    """Anything a Tensor message can carry: valid observations of any task, and every malformation."""
    kind = draw(st.sampled_from(["valid", "valid-bad-values", "raw", "float", "int", "empty", "absurd"]))
    if kind in ("valid", "valid-bad-values"):
        size = draw(st.sampled_from([4, 6, 5, 1]))
        rows = draw(st.sampled_from([None, 0, 1, 3, 256, 257]))
        shape = (size,) if rows is None else (rows, size)
        values = draw(
            st.lists(
                FLOATS if kind == "valid-bad-values" else st.floats(-5, 5, width=32), min_size=1, max_size=8
            )
        )
        array = np.resize(np.array(values, dtype=np.float32), shape)
        dtype = draw(st.sampled_from([np.float32, np.float64, np.int64, np.int32, np.uint8]))
        with np.errstate(invalid="ignore", over="ignore"):
            return to_proto(
                np.nan_to_num(array).astype(dtype)
                if dtype not in (np.float32, np.float64)
                else array.astype(dtype)
            )
    if kind == "raw":
        return types_pb2.Tensor(
            dtype=draw(DTYPES), shape=draw(SHAPES), raw_data=draw(st.binary(max_size=128))
        )  # type: ignore[arg-type]
    if kind == "float":
        return types_pb2.Tensor(
            dtype=draw(DTYPES), shape=draw(SHAPES), float_data=draw(st.lists(FLOATS, max_size=32))
        )  # type: ignore[arg-type]
    if kind == "int":
        ints = st.lists(st.integers(-(2**63), 2**63 - 1), max_size=32)
        return types_pb2.Tensor(dtype=draw(DTYPES), shape=draw(SHAPES), int_data=draw(ints))  # type: ignore[arg-type]
    if kind == "empty":
        return types_pb2.Tensor()
    return types_pb2.Tensor(shape=[1 << 20, 1 << 20], float_data=[1.0])


VERSIONS = st.sampled_from([0, 1, 2, 99, -1]) | st.integers(-(2**63), 2**63 - 1)
SEEDS = st.none() | st.integers(0, 2**64 - 1)
EPISODE_IDS = st.lists(st.text(max_size=20), max_size=4)


@st.composite
def act_requests(draw: st.DrawFn) -> policy_pb2.ActRequest:
    req = policy_pb2.ActRequest(
        task_id=draw(TASK_IDS),
        observations=draw(tensors()),
        deterministic=draw(st.booleans()),
        return_log_prob=draw(st.booleans()),
        return_value=draw(st.booleans()),
        version=draw(VERSIONS),
        episode_ids=draw(EPISODE_IDS),
    )
    seed = draw(SEEDS)
    if seed is not None:
        req.seed = seed
    return req


@st.composite
def step_requests(draw: st.DrawFn) -> policy_pb2.StepRequest:
    req = policy_pb2.StepRequest(
        task_id=draw(TASK_IDS),
        episode_id=draw(st.sampled_from(["ep-1", "ep-2", ""]) | st.text(max_size=10)),
        deterministic=draw(st.booleans()),
        return_log_prob=draw(st.booleans()),
        return_value=draw(st.booleans()),
    )
    if draw(st.booleans()):
        req.observation.CopyFrom(draw(tensors()))
    if draw(st.booleans()):
        req.feedback.CopyFrom(
            policy_pb2.Feedback(
                reward=draw(FLOATS), terminated=draw(st.booleans()), truncated=draw(st.booleans())
            )
        )
    seed = draw(SEEDS)
    if seed is not None:
        req.seed = seed
    return req


@st.composite
def experience_reports(draw: st.DrawFn) -> policy_pb2.ExperienceReport:
    report = policy_pb2.ExperienceReport(
        task_id=draw(TASK_IDS),
        episode_id=draw(st.sampled_from(["ep-1", ""]) | st.text(max_size=10)),
        reward=draw(FLOATS),
        terminated=draw(st.booleans()),
        truncated=draw(st.booleans()),
        log_prob=draw(FLOATS),
        head_version=draw(VERSIONS),
    )
    if draw(st.booleans()):
        report.observation.CopyFrom(draw(tensors()))
    if draw(st.booleans()):
        report.action.CopyFrom(draw(tensors()))
    return report


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def head_jsons(draw: st.DrawFn, valid: str) -> str:
    """Random text, random JSON, and the valid head.json with one field dropped, replaced or added
    (including a future format version)."""
    kind = draw(st.sampled_from(["text", "json", "drop", "replace", "future", "valid"]))
    if kind == "text":
        return draw(st.text(max_size=200))
    if kind == "json":
        return json.dumps(draw(JSON_VALUES))
    doc = json.loads(valid)
    if kind == "valid":
        return valid
    if kind == "future":
        key = next((k for k in doc if "format" in k or k == "version"), "format_version")
        doc[key] = draw(st.sampled_from([2, 99, -1, "2", None]))
        return json.dumps(doc)
    key = draw(st.sampled_from(sorted(doc)))
    if kind == "drop":
        del doc[key]
    else:
        doc[key] = draw(JSON_VALUES)
    return json.dumps(doc)


@st.composite
def onnx_payloads(draw: st.DrawFn, valid: bytes) -> bytes:
    kind = draw(st.sampled_from(["random", "truncated", "flipped", "valid", "empty"]))
    if kind == "random":
        return draw(st.binary(min_size=1, max_size=512))
    if kind == "truncated":
        return valid[: draw(st.integers(1, len(valid) - 1))]
    if kind == "flipped":
        at = draw(st.integers(0, len(valid) - 1))
        return valid[:at] + bytes([valid[at] ^ 0xFF]) + valid[at + 1 :]
    if kind == "empty":
        return b""
    return valid


REPOSITORY_PATHS = st.sampled_from(
    [
        "heads/cartpole/1",
        "heads/cartpole/2",
        "heads/acrobot/1",
        "heads/cartpole",
        "../../etc/passwd",
        "/etc/passwd",
        "",
        "heads/cartpole/1/../../acrobot/1",
        "trunk.onnx",
        "heads/cartpole/x",
    ]
) | st.text(max_size=30)


# --- PolicyService and Diagnostics ----------------------------------------------------------------------
@fuzz_settings(400)
@given(request=act_requests())
def test_act_never_fails_like_a_server_bug(target: Target, request: policy_pb2.ActRequest) -> None:
    CASES["Act"] += 1
    check_outcome(lambda: target.policy.Act(request, timeout=10), f"Act {request.task_id!r}")
    restore_and_check(target)


@fuzz_settings(150)
@given(steps=st.lists(step_requests(), min_size=1, max_size=5))
def test_act_stream_never_fails_like_a_server_bug(
    target: Target, steps: list[policy_pb2.StepRequest]
) -> None:
    CASES["ActStream"] += 1
    check_outcome(lambda: list(target.policy.ActStream(iter(steps), timeout=10)), "ActStream")
    restore_and_check(target)


@fuzz_settings(150)
@given(reports=st.lists(experience_reports(), max_size=5))
def test_report_experience_never_fails_like_a_server_bug(
    target: Target, reports: list[policy_pb2.ExperienceReport]
) -> None:
    CASES["ReportExperience"] += 1
    check_outcome(lambda: target.policy.ReportExperience(iter(reports), timeout=10), "ReportExperience")
    restore_and_check(target)


@fuzz_settings(50)
@given(payload=st.binary(max_size=4096))
def test_echo_and_list_tasks(target: Target, payload: bytes) -> None:
    CASES["Echo+ListTasks"] += 1
    assert target.diagnostics.Echo(policy_pb2.EchoRequest(payload=payload), timeout=10).payload == payload
    assert {
        t.task_id for t in target.policy.ListTasks(policy_pb2.ListTasksRequest(), timeout=10).tasks
    } == set(TASKS)


# --- HeadAdmin ------------------------------------------------------------------------------------------
@st.composite
def load_requests(draw: st.DrawFn, head_json: str, onnx: bytes) -> admin_pb2.LoadHeadRequest:
    req = admin_pb2.LoadHeadRequest(
        task_id=draw(TASK_IDS), version=draw(VERSIONS), activate=draw(st.booleans())
    )
    if draw(st.integers(0, 3)) == 0:
        req.repository_path = draw(REPOSITORY_PATHS)
    else:
        req.onnx = draw(onnx_payloads(onnx))
        req.head_json = draw(head_jsons(head_json))
    return req


def test_load_head_with_random_bytes_and_json(target: Target) -> None:
    """A hypothesis run built inside the test: the strategies need the served head's bytes and head.json."""

    @fuzz_settings(300)
    @given(request=load_requests(target.head_json, target.head_onnx))
    def run(request: admin_pb2.LoadHeadRequest) -> None:
        CASES["LoadHead"] += 1
        before = target.admin.ListHeads(admin_pb2.ListHeadsRequest(), timeout=10)
        failure: grpc.RpcError | None = None
        try:
            target.admin.LoadHead(request, timeout=30)
        except grpc.RpcError as exc:
            failure = exc
        OUTCOMES["OK" if failure is None else failure.code().name] += 1
        if failure is not None:
            assert failure.code() in CLIENT_MISTAKE_CODES, f"LoadHead: {failure.code()} {failure.details()!r}"
            assert (failure.details() or "").strip()
            # A failed load changes nothing.
            after = target.admin.ListHeads(admin_pb2.ListHeadsRequest(), timeout=10)
            assert [(h.task_id, h.version, h.active) for h in after.heads] == [
                (h.task_id, h.version, h.active) for h in before.heads
            ]
        restore_and_check(target)

    run()


@fuzz_settings(200)
@given(
    call=st.sampled_from(["SetActiveVersion", "UnloadHead", "ListHeads"]),
    task=TASK_IDS,
    version=VERSIONS,
    all_versions=st.booleans(),
)
def test_version_admin_calls(target: Target, call: str, task: str, version: int, all_versions: bool) -> None:
    CASES[call] += 1
    if call == "SetActiveVersion":
        request: Any = admin_pb2.SetActiveVersionRequest(task_id=task, version=version)
    elif call == "UnloadHead":
        request = admin_pb2.UnloadHeadRequest(task_id=task, version=version, all_versions=all_versions)
    else:
        request = admin_pb2.ListHeadsRequest(task_id=task)
    check_outcome(lambda: getattr(target.admin, call)(request, timeout=10), f"{call} {task!r} {version}")
    restore_and_check(target)


@fuzz_settings(15)
@given(task_ids=st.lists(TASK_IDS, max_size=3))
def test_stream_experience(target: Target, task_ids: list[str]) -> None:
    """A subscription either starts (and runs until the client's deadline) or is refused as a mistake."""
    CASES["StreamExperience"] += 1
    request = admin_pb2.StreamExperienceRequest(task_ids=task_ids)
    check_outcome(
        lambda: list(target.admin.StreamExperience(request, timeout=STREAM_TIMEOUT_S)),
        f"StreamExperience {task_ids!r}",
        allow=frozenset({grpc.StatusCode.DEADLINE_EXCEEDED}),
    )
    restore_and_check(target)


# --- raw bytes as the request message ---------------------------------------------------------------------
METHODS = {
    "/polyhead.v1.PolicyService/Act": ("unary_unary", False),
    "/polyhead.v1.PolicyService/ListTasks": ("unary_unary", False),
    "/polyhead.v1.PolicyService/ActStream": ("stream_stream", False),
    "/polyhead.v1.PolicyService/ReportExperience": ("stream_unary", False),
    "/polyhead.v1.Diagnostics/Echo": ("unary_unary", False),
    "/polyhead.v1.HeadAdmin/LoadHead": ("unary_unary", True),
    "/polyhead.v1.HeadAdmin/LoadHeads": ("stream_stream", True),
    "/polyhead.v1.HeadAdmin/SetCanary": ("unary_unary", True),
    "/polyhead.v1.HeadAdmin/PromoteCanary": ("unary_unary", True),
    "/polyhead.v1.HeadAdmin/ClearCanary": ("unary_unary", True),
    "/polyhead.v1.HeadAdmin/SetActiveVersion": ("unary_unary", True),
    "/polyhead.v1.HeadAdmin/UnloadHead": ("unary_unary", True),
    "/polyhead.v1.HeadAdmin/ListHeads": ("unary_unary", True),
    "/polyhead.v1.HeadAdmin/StreamExperience": ("unary_stream", True),
}


def test_the_raw_bytes_fuzz_covers_every_method() -> None:
    every = {
        f"/{service.full_name}/{m.name}"
        for module in (policy_pb2, admin_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for m in service.methods
    }
    assert set(METHODS) == every


def raw_call(t: Target, method: str, payloads: list[bytes]) -> None:
    kind, admin = METHODS[method]
    channel = t.admin_channel if admin else t.channel
    # No serializers: the bytes go on the wire as they are, and the response bytes come back undecoded.
    multicallable = getattr(channel, kind)(method, request_serializer=None, response_deserializer=None)
    timeout = STREAM_TIMEOUT_S if method.endswith("StreamExperience") else 10
    if kind == "unary_unary":
        multicallable(payloads[0], timeout=timeout)
    elif kind == "stream_unary":
        multicallable(iter(payloads), timeout=timeout)
    elif kind == "stream_stream":
        list(multicallable(iter(payloads), timeout=timeout))
    else:
        list(multicallable(payloads[0], timeout=timeout))


@fuzz_settings(300)
@given(
    method=st.sampled_from(sorted(METHODS)),
    payloads=st.lists(st.binary(max_size=256), min_size=1, max_size=3),
)
def test_raw_random_bytes_as_the_request(target: Target, method: str, payloads: list[bytes]) -> None:
    CASES["raw bytes"] += 1
    allow = (
        frozenset({grpc.StatusCode.DEADLINE_EXCEEDED}) if method.endswith("StreamExperience") else frozenset()
    )
    check_outcome(lambda: raw_call(target, method, payloads), f"raw bytes to {method}", allow=allow)
    restore_and_check(target)


# --- oversize messages ------------------------------------------------------------------------------------
def test_oversize_messages_are_refused_with_the_limit(target: Target) -> None:
    big = MAX_MESSAGE_BYTES + 1024
    with pytest.raises(grpc.RpcError) as err:
        target.diagnostics.Echo(policy_pb2.EchoRequest(payload=b"\x00" * big), timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(MAX_MESSAGE_BYTES) in (err.value.details() or ""), err.value.details()
    obs = np.zeros((big // 16 + 1, 4), np.float32)
    with pytest.raises(grpc.RpcError) as err:
        target.policy.Act(policy_pb2.ActRequest(task_id="cartpole", observations=to_proto(obs)), timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    CASES["oversize"] += 2
    restore_and_check(target)


def test_head_upload_over_max_head_bytes_is_refused_precisely(target: Target) -> None:
    """Under the message limit but over max_head_bytes: INVALID_ARGUMENT naming size, limit and setting."""
    onnx = target.head_onnx + b"\x00" * (MAX_HEAD_BYTES + 1 - len(target.head_onnx))
    before = target.admin.ListHeads(admin_pb2.ListHeadsRequest(), timeout=10)
    with pytest.raises(grpc.RpcError) as err:
        target.admin.LoadHead(
            admin_pb2.LoadHeadRequest(task_id="cartpole", onnx=onnx, head_json=target.head_json), timeout=30
        )
    details = err.value.details() or ""
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, details
    assert "max_head_bytes" in details and str(MAX_HEAD_BYTES) in details, details
    assert str(len(onnx) + len(target.head_json.encode())) in details, details
    assert target.admin.ListHeads(admin_pb2.ListHeadsRequest(), timeout=10) == before
    # The same head in a LoadHeads stream: refused the same way, named by its place in the stream.
    ok = admin_pb2.LoadHeadRequest(
        task_id="cartpole", onnx=target.head_onnx, head_json=target.head_json, version=1
    )
    big = admin_pb2.LoadHeadRequest(task_id="cartpole", onnx=onnx, head_json=target.head_json)
    with pytest.raises(grpc.RpcError) as err:
        list(target.admin.LoadHeads(iter([ok, big]), timeout=30))
    details = err.value.details() or ""
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, details
    assert "LoadHeads request 1 (task 'cartpole'" in details and str(MAX_HEAD_BYTES) in details, details
    assert target.admin.ListHeads(admin_pb2.ListHeadsRequest(), timeout=10) == before
    CASES["oversize"] += 1
    restore_and_check(target)


def test_observation_values_at_the_float_limits(target: Target) -> None:
    """Finite extremes are served (no NaN in the actions); NaN and inf are refused, naming the problem."""
    for value in (np.finfo(np.float32).max, np.finfo(np.float32).min, np.finfo(np.float32).tiny, 0.0):
        obs = np.full(4, value, np.float32)
        resp = target.policy.Act(
            policy_pb2.ActRequest(
                task_id="cartpole-continuous", observations=to_proto(obs), return_value=True
            ),
            timeout=10,
        )
        assert all(math.isfinite(float(a)) for a in np.ravel(from_proto(resp.actions)))
    for value in (np.nan, np.inf, -np.inf):
        obs = np.array([0.0, value, 0.0, 0.0], np.float32)
        with pytest.raises(grpc.RpcError) as err:
            target.policy.Act(
                policy_pb2.ActRequest(task_id="cartpole", observations=to_proto(obs)), timeout=10
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    CASES["float limits"] += 7
    restore_and_check(target)
