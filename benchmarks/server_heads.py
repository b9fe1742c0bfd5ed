"""Many heads: memory per loaded head, load time, single-client Act p50 with N extra heads vs the bundle's
own, and the server CPU of a batch spread over 64 tasks vs the same batch on one task; stacked heads
(the default) and ``--no-stacked-heads`` (a session per head) side by side in one run.

    nice -n 5 .venv/bin/python benchmarks/server_heads.py [--heads 10000] [--modes stacked,sessions]
        [--calls 2000] [--rounds 3] [--bundle-heads 10000] [--startup-rounds 3] [--kernels]
        [--compare-block 250] [--compare-rounds 4]

Per mode: a server on the benchmark bundle (`--no-watch`); p50 of one client calling Act on `cartpole`
(one observation, a spawned process); N heads uploaded over one LoadHeads stream (`extra-00000` ...:
cartpole's head with its weights perturbed per head, so each head is its own); RSS growth / N (and the
head's own weight bytes, for "beyond its weights"); the p50 again; then 64 concurrent Act calls per round
(64 tasks, or 64 times `cartpole`), rounds alternating, server CPU seconds per round; then blocks of
`--compare-block` more heads uploaded by LoadHeads and by a LoadHead call per head, alternating, ms per
head each. `--bundle-heads M`: time to a ready server on a bundle that holds M extra heads on disk, each
with its own bytes (startup loading), against the plain bundle, the two alternating `--startup-rounds`
times (medians). `--pass-cpu R`: in process, the CPU of one forced 64-row pass spread over 64 of the
N uploaded tasks vs 64 rows of one task, R passes each, alternating, without and with values.
`--kernels`: the grouped-matmul kernel choice (one batched matmul over gathered weights vs a matmul per
contiguous run of rows). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing as mp
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_common import build_bundle, machine_note, obs_for, sequential_latency_proc, serve

from polyhead.bundle import Bundle, sha256_bytes
from polyhead.clients.admin import AdminClient, load_request

MODES = {"stacked": (), "sessions": ("--no-stacked-heads",)}


def _p50(target: str, calls: int, rounds: int) -> float:
    return statistics.median(
        float(np.percentile(sequential_latency_proc(target, "act", calls), 50) * 1e6) for _ in range(rounds)
    )


def _heads(bundle_dir: Path, n: int) -> tuple[list[bytes], dict[str, Any], int]:
    """n perturbed copies of cartpole's head.onnx, its head.json, and the bytes of one head's weights."""
    import onnx
    from onnx import numpy_helper

    record = Bundle.open(bundle_dir).head("cartpole")
    model = onnx.load_from_string(record.read_onnx())
    rng = np.random.default_rng(0)
    weights = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    out = []
    for _ in range(n):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        for t in copy.graph.initializer:
            a = numpy_helper.to_array(t)
            if a.dtype == np.float32 and a.size > 1:
                t.CopyFrom(
                    numpy_helper.from_array(
                        a + rng.standard_normal(a.shape).astype(np.float32) * 0.01, t.name
                    )
                )
        out.append(copy.SerializeToString())
    return out, record.meta.to_json(), weights


def _burst_client(target: str, tasks: list[list[str]], rounds: int, queue: Any, ack: Any) -> None:
    """``rounds`` rounds per task list, alternating; each round 64 concurrent Act calls (one per entry)."""
    import grpc

    from polyhead.tensors import to_proto
    from polyhead.v1 import policy_pb2, policy_pb2_grpc

    async def main() -> list[list[float]]:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = policy_pb2_grpc.PolicyServiceStub(channel)
            rng = np.random.default_rng(0)
            requests = [
                [
                    policy_pb2.ActRequest(task_id=t, observations=to_proto(obs_for("cartpole", None, rng)))
                    for t in ts
                ]
                for ts in tasks
            ]
            for reqs in requests:  # warm-up (connections, per-task metric series)
                await asyncio.gather(*(stub.Act(r) for r in reqs))
            times: list[list[float]] = [[] for _ in tasks]
            for _ in range(rounds):
                for k, reqs in enumerate(requests):
                    queue.put(("start", k))
                    ack.get()  # the driver has read the server's CPU counter
                    t0 = time.perf_counter()
                    await asyncio.gather(*(stub.Act(r) for r in reqs))
                    times[k].append(time.perf_counter() - t0)
                    queue.put(("end", k))
                    ack.get()
            return times

    queue.put(("done", asyncio.run(main())))


def _burst_cpu(server: Any, tasks: list[list[str]], rounds: int) -> list[float]:
    """Server CPU seconds per round for each task list (mean over rounds: the counter ticks in 10 ms),
    read by this process at the client's start/end marks."""
    ctx = mp.get_context("spawn")
    queue, ack = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_burst_client, args=(server.target, tasks, rounds, queue, ack))
    proc.start()
    cpu: list[list[float]] = [[] for _ in tasks]
    started = 0.0
    while True:
        kind, value = queue.get(timeout=600)
        if kind == "start":
            started = server.cpu_seconds()
            ack.put(None)
        elif kind == "end":
            cpu[value].append(server.cpu_seconds() - started)
            ack.put(None)
        else:
            break
    proc.join()
    return [statistics.fmean(c) for c in cpu]


def _head_json(task: str, meta: dict[str, Any]) -> str:
    return json.dumps({**meta, "task": {**meta["task"], "id": task}, "version": 0, "head_sha256": ""})


def _upload(admin: AdminClient, how: str, prefix: str, heads: list[bytes], meta: dict[str, Any]) -> float:
    """Seconds to upload ``heads`` as tasks ``<prefix>-00000`` ...: one LoadHeads stream, or a LoadHead
    call per head."""
    tasks = [f"{prefix}-{i:05d}" for i in range(len(heads))]
    t0 = time.perf_counter()
    if how == "stream":
        requests = (
            load_request(t, onnx=b, head_json=_head_json(t, meta)) for t, b in zip(tasks, heads, strict=True)
        )
        answered = sum(1 for _ in admin.load_heads(requests))
    else:
        answered = len(
            [
                admin.load_head(t, onnx=b, head_json=_head_json(t, meta))
                for t, b in zip(tasks, heads, strict=True)
            ]
        )
    assert answered == len(heads)
    return time.perf_counter() - t0


def _mode(
    bundle_dir: Path, mode: str, args: argparse.Namespace, heads: list[bytes], meta: dict[str, Any]
) -> dict[str, Any]:
    with serve(bundle_dir, "--no-watch", *MODES[mode]) as server, AdminClient(server.admin_target) as admin:
        base_p50 = _p50(server.target, args.calls, args.rounds)
        base_rss = server.rss_bytes()
        load_seconds = _upload(admin, "stream", "extra", heads, meta)
        time.sleep(1.0)
        many_rss = server.rss_bytes()
        many_p50 = _p50(server.target, args.calls, args.rounds)
        spread = [f"extra-{i:05d}" for i in range(min(64, len(heads)))]
        one_cpu, many_cpu = _burst_cpu(server, [["cartpole"] * len(spread), spread], args.burst_rounds)
        # LoadHeads vs a LoadHead call per head, alternating blocks on the same (growing) server.
        per_head: dict[str, list[float]] = {"stream": [], "unary": []}
        block = heads[: args.compare_block]
        for r in range(args.compare_rounds):
            for how in ("unary", "stream") if r % 2 else ("stream", "unary"):
                seconds = _upload(admin, how, f"{how}{r}", block, meta)
                per_head[how].append(seconds / len(block) * 1e3)
    return {
        "load_seconds": load_seconds,
        "load_ms_per_head": load_seconds / len(heads) * 1e3,
        "compare_ms_per_head": per_head,
        "stream_vs_unary": statistics.median(per_head["stream"]) / statistics.median(per_head["unary"])
        if per_head["stream"]
        else None,
        "rss_mib_before": base_rss / 2**20,
        "rss_mib_after": many_rss / 2**20,
        "kib_per_head": (many_rss - base_rss) / len(heads) / 1024,
        "p50_us_before": base_p50,
        "p50_us_after": many_p50,
        "p50_ratio": many_p50 / base_p50,
        "burst_cpu_ms_one_task": one_cpu * 1e3,
        "burst_cpu_ms_64_tasks": many_cpu * 1e3,
        "burst_cpu_ratio": many_cpu / one_cpu,
    }


def _startup(bundle_dir: Path, n: int, modes: list[str], heads: list[bytes], rounds: int) -> dict[str, Any]:
    """Seconds to a ready server on the plain bundle and on a copy holding n more heads on disk (each its
    own bytes: the perturbed uploads, cycled when fewer), plain and big alternating ``rounds`` times."""
    big = bundle_dir.parent / f"{bundle_dir.name}-{n}-distinct-heads"
    if not big.is_dir():
        tmp = big.with_name(big.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(bundle_dir, tmp)
        source = tmp / "heads" / "cartpole"
        meta = json.loads((source / "1" / "head.json").read_text())
        for i in range(n):
            task = f"disk-{i:05d}"
            dest = tmp / "heads" / task / "1"
            dest.mkdir(parents=True)
            onnx_bytes = heads[i % len(heads)]
            (dest / "head.onnx").write_bytes(onnx_bytes)
            if (source / "1" / "encoder.onnx").is_file():  # one encoder group: the same bytes
                (dest / "encoder.onnx").hardlink_to(source / "1" / "encoder.onnx")
            task_meta = {
                **meta,
                "task": {**meta["task"], "id": task},
                "head_sha256": sha256_bytes(onnx_bytes),
            }
            (dest / "head.json").write_text(json.dumps(task_meta))
        tmp.rename(big)
    out: dict[str, Any] = {"bundle_heads": n, "distinct_head_bytes": min(n, len(heads))}
    for mode in modes:
        times: dict[str, list[float]] = {"plain": [], "big": []}
        for _ in range(rounds):
            for name, path in (("plain", bundle_dir), ("big", big)):
                t0 = time.perf_counter()
                with serve(path, "--no-watch", *MODES[mode]) as server:
                    times[name].append(time.perf_counter() - t0)
                    if name == "big":
                        out[f"{mode}_big_rss_mib"] = server.rss_bytes() / 2**20
        out[f"{mode}_start_s"] = times
        out[f"{mode}_plain_start_s"] = statistics.median(times["plain"])
        out[f"{mode}_big_start_s"] = statistics.median(times["big"])
        out[f"{mode}_load_s"] = out[f"{mode}_big_start_s"] - out[f"{mode}_plain_start_s"]
    return out


def _pass_cpu(bundle_dir: Path, heads: list[bytes], meta: dict[str, Any], reps: int) -> dict[str, Any]:
    """In process: CPU of one batcher pass of 64 requests spread over 64 tasks vs 64 requests of one task
    (passes forced to hold all 64, as a saturated server's would), with len(heads) heads loaded, with and
    without values; the trunk and encoder are the same in both, the head chains differ."""
    from polyhead.server.actions import Sampling
    from polyhead.server.app import BackgroundServer
    from polyhead.server.batcher import Batcher
    from polyhead.server.settings import ServerSettings

    settings = ServerSettings(bundle=bundle_dir, port=0, admin_port=0, metrics_port=0, watch_bundle=False)
    out: dict[str, Any] = {"heads_loaded": len(heads), "reps": reps}
    with BackgroundServer(settings) as srv, AdminClient(srv.admin_target) as admin:
        _upload(admin, "stream", "extra", heads, meta)
        registry, running = srv.running.registry, srv.running
        spread = [registry.resolve(f"extra-{i:05d}") for i in range(0, len(heads), max(1, len(heads) // 64))][
            :64
        ]
        one = [registry.resolve("extra-00000")] * 64
        rng = np.random.default_rng(0)
        obs = [obs_for("cartpole", 1, rng) for _ in range(64)]

        async def passes(resolved: list[Any], value: bool) -> float:
            batcher = Batcher(
                running.batcher.trunk,
                metrics=running.metrics,
                max_batch_size=256,
                max_queue_delay_s=1.0,
                max_queue_size=1000,
                pending=lambda: 64,
            )
            try:
                sampling = Sampling(1, True, None, value=value)
                await asyncio.gather(
                    *(batcher.act(h, o, sampling) for h, o in zip(resolved, obs, strict=True))
                )
                c0 = time.process_time()
                for _ in range(reps):
                    await asyncio.gather(
                        *(batcher.act(h, o, sampling) for h, o in zip(resolved, obs, strict=True))
                    )
                assert batcher.stats.passes == reps + 1, batcher.stats
                return (time.process_time() - c0) / reps
            finally:
                batcher.shutdown()

        for value in (False, True):
            cpu: dict[str, list[float]] = {"spread": [], "one": []}
            for _ in range(3):  # alternating
                for name, resolved in (("spread", spread), ("one", one)):
                    cpu[name].append(
                        asyncio.run_coroutine_threadsafe(passes(resolved, value), srv.loop).result(600)
                    )
            key = "with_value" if value else "actions_only"
            out[key] = {
                "pass_cpu_us_64_tasks": [c * 1e6 for c in cpu["spread"]],
                "pass_cpu_us_one_task": [c * 1e6 for c in cpu["one"]],
                "ratio": statistics.median(cpu["spread"]) / statistics.median(cpu["one"]),
            }
    return out


def _kernels() -> dict[str, Any]:
    """µs per grouped pass, batched matmul over gathered weights vs a matmul per run of equal slots."""
    from polyhead.server.mlp_heads import Chain, ChainBank, Layer

    rng = np.random.default_rng(0)
    out: dict[str, Any] = {}
    for name, dims in (("policy 64->2", (64, 2)), ("value 64->64->64->1", (64, 64, 64, 1))):
        layers = tuple(
            Layer(rng.standard_normal((i, o)).astype(np.float32), np.zeros(o, np.float32), "tanh")
            for i, o in itertools.pairwise(dims)
        )
        bank = ChainBank(Chain("features", dims[0], False, layers).signature)
        for _ in range(256):
            bank.add(Chain("features", dims[0], False, layers))
        for heads in (1, 8, 64):
            slots = np.sort(rng.integers(0, heads, 64)).astype(np.intp)
            x = rng.standard_normal((64, dims[0])).astype(np.float32)
            for kernel in ("run", "run_segments"):
                fn = getattr(bank, kernel)
                t0 = time.perf_counter()
                for _ in range(2000):
                    fn(x, slots)
                out[f"{name}, 64 rows, {heads} heads, {kernel} us"] = (time.perf_counter() - t0) / 2000 * 1e6
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, default=Path("/tmp/polyhead-bench-bundle"))
    parser.add_argument("--heads", type=int, default=1000)
    parser.add_argument("--modes", default="stacked,sessions")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--burst-rounds", type=int, default=30)
    parser.add_argument("--bundle-heads", type=int, default=0)
    parser.add_argument("--kernels", action="store_true")
    parser.add_argument("--pass-cpu", type=int, default=0, help="reps of in-process 64-row passes (0: skip)")
    parser.add_argument("--startup-rounds", type=int, default=1, help="plain/big server starts, alternating")
    parser.add_argument(
        "--compare-block", type=int, default=250, help="heads per LoadHeads-vs-LoadHead block"
    )
    parser.add_argument("--compare-rounds", type=int, default=4, help="blocks of each (0: no comparison)")
    args = parser.parse_args()
    bundle_dir = build_bundle(args.bundle)
    modes = [m for m in args.modes.split(",") if m]
    report: dict[str, Any] = {"benchmark": "server_heads", **machine_note(), "heads_added": args.heads}
    if args.kernels:
        report["kernels"] = _kernels()
    every, meta, weight_bytes = _heads(bundle_dir, max(args.heads, min(args.bundle_heads, 10_000)))
    if args.heads:
        heads = every[: args.heads]
        report["head_weight_kib"] = weight_bytes / 1024
        for mode in modes:
            result = _mode(bundle_dir, mode, args, heads, meta)
            result["kib_per_head_beyond_weights"] = result["kib_per_head"] - weight_bytes / 1024
            report[mode] = result
            print(
                f"{mode}: {args.heads} heads in {result['load_seconds']:.1f} s, "
                f"(LoadHeads vs LoadHead per head x{result['stream_vs_unary'] or float('nan'):.2f}), "
                f"{result['kib_per_head']:.1f} KiB/head ({result['kib_per_head_beyond_weights']:.1f} beyond "
                f"weights), p50 x{result['p50_ratio']:.2f}, 64-task burst CPU "
                f"x{result['burst_cpu_ratio']:.2f}",
                file=sys.stderr,
            )
    if args.pass_cpu:
        report["pass_cpu"] = _pass_cpu(bundle_dir, every[: max(args.heads, 64)], meta, args.pass_cpu)
        for key in ("actions_only", "with_value"):
            print(
                f"one 64-row pass, 64 tasks vs one ({key}): x{report['pass_cpu'][key]['ratio']:.2f}",
                file=sys.stderr,
            )
    if args.bundle_heads:
        report["startup"] = _startup(bundle_dir, args.bundle_heads, modes, every, args.startup_rounds)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
