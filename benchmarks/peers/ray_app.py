"""The Ray Serve peer: one deployment running onnxruntime on the fused policy, behind Ray's gRPC proxy.

Runs inside the Ray venv (``run_peers.py`` starts it; it needs the ``polyhead.v1`` stubs compiled in that
venv on ``PYTHONPATH``, since Ray's gRPC proxy serves a user-defined protobuf service):

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 PYTHONPATH=STUBS:ray_loopback \\
        .venvs/ray/bin/python ray_app.py --model policy.onnx --grpc-port P --http-port H --ready-file F

Two applications can run side by side on the one cluster and proxy: ``policy`` (Ray Serve's defaults,
``max_ongoing_requests`` 5) and, with ``--tuned-max-ongoing N``, ``policy-tuned`` (the same deployment
with ``max_ongoing_requests`` N); clients pick one with the ``application`` gRPC metadata.

The proxied service is ``polyhead.v1.PolicyService``; only ``Act`` is implemented (the wire format of the
request and response is polyhead's own, so the load generator sends the same bytes to polyhead and to
Ray). Ray stays on loopback: ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes the node address 127.0.0.1,
the HTTP proxy binds 127.0.0.1, and ``ray_loopback/sitecustomize.py`` moves the gRPC proxy from ``[::]``
to 127.0.0.1. On SIGTERM the app and the local cluster are shut down.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray import serve
from ray.serve.config import HTTPOptions, gRPCOptions

from polyhead.v1 import policy_pb2, types_pb2

APP = "policy"
TUNED_APP = "policy-tuned"


@serve.deployment(name="PolicyDeployment")
class PolicyDeployment:
    """One replica, one onnxruntime session with one intra-op thread (as polyhead and MLServer run it)."""

    def __init__(self, model_path: str) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(
            model_path, sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._width = int(self._session.get_inputs()[0].shape[1])

    async def Act(self, request: Any) -> Any:  # noqa: N802  (the proxied RPC's name)
        tensor = request.observations
        if tensor.raw_data:
            obs = np.frombuffer(tensor.raw_data, dtype="<f4")
        else:
            obs = np.asarray(tensor.float_data, dtype=np.float32)
        (action,) = self._session.run(["action"], {"obs": obs.reshape(-1, self._width)})
        actions = types_pb2.Tensor(
            dtype=types_pb2.DTYPE_INT64, shape=list(action.shape), raw_data=action.astype("<i8").tobytes()
        )
        return policy_pb2.ActResponse(task_id=request.task_id, head_version=0, actions=actions)


def main() -> int:
    parser = argparse.ArgumentParser(description="Serve the fused policy with Ray Serve's gRPC proxy.")
    parser.add_argument("--model", type=Path, required=True, help="fused policy .onnx")
    parser.add_argument("--grpc-port", type=int, required=True, help="gRPC proxy port on 127.0.0.1")
    parser.add_argument("--http-port", type=int, required=True, help="HTTP proxy port on 127.0.0.1")
    parser.add_argument("--ready-file", type=Path, required=True, help="written once the app is running")
    parser.add_argument(
        "--tuned-max-ongoing",
        type=int,
        default=0,
        help=f"also run the app {TUNED_APP!r}: the same deployment with this max_ongoing_requests (0: no)",
    )
    args = parser.parse_args()

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    ray.init(
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        object_store_memory=128 * 1024 * 1024,
        logging_level="WARNING",
        log_to_driver=False,
    )
    try:
        serve.start(
            http_options=HTTPOptions(host="127.0.0.1", port=args.http_port),
            grpc_options=gRPCOptions(
                port=args.grpc_port,
                grpc_servicer_functions=["polyhead.v1.policy_pb2_grpc.add_PolicyServiceServicer_to_server"],
            ),
        )
        model = str(args.model.resolve())
        serve.run(PolicyDeployment.bind(model), name=APP, route_prefix="/")
        if args.tuned_max_ongoing:
            tuned = PolicyDeployment.options(
                name="PolicyDeploymentTuned", max_ongoing_requests=args.tuned_max_ongoing
            )
            serve.run(tuned.bind(model), name=TUNED_APP, route_prefix="/tuned")
        args.ready_file.write_text(json.dumps({"grpc_port": args.grpc_port, "pid": os.getpid()}))
        stop.wait()
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
