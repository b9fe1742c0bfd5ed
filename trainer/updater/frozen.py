"""The frozen trunk: no gradient, no optimiser, no normaliser update, and hashes that prove it.

Head-only adaptation trains a new task's head (policy and value function) on features of a trunk that
serves every other task. Two fingerprints are taken before and after training and must be identical:

* the sha256 of ``trunk.onnx`` in the bundle (what servers run), and
* a sha256 over every trunk tensor of the torch module, parameters *and* buffers (the observation
  normaliser's running mean, variance and count are buffers: a stray ``update`` would change them).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from polyhead.bundle import Bundle, sha256_file
from polyhead.trainer.policy import MultiTaskPolicy, head_key


class TrunkChanged(AssertionError):
    """The trunk (file or tensors) or another task's head changed during adaptation: a bug, never data."""


def tensors_sha256(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes of tensors, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(named, key=lambda item: item[0]):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def trunk_state_sha256(policy: MultiTaskPolicy) -> str:
    """The fingerprint of the torch trunk: every parameter and buffer (normaliser statistics included)."""
    return tensors_sha256(policy.trunk.state_dict().items())


def head_state_sha256(policy: MultiTaskPolicy, task_id: str) -> str:
    return tensors_sha256(policy.head(task_id).state_dict().items())


def freeze_trunk(policy: MultiTaskPolicy) -> None:
    """No gradient flows into the trunk or any encoder present now (the old tasks'); their normalisers
    are only ever read. An encoder added afterwards (a new task's own) stays trainable."""
    policy.trunk.requires_grad_(False)
    policy.trunk.eval()
    policy.encoders.requires_grad_(False)
    policy.encoders.eval()


def bundle_file_hashes(bundle: Bundle, *, exclude_task: str) -> dict[str, str]:
    """sha256 of ``trunk.onnx``, ``trunk.pt``, the manifest and every file of every other task's heads."""
    root = bundle.root
    files: list[Path] = [bundle.trunk_path, bundle.checkpoint_path, root / "manifest.json"]
    for task_id in bundle.task_ids():
        if task_id != exclude_task:
            files.extend(p for p in sorted(bundle.task_dir(task_id).rglob("*")) if p.is_file())
    return {str(p.relative_to(root)): sha256_file(p) for p in files if p.is_file()}


@dataclass(frozen=True)
class Fingerprint:
    """What must not change: trunk file hash, torch trunk hash, other heads' tensors and files."""

    trunk_onnx_sha256: str
    trunk_state_sha256: str
    other_heads_sha256: dict[str, str]
    files: dict[str, str]

    @classmethod
    def take(cls, bundle: Bundle, policy: MultiTaskPolicy, task_id: str) -> Fingerprint:
        others = {
            t: head_state_sha256(policy, t) for t in policy.task_ids if head_key(t) != head_key(task_id)
        }
        own = {policy.slots[task_id].encoder} if policy.owns_encoder(task_id) else set()
        for name in {slot.encoder for slot in policy.slots.values()} - own:
            others[f"encoder {name}"] = tensors_sha256(policy.encoder(name).state_dict().items())
        return cls(
            trunk_onnx_sha256=sha256_file(bundle.trunk_path),
            trunk_state_sha256=trunk_state_sha256(policy),
            other_heads_sha256=others,
            files=bundle_file_hashes(bundle, exclude_task=task_id),
        )

    def assert_same(self, after: Fingerprint) -> None:
        """Raise TrunkChanged naming what differs."""
        if after.trunk_onnx_sha256 != self.trunk_onnx_sha256:
            raise TrunkChanged(
                f"trunk.onnx changed: sha256 {self.trunk_onnx_sha256[:12]}… -> "
                f"{after.trunk_onnx_sha256[:12]}…"
            )
        if after.trunk_state_sha256 != self.trunk_state_sha256:
            raise TrunkChanged("the torch trunk's parameters or normaliser statistics changed")
        changed = sorted(
            t
            for t in self.other_heads_sha256
            if after.other_heads_sha256.get(t) != self.other_heads_sha256[t]
        )
        if changed:
            raise TrunkChanged(f"heads of other tasks changed in torch: {changed}")
        files = sorted(f for f in self.files if after.files.get(f) != self.files[f])
        if files:
            raise TrunkChanged(f"bundle files of the trunk or other tasks changed: {files}")
