"""Many heads on a real server: hundreds of heads uploaded by LoadHead run as stacked weights, and every
result equals the same head's on a server that gives each head its own onnxruntime session
(``stacked_heads=False``); mixed-task batches, unload/reload and swaps while loading."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from server_helpers import act, observations

from polyhead.bundle import Bundle
from polyhead.clients.admin import AdminClient, load_request
from polyhead.clients.errors import InvalidRequest, PreconditionFailed
from polyhead.server.actions import Sampling
from polyhead.server.app import BackgroundServer
from polyhead.server.batcher import Batcher
from polyhead.server.mlp_heads import StackedHead
from polyhead.server.registry import gc_paused
from polyhead.server.runtime import HeadRuntime
from polyhead.tensors import from_proto
from polyhead.v1 import admin_pb2, admin_pb2_grpc, policy_pb2_grpc

BASES = ("cartpole", "acrobot", "cartpole-continuous")
N_HEADS = 300


def perturbed(bundle: Path, base: str, seed: int) -> tuple[bytes, dict[str, Any]]:
    """``base``'s head with every weight changed (a different head of the same shapes) and its meta."""
    record = Bundle.open(bundle).head(base)
    model = onnx.load_from_string(record.read_onnx())
    rng = np.random.default_rng(seed)
    for tensor in model.graph.initializer:
        array = numpy_helper.to_array(tensor)
        if array.dtype == np.float32 and array.size > 1:
            tensor.CopyFrom(
                numpy_helper.from_array(
                    array + rng.standard_normal(array.shape).astype(np.float32), tensor.name
                )
            )
    return model.SerializeToString(), record.meta.to_json()


def request(task: str, onnx_bytes: bytes, meta: dict[str, Any], **fields: Any) -> admin_pb2.LoadHeadRequest:
    """A LoadHead request for ``onnx_bytes`` as task ``task`` (``meta``: the head.json it was made from)."""
    head_json = json.dumps({**meta, "task": {**meta["task"], "id": task}, "version": 0, "head_sha256": ""})
    return load_request(task, onnx=onnx_bytes, head_json=head_json, **{"activate": True, **fields})


def upload(admin: admin_pb2_grpc.HeadAdminStub, task: str, onnx_bytes: bytes, meta: dict[str, Any]) -> int:
    response = admin.LoadHead(request(task, onnx_bytes, meta), timeout=30)
    return int(response.head.version)


@pytest.fixture
def pair(server_settings: Callable[..., Any]) -> Iterator[tuple[BackgroundServer, BackgroundServer]]:
    """The same bundle served stacked and with a session per head."""
    with (
        BackgroundServer(server_settings(watch_bundle=False)) as stacked,
        BackgroundServer(server_settings(watch_bundle=False, stacked_heads=False)) as sessions,
    ):
        yield stacked, sessions


def _heads(tiny_bundle: Path, n: int, seed: int = 0) -> dict[str, tuple[str, bytes, dict[str, Any]]]:
    out = {}
    for i in range(n):
        base = BASES[i % len(BASES)]
        onnx_bytes, meta = perturbed(tiny_bundle, base, seed * 100_000 + i)
        out[f"many-{i:04d}"] = (base, onnx_bytes, meta)
    return out


def _results(stub: policy_pb2_grpc.PolicyServiceStub, task: str, base: str, seed: int) -> tuple[Any, ...]:
    response = act(stub, task, observations(base, 3, seed=seed), return_log_prob=True, return_value=True)
    return (
        from_proto(response.actions),
        from_proto(response.log_probs),
        from_proto(response.values),
        response.head_version,
    )


def _assert_same(a: tuple[Any, ...], b: tuple[Any, ...]) -> None:
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a[1], b[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a[2], b[2], rtol=1e-5, atol=1e-5)
    assert a[3] == b[3]


def test_hundreds_of_uploaded_heads_serve_the_same_results_as_a_session_per_head(
    pair: tuple[BackgroundServer, BackgroundServer], tiny_bundle: Path
) -> None:
    stacked, sessions = pair
    heads = _heads(tiny_bundle, N_HEADS)
    with (
        grpc.insecure_channel(stacked.target) as s_ch,
        grpc.insecure_channel(stacked.admin_target) as s_admin_ch,
        grpc.insecure_channel(sessions.target) as r_ch,
        grpc.insecure_channel(sessions.admin_target) as r_admin_ch,
    ):
        s_admin, r_admin = admin_pb2_grpc.HeadAdminStub(s_admin_ch), admin_pb2_grpc.HeadAdminStub(r_admin_ch)
        # One LoadHeads stream to the stacked server, a LoadHead call per head to the other: same heads.
        with AdminClient(stacked.admin_target) as client:
            streamed = list(client.load_heads(request(t, b, m) for t, (_, b, m) in heads.items()))
        assert [(r.head.task_id, r.head.version, r.active_version) for r in streamed] == [
            (t, 1, 1) for t in heads
        ]
        for task, (_, onnx_bytes, meta) in heads.items():
            assert upload(r_admin, task, onnx_bytes, meta) == 1
        s_reg, r_reg = stacked.running.registry, sessions.running.registry
        assert all(isinstance(s_reg.resolve(t).runtime, StackedHead) for t in heads)
        assert all(isinstance(r_reg.resolve(t).runtime, HeadRuntime) for t in heads)
        assert s_reg.banks is not None
        assert sum(b.live for b in s_reg.banks.banks) == 2 * (N_HEADS + len(BASES))  # policy + value slots

        s_stub, r_stub = policy_pb2_grpc.PolicyServiceStub(s_ch), policy_pb2_grpc.PolicyServiceStub(r_ch)
        expected = {t: _results(r_stub, t, base, seed=i) for i, (t, (base, _, _)) in enumerate(heads.items())}
        before = stacked.running.batcher.stats
        # 16 concurrent clients over all tasks: the server batches calls of different tasks together.
        with ThreadPoolExecutor(16) as pool:
            got = dict(
                zip(
                    heads,
                    pool.map(
                        lambda item: _results(s_stub, item[1][0], item[1][1][0], seed=item[0]),
                        enumerate(heads.items()),
                    ),
                    strict=True,
                )
            )
        for task in heads:
            _assert_same(got[task], expected[task])
        after = stacked.running.batcher.stats
        assert after.requests - before.requests == N_HEADS
        # Different heads give different actions: the comparison above could tell heads apart.
        logits_like = {tuple(np.round(got[t][1], 4)) for t in heads}
        assert len(logits_like) > N_HEADS // 2

        # Unload and reload: the task disappears, then serves its new bytes.
        victims = list(heads)[:10]
        for task in victims:
            for admin in (s_admin, r_admin):
                admin.UnloadHead(admin_pb2.UnloadHeadRequest(task_id=task, all_versions=True), timeout=30)
        with pytest.raises(grpc.RpcError) as err:
            act(s_stub, victims[0], observations(heads[victims[0]][0], 1))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        for k, task in enumerate(victims):
            base = heads[task][0]
            onnx_bytes, meta = perturbed(tiny_bundle, base, 777 + k)
            assert upload(s_admin, task, onnx_bytes, meta) == upload(r_admin, task, onnx_bytes, meta)
            _assert_same(_results(s_stub, task, base, seed=k), _results(r_stub, task, base, seed=k))


def test_a_batch_spread_over_many_tasks_runs_as_one_pass_and_matches_each_head_alone(
    server: BackgroundServer, tiny_bundle: Path
) -> None:
    """64 requests of 64 tasks queued together form one trunk pass and one grouped head pass per bank; each
    request's actions equal those of its head run alone (a batch of one)."""
    heads = _heads(tiny_bundle, 64, seed=1)
    with grpc.insecure_channel(server.admin_target) as ch:
        admin = admin_pb2_grpc.HeadAdminStub(ch)
        for task, (_, onnx_bytes, meta) in heads.items():
            upload(admin, task, onnx_bytes, meta)
    running = server.running
    resolved = [running.registry.resolve(t) for t in heads]
    obs = [observations(base, 2, seed=i) for i, (base, _, _) in enumerate(heads.values())]

    async def run(batcher: Batcher, items: list[int]) -> list[Any]:
        return await asyncio.gather(
            *(batcher.act(resolved[i], obs[i], Sampling(2, True, None, value=i % 2 == 0)) for i in items)
        )

    async def together() -> tuple[list[Any], list[Any], Any, Any]:
        # A batcher that sees 64 calls in progress gathers them into one batch (as under load).
        batcher = Batcher(
            running.batcher.trunk,
            metrics=running.metrics,
            max_batch_size=256,
            max_queue_delay_s=1.0,
            max_queue_size=1000,
            pending=lambda: 64,
        )
        alone = Batcher(
            running.batcher.trunk,
            metrics=running.metrics,
            max_batch_size=256,
            max_queue_delay_s=0.0,
            max_queue_size=10,
        )
        try:
            batched = await run(batcher, list(range(64)))
            single = [(await run(alone, [i]))[0] for i in range(64)]
            return batched, single, batcher.stats, alone.stats
        finally:
            batcher.shutdown()
            alone.shutdown()

    batched, single, stats, alone_stats = asyncio.run_coroutine_threadsafe(together(), server.loop).result(60)
    assert stats.passes == 1 and stats.requests == 64
    assert alone_stats.passes == 64
    for i, (a, b) in enumerate(zip(batched, single, strict=True)):
        np.testing.assert_allclose(a.env, b.env, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(a.log_prob, b.log_prob, rtol=1e-5, atol=1e-5)
        if i % 2 == 0:
            np.testing.assert_allclose(a.value, b.value, rtol=1e-5, atol=1e-5)
        else:
            assert np.isnan(a.value).all()  # not asked for: the value MLP did not run


def test_acts_during_loads_and_swaps_keep_their_heads(server: BackgroundServer, tiny_bundle: Path) -> None:
    """While new heads load (bank growth, reused slots) and a task swaps versions back and forth, every
    response equals the reference of the version it names."""
    task, base = "swapping", "cartpole"
    versions = {}
    with (
        grpc.insecure_channel(server.admin_target) as admin_ch,
        grpc.insecure_channel(server.target) as ch,
    ):
        admin, stub = admin_pb2_grpc.HeadAdminStub(admin_ch), policy_pb2_grpc.PolicyServiceStub(ch)
        for seed in (11, 12):
            onnx_bytes, meta = perturbed(tiny_bundle, base, seed)
            version = upload(admin, task, onnx_bytes, meta)
            versions[version] = _results(stub, task, base, seed=0)
        stop = threading.Event()
        errors: list[BaseException] = []

        def churn() -> None:
            try:
                for i in range(120):
                    onnx_bytes, meta = perturbed(tiny_bundle, BASES[i % 40 % 3], 5000 + i)
                    upload(admin, f"churn-{i % 40}", onnx_bytes, meta)  # a 4th version unloads the oldest
                    if i % 10 == 9:
                        admin.UnloadHead(
                            admin_pb2.UnloadHeadRequest(task_id=f"churn-{i % 40}", all_versions=True)
                        )
                    admin.SetActiveVersion(admin_pb2.SetActiveVersionRequest(task_id=task, version=1 + i % 2))
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)
            finally:
                stop.set()

        loader = threading.Thread(target=churn)
        loader.start()
        checked = 0
        while not stop.is_set() or checked < 20:
            got = _results(stub, task, base, seed=0)
            _assert_same(got, versions[got[3]])
            checked += 1
        loader.join()
        assert not errors, errors


def test_a_refused_request_ends_a_load_stream_naming_it_and_keeps_what_was_loaded(
    server: BackgroundServer, tiny_bundle: Path
) -> None:
    heads = _heads(tiny_bundle, 6, seed=2)
    items = [request(t, b, m) for t, (_, b, m) in heads.items()]
    items[3] = request("many-0003", b"not an onnx graph", heads["many-0003"][2])
    # canary_percent with activate is refused before anything loads (it used to load and activate first).
    canary = request("many-0005", heads["many-0005"][1], heads["many-0005"][2], canary_percent=10.0)
    with AdminClient(server.admin_target) as client:
        answered = []
        with pytest.raises(InvalidRequest) as err:
            answered.extend(client.load_heads(iter(items)))
        with pytest.raises(InvalidRequest) as refused:
            client.load_head("many-0005", onnx=canary.onnx, head_json=canary.head_json, canary_percent=10.0)
        assert "canary_percent only with activate=false" in str(refused.value)
        tasks = {h.task_id for h in client.list_heads()}
    assert [r.head.task_id for r in answered] == ["many-0000", "many-0001", "many-0002"]
    assert "LoadHeads request 3 (task 'many-0003'" in str(err.value), str(err.value)
    assert {"many-0000", "many-0001", "many-0002"} <= tasks
    assert not tasks & {"many-0003", "many-0004", "many-0005"}
    # The server goes on serving, the streamed heads included.
    with grpc.insecure_channel(server.target) as ch:
        stub = policy_pb2_grpc.PolicyServiceStub(ch)
        assert act(stub, "many-0001", observations(heads["many-0001"][0], 2)).head_version == 1


def test_loads_pause_the_cyclic_gc_and_the_last_one_out_turns_it_back_on() -> None:
    import gc

    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
        inner_done = threading.Event()

        def other_load() -> None:  # a concurrent LoadHeads batch ends first
            with gc_paused():
                assert not gc.isenabled()
            inner_done.set()

        worker = threading.Thread(target=other_load)
        worker.start()
        worker.join(10)
        assert inner_done.is_set() and not gc.isenabled()  # still inside the first block
    assert gc.isenabled()
    gc.disable()  # turned off by someone else: a load block leaves it off
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
    with pytest.raises(RuntimeError), gc_paused():  # an exception inside still turns it back on
        raise RuntimeError("load failed")
    assert gc.isenabled()


def test_an_undecodable_message_mid_stream_is_named_and_the_ones_before_it_stay_loaded(
    server: BackgroundServer, tiny_bundle: Path
) -> None:
    heads = _heads(tiny_bundle, 2, seed=3)
    raw = [request(t, b, m).SerializeToString() for t, (_, b, m) in heads.items()] + [b"\xff\xff\xff"]
    with grpc.insecure_channel(server.admin_target) as ch:
        call = ch.stream_stream("/polyhead.v1.HeadAdmin/LoadHeads")(iter(raw), timeout=60)
        answered = []
        with pytest.raises(grpc.RpcError) as err:
            answered.extend(call)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "LoadHeads request 2 (earlier ones loaded)" in (err.value.details() or ""), err.value.details()
    assert len(answered) == 2
    assert set(heads) <= set(server.running.registry.tasks)


def test_canary_loads_that_cannot_be_canaries_are_refused_before_anything_loads(
    server: BackgroundServer, tiny_bundle: Path
) -> None:
    _, onnx_bytes, meta = _heads(tiny_bundle, 1, seed=4)["many-0000"]
    registry = server.running.registry
    with AdminClient(server.admin_target) as client:
        before = dict(registry.tasks["cartpole"].versions)
        with pytest.raises(InvalidRequest) as share:
            client.load_head(
                "cartpole",
                onnx=onnx_bytes,
                head_json=request("cartpole", onnx_bytes, meta).head_json,
                activate=False,
                canary_percent=150.0,
            )
        assert "within 0..100, got 150" in str(share.value)
        assert dict(registry.tasks["cartpole"].versions) == before  # nothing loaded
        with pytest.raises(PreconditionFailed) as new_task:
            client.load_head(
                "brand-new",
                onnx=onnx_bytes,
                head_json=request("brand-new", onnx_bytes, meta).head_json,
                activate=False,
                canary_percent=10.0,
            )
        assert "not served yet" in str(new_task.value)
        assert "brand-new" not in registry.tasks


def test_an_error_making_the_requests_is_raised_as_itself_after_the_answers_before_it(
    server: BackgroundServer, tiny_bundle: Path
) -> None:
    heads = _heads(tiny_bundle, 3, seed=5)

    def requests() -> Iterator[admin_pb2.LoadHeadRequest]:
        for k, (task, (_, onnx_bytes, meta)) in enumerate(heads.items()):
            if k == 2:
                raise FileNotFoundError("heads/missing/head.onnx")
            yield request(task, onnx_bytes, meta)

    answered = []
    with AdminClient(server.admin_target) as client, pytest.raises(FileNotFoundError, match="missing"):
        answered.extend(client.load_heads(requests()))
    assert [r.head.task_id for r in answered] == ["many-0000", "many-0001"]
    assert {"many-0000", "many-0001"} <= set(server.running.registry.tasks)
    assert "many-0002" not in server.running.registry.tasks
