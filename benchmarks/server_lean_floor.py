"""How cheap can a Python Act be on grpc.aio? polyhead's Act and echo beside a deliberately minimal server.

    .venv/bin/python benchmarks/server_lean_floor.py [--bundle DIR] [--rounds 3] [--seconds 3] \\
        [--modes pinned] [--out FILE.json]

The lean server (this file with ``--serve``, its own process, grpc.aio like polyhead) has unary methods on
raw bytes: ``Diagnostics/Echo`` (parse an EchoRequest, answer an EchoResponse: polyhead's echo without its
call wrapper); ``PolicyService/Act`` (parse an ActRequest, ``np.frombuffer`` the observations, one
finiteness check, ONE onnxruntime run of the task's encoder + trunk + head fused into one graph by
``benchmarks/peers/fuse.py``, answer an ActResponse with the int64 actions); ``PolicyService/ActThreeRuns``
(the same model as three sessions, encoder, trunk and head, as polyhead runs it); and
``PolicyService/ActNoModel`` (no model run: a constant action). No batching, no validation beyond that,
no metrics, no deadlines, no versions: the least a Python Act can do on this transport, so its CPU per
call over its own echo's is the floor of the ratio any Python implementation of Act on grpc.aio could
reach.

Every window is one of: polyhead echo, polyhead Act, lean echo, lean Act, ActThreeRuns, ActNoModel (task
``cartpole``, one observation per call, deterministic), at 1 and 64 clients, with the CPU figures of
``server_bounds.py`` (per thread, from ``/proc``). ``pinned`` (default): each server on CPU 0, the load
on CPU 1, so the server is the bottleneck and requests/s ratios equal CPU ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
from load import LoadPool
from server_bounds import ACT, ECHO, LOAD_CPUS, _log, apply_mode, pin, window
from server_common import _request_bytes, build_bundle, emit_report, machine_note, serve

ACT_NO_MODEL = "/polyhead.v1.PolicyService/ActNoModel"
ACT_THREE_RUNS = "/polyhead.v1.PolicyService/ActThreeRuns"
TASK = "cartpole"


# --- the lean server (child process) -------------------------------------------------------------------
async def _lean_main(model_dir: Path, port_file: Path) -> None:
    import grpc
    import numpy as np
    import onnxruntime as ort

    from polyhead.v1 import policy_pb2, types_pb2

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1

    def load(name: str) -> Any:
        data = (model_dir / name).read_bytes()
        return ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])

    session = load("fused.onnx")
    encoder, trunk, head = load("encoder.onnx"), load("trunk.onnx"), load("head.onnx")
    int64 = types_pb2.DType.Value("DTYPE_INT64")

    def observations(request: bytes) -> tuple[Any, Any]:
        message = policy_pb2.ActRequest.FromString(request)
        tensor = message.observations
        obs = np.frombuffer(tensor.raw_data, dtype=np.float32).reshape(tuple(tensor.shape))
        if obs.ndim == 1:
            obs = obs[None, :]
        if not np.isfinite(obs).all():
            raise ValueError("non-finite observation")
        return message, obs

    def respond(message: Any, actions: Any) -> bytes:
        response = policy_pb2.ActResponse(task_id=message.task_id, head_version=1)
        response.actions.dtype = int64
        response.actions.shape[:] = actions.shape
        response.actions.raw_data = actions.tobytes()
        return response.SerializeToString()

    async def echo(request: bytes, _context: Any) -> bytes:
        payload = policy_pb2.EchoRequest.FromString(request).payload
        return policy_pb2.EchoResponse(payload=payload).SerializeToString()

    async def act(request: bytes, _context: Any) -> bytes:
        message, obs = observations(request)
        (actions,) = session.run(["action"], {"obs": obs})
        return respond(message, actions)

    async def act_three_runs(request: bytes, _context: Any) -> bytes:
        # What polyhead runs per pass, as three sessions: encoder, trunk, head (then argmax).
        message, obs = observations(request)
        embedding, obs_norm = encoder.run(["embedding", "obs_norm"], {"obs": obs})
        (features,) = trunk.run(["features"], {"embedding": embedding})
        (logits,) = head.run(["logits"], {"features": features, "obs_norm": obs_norm})
        return respond(message, logits.argmax(axis=1))

    zero = np.zeros(1, np.int64)

    async def act_no_model(request: bytes, _context: Any) -> bytes:
        message, _ = observations(request)
        return respond(message, zero)

    def unary(fn: Any) -> Any:
        return grpc.unary_unary_rpc_method_handler(fn)  # no (de)serializers: raw bytes both ways

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler("polyhead.v1.Diagnostics", {"Echo": unary(echo)}),
            grpc.method_handlers_generic_handler(
                "polyhead.v1.PolicyService",
                {"Act": unary(act), "ActNoModel": unary(act_no_model), "ActThreeRuns": unary(act_three_runs)},
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    port_file.write_text(str(port))
    await server.wait_for_termination()


class LeanServer:
    """The lean server in a child process (``--serve``), stopped by SIGTERM."""

    def __init__(self, model_dir: Path) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="lean-floor-"))
        port_file = self._dir / "port"
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", str(model_dir), str(port_file)])
        deadline = time.monotonic() + 60
        while not port_file.is_file() or not port_file.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError("the lean server did not start")
            time.sleep(0.05)
        self.port = int(port_file.read_text())

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def lean_server(model_dir: Path, mode: str) -> Iterator[LeanServer]:
    driver = os.sched_getaffinity(0)
    if mode == "pinned":
        os.sched_setaffinity(0, LOAD_CPUS)
    try:
        server = LeanServer(model_dir)
        try:
            yield server
        finally:
            server.stop()
    finally:
        os.sched_setaffinity(0, driver)


@contextlib.contextmanager
def polyhead_server(bundle: Path, mode: str) -> Iterator[Any]:
    driver = os.sched_getaffinity(0)
    if mode == "pinned":
        os.sched_setaffinity(0, LOAD_CPUS)
    try:
        with serve(bundle) as server:
            yield server
    finally:
        os.sched_setaffinity(0, driver)


def check_lean(target: str, payloads: list[bytes]) -> None:
    """The fused run and the three runs answer every payload with the same bytes (same actions)."""
    import grpc

    with grpc.insecure_channel(target) as channel:
        for payload in payloads:
            fused = channel.unary_unary(ACT)(payload, timeout=10)
            three = channel.unary_unary(ACT_THREE_RUNS)(payload, timeout=10)
            if fused != three:
                raise AssertionError("the fused model and the three sessions answer differently")


def _payloads() -> tuple[list[bytes], list[bytes]]:
    from polyhead.v1 import policy_pb2

    act = _request_bytes("act", [TASK], None, seed=0)
    echo = policy_pb2.EchoRequest(payload=b"x" * (max(len(p) for p in act) - 3)).SerializeToString()
    return act, [echo]


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--serve":
        asyncio.run(_lean_main(Path(sys.argv[2]), Path(sys.argv[3])))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, default=Path("/tmp/polyhead-bench-bundle"))
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default="pinned")
    parser.add_argument("--clients", default="1,64")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from fuse import fuse

    bundle = build_bundle(args.bundle)
    from polyhead.bundle import Bundle

    model_dir = Path(tempfile.mkdtemp(prefix="lean-floor-model-"))
    (model_dir / "fused.onnx").write_bytes(fuse(bundle, TASK)[0])
    record = Bundle.open(bundle).head(TASK)
    encoder = record.read_encoder()
    if encoder is None:
        parser.error("needs a format-2 bundle (per-task encoders)")
    (model_dir / "encoder.onnx").write_bytes(encoder)
    (model_dir / "head.onnx").write_bytes(record.read_onnx())
    (model_dir / "trunk.onnx").write_bytes(Bundle.open(bundle).trunk_path.read_bytes())
    act, echo = _payloads()
    clients = [int(c) for c in args.clients.split(",")]
    report: dict[str, Any] = {"benchmark": "server_lean_floor", **machine_note(), "rounds": []}
    pool = LoadPool(2)
    everything = set(range(os.cpu_count() or 1))
    try:
        for r in range(args.rounds):
            out: dict[str, Any] = {"loadavg": os.getloadavg()}
            for mode in args.modes.split(","):
                servers = [
                    ("polyhead", ((ECHO, echo), (ACT, act))),
                    ("lean", ((ECHO, echo), (ACT, act), (ACT_THREE_RUNS, act), (ACT_NO_MODEL, act))),
                ]
                for name, methods in servers if r % 2 == 0 else servers[::-1]:
                    ctx = lean_server(model_dir, mode) if name == "lean" else polyhead_server(bundle, mode)
                    with ctx as server:
                        if name == "lean":
                            check_lean(server.target, act)
                        for c in clients:
                            for method, payloads in methods:
                                apply_mode(mode, server, pool)
                                w = window(
                                    pool,
                                    server,
                                    method=method,
                                    payloads=payloads,
                                    clients=c,
                                    seconds=args.seconds,
                                    warmup_s=args.warmup,
                                )
                                key = f"{mode}/{name}/{method.rsplit('/', 1)[1]}/c{c}"
                                out[key] = w
                                _log(
                                    f"{key}: {w['rps']:.0f}/s p50 {w['p50_us']:.0f} us, server CPU/call "
                                    f"{w['server_cpu_us_per_request']:.0f} us (main "
                                    f"{w['server_main_cpu_us_per_request']:.0f}), "
                                    f"util {w['server_util']:.2f}, errors {w['errors']}"
                                )
                    for p in pool.pids:
                        pin(p, everything)
            report["rounds"].append(out)
    finally:
        pool.close()
    report["loadavg_end"] = os.getloadavg()
    emit_report(report, args.out)


if __name__ == "__main__":
    main()
