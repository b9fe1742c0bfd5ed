"""Evaluate a bundle in-process with onnxruntime (encoder + trunk + head, or a format-1 padded trunk +
head), the reference for parity tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from polyhead.bundle import Bundle
from polyhead.envs import make_env
from polyhead.spaces import pad_observations, raw_to_env_action, validate_observations


def deterministic_returns(bundle_dir: Path, task_id: str, seeds: list[int]) -> list[float]:
    """Deterministic-policy episode returns of ``task_id``, one episode per seed (env reset seed)."""
    bundle = Bundle.open(bundle_dir)
    record = bundle.head(task_id)
    meta = record.meta
    trunk = ort.InferenceSession(str(bundle.trunk_path), providers=["CPUExecutionProvider"])
    head = ort.InferenceSession(str(record.onnx_path), providers=["CPUExecutionProvider"])
    encoder_bytes = record.read_encoder()
    encoder = None
    if encoder_bytes is not None:
        encoder = ort.InferenceSession(encoder_bytes, providers=["CPUExecutionProvider"])
    size = bundle.manifest.observation_size
    returns = []
    for seed in seeds:
        env = make_env(meta.task)
        obs, _ = env.reset(seed=seed)
        total, done = 0.0, False
        while not done:
            flat, _ = validate_observations(np.asarray(obs), meta.observation_space)
            if encoder is None:
                padded = pad_observations(flat, size)
                features, obs_norm = trunk.run(["features", "obs_norm"], {"obs": padded})
            else:
                embedding, obs_norm = encoder.run(["embedding", "obs_norm"], {"obs": flat})
                (features,) = trunk.run(["features"], {"embedding": embedding})
            feeds = {"features": features, "obs_norm": obs_norm}
            out = dict(
                zip(
                    meta.outputs,
                    head.run(list(meta.outputs), {k: feeds[k] for k in meta.inputs}),
                    strict=True,
                )
            )
            raw = np.argmax(out["logits"], axis=-1) if "logits" in out else out["mean"]
            action = raw_to_env_action(raw, meta.action_space)[0]
            obs, reward, terminated, truncated, _ = env.step(int(action) if action.ndim == 0 else action)
            total += float(reward)
            done = bool(terminated or truncated)
        env.close()
        returns.append(total)
    return returns
