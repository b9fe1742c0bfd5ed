"""The server's control plane as the updater uses it: load and activate head versions, roll back, and
read the experience feed.

A thin layer over :class:`polyhead.clients.admin.AdminClient` that turns client errors into polyhead domain
errors
(so ``polyhead adapt`` exits with a clear message), and runs ``HeadAdmin.StreamExperience`` in a thread
that decodes segments of the new task into :class:`~polyhead.trainer.updater.head_ppo.SegmentData` on a queue.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections.abc import Callable

import numpy as np

from polyhead import errors
from polyhead.bundle import sha256_bytes
from polyhead.clients.admin import AdminClient
from polyhead.clients.errors import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    PolicyClientError,
    PreconditionFailed,
    TaskNotFound,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from polyhead.clients.retry import RetryPolicy
from polyhead.tensors import from_proto, is_empty
from polyhead.trainer.updater.head_ppo import SegmentData
from polyhead.v1 import admin_pb2

log = logging.getLogger("polyhead.trainer.adapt")


class ServerUnreachable(errors.UsageError):
    """The server's admin endpoint did not answer (wrong address, server down, admin port off)."""


class NoExperience(errors.PolyheadError):
    """Remote mode received no experience for the task within the idle timeout."""


class ServerRefused(errors.PolyheadError):
    """The server answered but refused an updater call (e.g. it rejected a head)."""


def _domain_error(exc: PolicyClientError, what: str, target: str) -> errors.PolyheadError:
    if isinstance(exc, Unavailable | DeadlineExceeded):
        return ServerUnreachable(
            f"{what}: the server's admin endpoint {target} is unreachable ({exc.code.name}: {exc.details}); "
            "check --admin-target (polyhead serve's admin port defaults to 127.0.0.1:50052) and that the "
            "server is running"
        )
    if isinstance(exc, Unimplemented):
        return ServerUnreachable(
            f"{what}: {target} does not serve HeadAdmin; point --admin-target at the admin port"
        )
    if isinstance(exc, Unauthenticated):
        return errors.Unauthenticated(f"{what}: {exc.details}; pass the server's --admin-token")
    if isinstance(exc, PreconditionFailed):
        return errors.IncompatibleHead(f"{what}: {exc.details}")
    return ServerRefused(f"{what}: {exc}")


#: Admin calls ride out a server restart: UNAVAILABLE is retried until the call's deadline (``timeout_s``,
#: 30 s by default; the attempt count is no tighter bound), and the channel reconnects within ~2 s of the
#: server coming back (clients.channel), so a publish sent while the server restarts lands once it is
#: back. Safe to repeat: a version loaded twice with the same bytes is accepted.
ADMIN_RETRY = RetryPolicy(max_attempts=1000, initial_backoff_s=0.1, max_backoff_s=1.0, jitter=0.5)


class ServerControl:
    """Admin calls of one updater run; every method raises polyhead domain errors."""

    def __init__(self, admin_target: str, *, token: str | None = None, timeout_s: float = 30.0) -> None:
        self.target = admin_target
        self.token = token
        self.timeout_s = timeout_s
        self._admin = AdminClient(admin_target, token=token, timeout=timeout_s, retry=ADMIN_RETRY)

    def check(self, *, timeout_s: float = 5.0) -> None:
        """One ``ListHeads`` call, to fail early and clearly when the server cannot be reached."""
        try:
            self._admin.list_heads(timeout=timeout_s)
        except PolicyClientError as exc:
            raise _domain_error(exc, "connecting to the server", self.target) from None

    def versions(self, task_id: str) -> tuple[list[int], int]:
        """(loaded versions, active version) of ``task_id`` on the server (([], 0) when not served)."""
        try:
            heads = self._admin.list_heads(task_id)
        except TaskNotFound:
            return [], 0
        except PolicyClientError as exc:
            raise _domain_error(exc, f"listing the heads of {task_id!r}", self.target) from None
        loaded = sorted(h.version for h in heads if h.task_id == task_id)
        active = next((h.version for h in heads if h.task_id == task_id and h.active), 0)
        return loaded, active

    def load(
        self,
        task_id: str,
        version: int,
        onnx: bytes,
        head_json: str,
        *,
        encoder: bytes | None = None,
        activate: bool = True,
    ) -> int:
        """Upload a task version (head, and encoder for a format-2 bundle; validated, warmed up, then
        activated by the server as one version); returns the
        server's active version. A server that already loaded the same bytes from its bundle watch is fine.
        """
        try:
            resp = self._admin.load_head(
                task_id, onnx=onnx, head_json=head_json, encoder=encoder, version=version, activate=activate
            )
            return int(resp.active_version)
        except AlreadyExists as exc:
            # The bundle watch of a server sharing our bundle may race us to the same version: when it
            # holds our bytes the version is loaded and activating it is all that is left.
            conflict = exc
        except PolicyClientError as exc:
            raise _domain_error(exc, f"loading {task_id!r} version {version}", self.target) from None
        try:
            loaded = {h.version: h.head_sha256 for h in self._admin.list_heads(task_id)}
        except PolicyClientError as exc:
            raise _domain_error(exc, f"listing the heads of {task_id!r}", self.target) from None
        if loaded.get(version) != sha256_bytes(onnx):
            raise errors.VersionConflict(
                f"loading {task_id!r} version {version}: the server holds other bytes under that version "
                f"({conflict.details})"
            )
        return self.activate(task_id, version)

    def activate(self, task_id: str, version: int) -> int:
        """``SetActiveVersion``: serve a published version (one reference swap on the server). A server
        keeps only a few versions loaded (``max_loaded_versions``); one it has unloaded is loaded again from
        the bundle it serves (``heads/<task>/<version>``) and activated."""
        try:
            return self._admin.set_active_version(task_id, version).active_version
        except TaskNotFound:
            pass  # the version was unloaded: its files are still in the bundle
        except PolicyClientError as exc:
            raise _domain_error(exc, f"activating {task_id!r} version {version}", self.target) from None
        try:
            resp = self._admin.load_head(
                task_id, repository_path=f"heads/{task_id}/{version}", version=version, activate=True
            )
            return int(resp.active_version)
        except PolicyClientError as exc:
            raise _domain_error(exc, f"activating {task_id!r} version {version}", self.target) from None

    def set_canary(self, task_id: str, version: int, percent: float) -> admin_pb2.CanaryState:
        """``SetCanary``: ``version`` (loaded) serves ``percent`` of the task's traffic."""
        try:
            return self._admin.set_canary(task_id, version, percent)
        except PolicyClientError as exc:
            raise _domain_error(exc, f"setting {task_id!r} canary version {version}", self.target) from None

    def promote_canary(self, task_id: str, version: int) -> int:
        """``PromoteCanary``: the canary ``version`` becomes stable; returns the server's stable version."""
        try:
            return self._admin.promote_canary(task_id, version).active_version
        except PolicyClientError as exc:
            raise _domain_error(exc, f"promoting {task_id!r} canary version {version}", self.target) from None

    def clear_canary(self, task_id: str) -> int:
        """``ClearCanary``: all traffic to the stable version; returns the cleared canary (0: none)."""
        try:
            return self._admin.clear_canary(task_id).cleared_version
        except PolicyClientError as exc:
            raise _domain_error(exc, f"clearing the canary of {task_id!r}", self.target) from None

    def experience(self, task_id: str) -> ExperienceFeed:
        """Start reading the server's experience feed for ``task_id`` (see :class:`ExperienceFeed`)."""
        return ExperienceFeed(self.target, task_id, token=self.token)

    def close(self) -> None:
        self._admin.close()


def segment_from_proto(msg: admin_pb2.EpisodeSegment) -> SegmentData:
    """Decode an ``EpisodeSegment`` message."""
    nxt = None
    if msg.HasField("next_observation") and not is_empty(msg.next_observation):
        nxt = np.array(from_proto(msg.next_observation, field="next_observation"), np.float32)
    # np.array copies: from_proto returns read-only views of the message bytes.
    observations = np.array(from_proto(msg.observations, field="observations"), np.float32)
    return SegmentData(
        episode_id=msg.episode_id,
        observations=observations.reshape(len(msg.head_versions), -1),
        actions=np.array(from_proto(msg.actions, field="actions")),
        log_probs=np.array(from_proto(msg.log_probs, field="log_probs"), np.float32).reshape(-1),
        rewards=np.array(from_proto(msg.rewards, field="rewards"), np.float32).reshape(-1),
        head_versions=tuple(int(v) for v in msg.head_versions),
        terminated=msg.terminated,
        truncated=msg.truncated,
        episode_return=msg.episode_return if msg.episode_length > 0 else math.nan,
        next_observation=nxt,
        deterministic=tuple(bool(d) for d in msg.deterministic),
        start_step=int(msg.start_step),
        episode_ordinal=int(msg.episode_ordinal),
    )


class ExperienceFeed:
    """``StreamExperience`` for one task, read by a daemon thread into a bounded queue.

    Its own channel, so :meth:`close` ends the stream without touching other calls. A stream that breaks
    (server restart) is reopened after a short pause; segments sent meanwhile are lost (the feed does not
    replay), which on-policy learning tolerates.
    """

    def __init__(
        self,
        admin_target: str,
        task_id: str,
        *,
        token: str | None = None,
        maxsize: int = 10_000,
        on_error: Callable[[Exception], None] | None = None,
    ) -> None:
        self.task_id = task_id
        self.queue: queue.Queue[SegmentData] = queue.Queue(maxsize)
        self.errors = 0
        self.lost = 0
        self.malformed = 0  # steps of segments that could not be decoded (skipped, the stream goes on)
        self._target = admin_target
        self._token = token
        self._on_error = on_error
        self._stop = threading.Event()
        self._client: AdminClient | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"experience-{task_id}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            client = AdminClient(self._target, token=self._token, timeout=None)
            with self._lock:
                if self._stop.is_set():
                    client.close()
                    return
                self._client = client
            try:
                for msg in client.stream_experience([self.task_id]):
                    try:
                        segment = segment_from_proto(msg)
                    except (errors.PolyheadError, ValueError) as exc:
                        # One undecodable segment must not cost the stream (and what follows it).
                        self.malformed += len(msg.head_versions)
                        log.warning("experience feed of %s: segment skipped: %s", self.task_id, exc)
                        continue
                    try:
                        self.queue.put_nowait(segment)
                    except queue.Full:
                        self.lost += len(msg.head_versions)
            except Cancelled:
                pass
            except (PolicyClientError, errors.PolyheadError, ValueError) as exc:
                if not self._stop.is_set():
                    self.errors += 1
                    log.warning("experience feed of %s broke (%s); reopening", self.task_id, exc)
                    if self._on_error is not None:
                        self._on_error(exc)
            finally:
                client.close()
            self._stop.wait(0.5)

    def drain(self, *, timeout_s: float) -> list[SegmentData]:
        """Segments received so far; waits up to ``timeout_s`` for the first one when none is queued."""
        out: list[SegmentData] = []
        try:
            out.append(self.queue.get(timeout=timeout_s))
        except queue.Empty:
            return out
        while True:
            try:
                out.append(self.queue.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            if self._client is not None:
                self._client.close()
        self._thread.join(timeout=10)
