"""Publishing a head version: export, parity check, atomic write into the bundle, load into the server.

Every version goes through the same steps, in this order, and a failure at any step publishes nothing
that a server could pick up:

1. export the task's head to ONNX (:func:`polyhead.trainer.export.export_head`);
2. check it against torch on real observations of the task passed through the frozen trunk
   (:func:`polyhead.trainer.export.check_parity`; raises ExportParityError);
3. write ``heads/<task>/<version>/`` atomically with its head.json (eval return, parent, training
   summary) and point ``active.json`` at it (:meth:`polyhead.bundle.Bundle.write_head`);
4. when a server is attached, upload it with ``HeadAdmin.LoadHead`` under the same version number and
   activate it (the server validates and warms it up before the one-reference swap). A server watching
   the same bundle may load it first; both paths end with the same bytes serving.

The torch state of every published version is kept in memory so a rollback can also rewind the learner.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from polyhead.bundle import Bundle, HeadRecord
from polyhead.spaces import SpaceSpec
from polyhead.taskspec import TaskSpec
from polyhead.trainer.export import (
    ENCODER_OUTPUTS,
    Exporter,
    check_parity,
    encoder_graph,
    export_encoder,
    export_head,
    head_meta,
)
from polyhead.trainer.policy import MultiTaskPolicy, TaskHead
from polyhead.trainer.updater.control import ServerControl
from polyhead.trainer.updater.metrics import UpdaterMetrics

log = logging.getLogger("polyhead.trainer.adapt")


class _HeadReference(nn.Module):
    """The torch computation a head.onnx must reproduce, written from TaskHead's public methods."""

    def __init__(self, head: TaskHead) -> None:
        super().__init__()
        self.head = head

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        named = dict(zip(self.head.inputs, inputs, strict=True))
        features = named["features"]
        first, log_std = self.head.actor_params(features)
        value = self.head.value(features, named.get("obs_norm", features))
        return (first, value) if log_std is None else (first, log_std, value)


@dataclass
class Published:
    """One version this updater published."""

    version: int
    eval_return: float
    state: dict[str, torch.Tensor]
    record: HeadRecord
    published_at: float
    note: str = ""


@dataclass
class HeadPublisher:
    """Publishes versions of ``task``'s head from ``policy`` into ``bundle`` (and ``control``'s server)."""

    bundle: Bundle
    policy: MultiTaskPolicy
    task: TaskSpec
    observation_space: SpaceSpec
    parity_observations: npt.NDArray[np.float32]  # [N, D] real observations of the task, padded
    metrics: UpdaterMetrics
    control: ServerControl | None = None
    exporter: Exporter = "dynamo"
    #: A shared (frozen) group encoder's encoder.onnx, published unchanged; None: export the task's own.
    shared_encoder: bytes | None = None
    published: dict[int, Published] = field(default_factory=dict)

    def publish(
        self,
        *,
        eval_return: float,
        training: Mapping[str, Any],
        parent: str | None,
        note: str = "",
        activate: bool = True,
    ) -> Published:
        """Export, check, write and load the current encoder and head as the next version; returns what
        was published.

        ``activate`` False stages it: written to the bundle and loaded into the server without moving the
        bundle's active pointer or the served version (``polyhead operate`` then makes it a canary)."""
        task_id = self.task.id
        adapter = self.policy.adapter(task_id)
        adapter.eval()
        head = self.policy.head(task_id)
        slot = self.policy.slots[task_id]
        obs = torch.as_tensor(self.parity_observations)
        encoder_bytes = self.shared_encoder
        if encoder_bytes is None:
            encoder_bytes = export_encoder(self.policy, task_id, exporter=self.exporter)
            check_parity(
                f"encoder of task {task_id!r}",
                encoder_graph(self.policy, task_id),
                encoder_bytes,
                {"obs": obs[:, : slot.observation_size].numpy()},
                ENCODER_OUTPUTS,
            )
        onnx_bytes = export_head(self.policy, task_id, exporter=self.exporter)
        with torch.no_grad():
            obs_norm = self.policy.normalize(obs, task_id)
            features = self.policy.features(obs_norm, task_id)
        width = self.policy.encoder_of(task_id).input_size
        available = {"features": features.numpy(), "obs_norm": obs_norm[:, :width].numpy()}
        inputs = {name: available[name] for name in head.inputs}
        check_parity(f"head {task_id!r}", _HeadReference(head), onnx_bytes, inputs, head.outputs)
        meta = head_meta(
            self.policy,
            self.task,
            observation_space=self.observation_space,
            trunk_sha256=self.bundle.manifest.trunk_sha256,
            eval_return=eval_return,
            training=dict(training),
            parent=parent,
        )
        record = self.bundle.write_head(meta, onnx_bytes, encoder=encoder_bytes, activate=activate)
        if self.control is not None:
            head_json = record.path.joinpath("head.json").read_text(encoding="utf-8")
            self.control.load(
                task_id, record.version, onnx_bytes, head_json, encoder=encoder_bytes, activate=activate
            )
        now = time.time()
        published = Published(
            version=record.version,
            eval_return=eval_return,
            state=copy.deepcopy(adapter.state_dict()),
            record=record,
            published_at=now,
            note=note,
        )
        self.published[record.version] = published
        self.metrics.versions_published.labels(task=task_id).inc()
        self.metrics.eval_return.labels(task=task_id).set(eval_return)
        self.metrics.last_publish.labels(task=task_id).set(now)
        log.info(
            "published %s version %d (eval return %.1f%s)%s",
            task_id,
            record.version,
            eval_return,
            f", {note}" if note else "",
            f", serving on {self.control.target}" if self.control is not None else "",
        )
        return published

    def activate(self, version: int) -> None:
        """Serve an already published version again: the bundle's active pointer first, then the server.

        In this order a bundle watch (on this server or a replica) that read the old pointer cannot undo the
        server's activation: it stands down when the server activated anything after its read. When the
        server call fails (raised to the caller) the bundle already names ``version``: servers with a bundle
        watch follow it, one without stays on the old version until the call is repeated.
        """
        self.bundle.set_active_version(self.task.id, version)
        if self.control is not None:
            self.control.activate(self.task.id, version)
        self.metrics.eval_return.labels(task=self.task.id).set(self.published[version].eval_return)

    def restore(self, version: int) -> None:
        """Rewind the torch head (and own encoder) to the parameters of a published version."""
        self.policy.adapter(self.task.id).load_state_dict(self.published[version].state)
