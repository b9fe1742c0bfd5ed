"""Fuse one task's trunk and active head from a bundle into ONE ONNX model that the peer servers run.

    .venv/bin/python benchmarks/peers/fuse.py --bundle DIR --task cartpole --out policy.onnx

The fused graph is exactly what ``polyhead serve`` computes for a deterministic ``Act`` on that task:

    format 2:  obs [B, d] --> encoder.onnx --embedding--> trunk.onnx --features--> head.onnx (+ obs_norm)
    format 1:  obs [B, d] --(zero-pad to the trunk's D)--> trunk.onnx --features[, obs_norm]--> head.onnx
    then:      --logits--> ArgMax(axis=1) + action_space.start --> "action" int64 [B];  "value" float32 [B]

It is built from the bundle's own ``encoder.onnx`` (format 2), ``trunk.onnx`` and ``head.onnx`` with
``onnx.compose.merge_models`` (weights byte-identical to what polyhead serves), so the peers serve the
same policy, not a re-export. Only categorical (Discrete) heads are supported: the Gaussian
post-processing (clip and affine map to the Box bounds) would have to be rebuilt in ONNX, and the
comparison needs only one task.

:func:`check_parity` compares the fused model's actions with polyhead's served deterministic actions.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, compose, helper, numpy_helper

from polyhead.bundle import Bundle
from polyhead.spaces import BoxSpec, DiscreteSpec, observation_size

INPUT = "obs"
OUTPUTS = ("action", "value")


def fuse(bundle_dir: Path, task: str) -> tuple[bytes, int]:
    """The fused ONNX model's bytes for ``task``'s active head, and the observation width ``d`` it takes.

    Raises ValueError for a task whose head is not categorical or whose observation space is not a Box.
    """
    bundle = Bundle.open(bundle_dir)
    record = bundle.head(task)
    meta = record.meta
    if meta.distribution != "categorical" or not isinstance(meta.action_space, DiscreteSpec):
        raise ValueError(f"task {task!r}: only categorical heads can be fused (got {meta.distribution})")
    if not isinstance(meta.observation_space, BoxSpec):
        raise ValueError(f"task {task!r}: only Box observation spaces can be fused")
    width = observation_size(meta.observation_space)
    trunk = onnx.load_model_from_string(bundle.trunk_path.read_bytes())
    head = onnx.load_model_from_string(record.read_onnx())
    encoder_bytes = record.read_encoder()
    if encoder_bytes is not None:
        # Format 2: the task's encoder (obs -> embedding, obs_norm) runs before the shared trunk
        # (embedding -> features); the head reads features and the encoder's obs_norm.
        encoder = onnx.load_model_from_string(encoder_bytes)
        trunk.ir_version = head.ir_version = encoder.ir_version  # same exporter: only the stamp may differ
        front = compose.merge_models(
            encoder,
            trunk,
            io_map=[("embedding", "embedding")],
            prefix1="encoder/",
            prefix2="trunk/",
            outputs=["trunk/features", "encoder/obs_norm"],
        )
        front_input = "encoder/obs"
        front_outputs = {"features": "trunk/features", "obs_norm": "encoder/obs_norm"}
        pad_to = width  # the encoder takes the task's own width: nothing to pad
    else:
        # Format 1: one trunk over observations zero-padded to the suite's widest, as
        # polyhead.spaces.pad_observations does.
        head.ir_version = trunk.ir_version
        front = compose.add_prefix(trunk, "trunk/")
        front_input = "trunk/obs"
        front_outputs = {name: f"trunk/{name}" for name in ("features", "obs_norm")}
        pad_to = bundle.manifest.observation_size
    merged = compose.merge_models(
        front,
        head,
        io_map=[(front_outputs[name], name) for name in meta.inputs],
        prefix2="head/",
        outputs=["head/logits", "head/value"],
    )
    graph = merged.graph
    del graph.input[:]
    graph.input.append(helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", width]))
    pads = numpy_helper.from_array(np.array([0, 0, 0, pad_to - width], np.int64), "fuse/pads")
    start = numpy_helper.from_array(np.array(meta.action_space.start, np.int64), "fuse/start")
    graph.initializer.extend([pads, start])
    graph.node.insert(0, helper.make_node("Pad", [INPUT, "fuse/pads"], [front_input], name="fuse/pad"))
    graph.node.extend(
        [
            helper.make_node(
                "ArgMax", ["head/logits"], ["fuse/index"], axis=1, keepdims=0, name="fuse/argmax"
            ),
            helper.make_node("Add", ["fuse/index", "fuse/start"], ["action"], name="fuse/start_offset"),
            helper.make_node("Identity", ["head/value"], ["value"], name="fuse/value"),
        ]
    )
    del graph.output[:]
    graph.output.extend(
        [
            helper.make_tensor_value_info("action", TensorProto.INT64, ["batch"]),
            helper.make_tensor_value_info("value", TensorProto.FLOAT, ["batch"]),
        ]
    )
    graph.name = f"polyhead-fused-{task}"
    onnx.checker.check_model(merged, full_check=True)
    return merged.SerializeToString(), width


def run_fused(onnx_bytes: bytes, obs: npt.NDArray[np.float32]) -> npt.NDArray[np.int64]:
    """Deterministic actions of the fused model on ``obs`` [B, d] (onnxruntime, one thread)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(onnx_bytes, sess_options=options, providers=["CPUExecutionProvider"])
    (action,) = session.run(["action"], {INPUT: np.ascontiguousarray(obs, np.float32)})
    return np.asarray(action, np.int64)


def check_parity(
    fused_actions: npt.NDArray[np.int64], served_actions: npt.NDArray[np.int64], what: str
) -> None:
    """Raise AssertionError naming ``what`` and the first differing row when the actions differ."""
    fused_actions = np.asarray(fused_actions).reshape(-1)
    served_actions = np.asarray(served_actions).reshape(-1)
    if fused_actions.shape != served_actions.shape:
        raise AssertionError(
            f"{what}: {served_actions.shape} actions, fused model gave {fused_actions.shape}"
        )
    bad = np.flatnonzero(fused_actions != served_actions)
    if bad.size:
        i = int(bad[0])
        raise AssertionError(
            f"{what}: {bad.size}/{fused_actions.size} actions differ from the fused model "
            f"(first at row {i}: {served_actions[i]} vs {fused_actions[i]})"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True, help="bundle directory")
    parser.add_argument("--task", required=True, help="task whose active head is fused with the trunk")
    parser.add_argument("--out", type=Path, required=True, help="where to write the fused .onnx")
    args = parser.parse_args()
    data, width = fuse(args.bundle, args.task)
    args.out.write_bytes(data)
    print(f"wrote {args.out} ({len(data)} bytes): obs [B, {width}] -> action int64 [B], value float32 [B]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
