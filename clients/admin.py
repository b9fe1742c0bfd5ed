"""A client for the control plane (``HeadAdmin``): load, activate, roll back, unload and list heads.

The admin service usually listens on its own port and, when the server has a token configured, needs
``authorization: Bearer <token>`` on every call: pass ``token=`` (or a ChannelConfig with one).
Admin calls are retried like data-plane calls (UNAVAILABLE / RESOURCE_EXHAUSTED only): every one of them
is idempotent or guarded by the server (a version loaded twice with the same bytes is accepted).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc

from polyhead.clients.channel import ChannelConfig, as_config
from polyhead.clients.errors import from_rpc_error
from polyhead.clients.policy_client import DEFAULT_TIMEOUT_S
from polyhead.clients.retry import RetryPolicy, call_with_retry
from polyhead.v1 import admin_pb2, admin_pb2_grpc


@dataclass(frozen=True)
class SwapResult:
    previous_version: int
    active_version: int
    swap_seconds: float


def load_request(
    task_id: str,
    *,
    onnx: bytes | None = None,
    head_json: str = "",
    encoder: bytes | None = None,
    repository_path: str | None = None,
    version: int = 0,
    activate: bool = True,
    canary_percent: float | None = None,
) -> admin_pb2.LoadHeadRequest:
    """One ``LoadHead`` request: a task version from bytes (``onnx`` + ``head_json``, and ``encoder`` for a
    format-2 bundle) or from the server's bundle (``repository_path`` = ``heads/<task>/<version>``);
    ``version`` 0 means the next free one; ``canary_percent`` (with ``activate=False``): make it the
    task's canary at that share."""
    if (onnx is None) == (repository_path is None):
        raise ValueError("give exactly one of onnx (with head_json) or repository_path")
    req = admin_pb2.LoadHeadRequest(task_id=task_id, version=version, activate=activate)
    if canary_percent is not None:
        req.canary_percent = canary_percent
    if onnx is not None:
        req.onnx = onnx
        req.head_json = head_json
        if encoder is not None:
            req.encoder_onnx = encoder
    else:
        req.repository_path = str(repository_path)
    return req


def dir_request(
    task_id: str, head_dir: str | Path, *, version: int = 0, activate: bool = True
) -> admin_pb2.LoadHeadRequest:
    """The :func:`load_request` uploading a version directory from this machine (``head.onnx`` +
    ``head.json``, and ``encoder.onnx`` when it has one)."""
    head_dir = Path(head_dir)
    encoder = head_dir / "encoder.onnx"
    return load_request(
        task_id,
        onnx=(head_dir / "head.onnx").read_bytes(),
        head_json=(head_dir / "head.json").read_text(encoding="utf-8"),
        encoder=encoder.read_bytes() if encoder.is_file() else None,
        version=version,
        activate=activate,
    )


class AdminClient:
    """Blocking ``HeadAdmin`` client. Methods return the response messages (``admin_pb2``)."""

    def __init__(
        self,
        target: str | ChannelConfig,
        *,
        token: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy | None = None,
        **channel_options: Any,
    ) -> None:
        if token is not None:
            channel_options["token"] = token
        self.config = as_config(target, **channel_options)
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._rng = random.Random()
        self._channel = self.config.sync_channel()
        self._stub: Any = admin_pb2_grpc.HeadAdminStub(self._channel)  # type: ignore[no-untyped-call]
        self._metadata = self.config.metadata()

    def _unary(self, method: Any, request: Any, timeout: float | None) -> Any:
        return call_with_retry(
            lambda left: method(request, timeout=left, metadata=self._metadata),
            policy=self.retry,
            timeout=self.timeout if timeout is None else timeout,
            rng=self._rng,
        )

    def load_head(
        self,
        task_id: str,
        *,
        onnx: bytes | None = None,
        head_json: str = "",
        encoder: bytes | None = None,
        repository_path: str | None = None,
        version: int = 0,
        activate: bool = True,
        canary_percent: float | None = None,
        timeout: float | None = None,
    ) -> admin_pb2.LoadHeadResponse:
        """Load a task version from bytes (``onnx`` + ``head_json``, and ``encoder`` for a format-2 bundle)
        or from the server's bundle (``repository_path`` = ``heads/<task>/<version>``); ``version`` 0
        means the next free one. ``canary_percent`` (with ``activate=False``): make it the task's canary
        at that share."""
        req = load_request(
            task_id,
            onnx=onnx,
            head_json=head_json,
            encoder=encoder,
            repository_path=repository_path,
            version=version,
            activate=activate,
            canary_percent=canary_percent,
        )
        resp: admin_pb2.LoadHeadResponse = self._unary(self._stub.LoadHead, req, timeout)
        return resp

    def load_heads(
        self, requests: Iterable[admin_pb2.LoadHeadRequest], *, timeout: float | None = None
    ) -> Iterator[admin_pb2.LoadHeadResponse]:
        """Load many versions over one ``LoadHeads`` stream (build each request with
        :func:`load_request`): yields one response per request, in order, while the requests are still
        being sent. The first refused request ends the stream with its typed error, whose message names its
        index; the versions answered before it stay loaded. The server loads what it has read in batches,
        so a call that ends early may have loaded some versions after the last answer. An exception raised
        while iterating ``requests`` ends the stream and is raised as itself after the answers before it.
        ``timeout`` bounds the whole stream (default: none). Not retried: a request with ``version`` 0 is
        not idempotent."""
        failed: list[Exception] = []

        def sent() -> Iterator[admin_pb2.LoadHeadRequest]:
            # An error making the requests (a missing file) ends the stream here and is raised as itself,
            # not as the UNKNOWN status gRPC would give the call.
            try:
                yield from requests
            except Exception as exc:
                failed.append(exc)

        call = self._stub.LoadHeads(sent(), timeout=timeout, metadata=self._metadata)
        try:
            yield from call
        except grpc.RpcError as exc:
            if failed:
                raise failed[0] from None
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()
        if failed:  # the requests before it were all loaded
            raise failed[0]

    def load_head_dir(
        self, task_id: str, head_dir: str | Path, *, version: int = 0, activate: bool = True
    ) -> admin_pb2.LoadHeadResponse:
        """Upload a version directory from this machine (``head.onnx`` + ``head.json``, and
        ``encoder.onnx`` when it has one)."""
        req = dir_request(task_id, head_dir, version=version, activate=activate)
        resp: admin_pb2.LoadHeadResponse = self._unary(self._stub.LoadHead, req, None)
        return resp

    def set_active_version(self, task_id: str, version: int, *, timeout: float | None = None) -> SwapResult:
        resp = self._unary(
            self._stub.SetActiveVersion,
            admin_pb2.SetActiveVersionRequest(task_id=task_id, version=version),
            timeout,
        )
        return SwapResult(resp.previous_version, resp.active_version, resp.swap_seconds)

    def set_canary(
        self, task_id: str, version: int, percent: float, *, timeout: float | None = None
    ) -> admin_pb2.CanaryState:
        """Make loaded ``version`` the task's canary at ``percent`` of traffic (or change its share)."""
        resp: admin_pb2.CanaryState = self._unary(
            self._stub.SetCanary,
            admin_pb2.SetCanaryRequest(task_id=task_id, version=version, canary_percent=percent),
            timeout,
        )
        return resp

    def promote_canary(self, task_id: str, version: int = 0, *, timeout: float | None = None) -> SwapResult:
        """The canary (which must be ``version`` unless 0) becomes the stable version."""
        resp = self._unary(
            self._stub.PromoteCanary,
            admin_pb2.PromoteCanaryRequest(task_id=task_id, version=version),
            timeout,
        )
        return SwapResult(resp.previous_version, resp.active_version, resp.swap_seconds)

    def clear_canary(self, task_id: str, *, timeout: float | None = None) -> admin_pb2.CanaryState:
        """All traffic to the stable version again; ``cleared_version`` names the former canary."""
        resp: admin_pb2.CanaryState = self._unary(
            self._stub.ClearCanary, admin_pb2.ClearCanaryRequest(task_id=task_id), timeout
        )
        return resp

    def unload_head(
        self, task_id: str, version: int = 0, *, all_versions: bool = False, timeout: float | None = None
    ) -> list[int]:
        resp = self._unary(
            self._stub.UnloadHead,
            admin_pb2.UnloadHeadRequest(task_id=task_id, version=version, all_versions=all_versions),
            timeout,
        )
        return list(resp.unloaded_versions)

    def list_heads(self, task_id: str = "", *, timeout: float | None = None) -> list[admin_pb2.HeadInfo]:
        resp = self._unary(self._stub.ListHeads, admin_pb2.ListHeadsRequest(task_id=task_id), timeout)
        return list(resp.heads)

    def versions(self, task_id: str) -> tuple[list[int], int]:
        """(loaded versions ascending, active version) of one task."""
        heads = self.list_heads(task_id)
        active = next((h.version for h in heads if h.active), 0)
        return sorted(h.version for h in heads if h.task_id == task_id), active

    def stream_experience(
        self, task_ids: Sequence[str] = (), *, timeout: float | None = None
    ) -> Iterator[admin_pb2.EpisodeSegment]:
        """Episode segments as the server assembles them (from now on); iterate, and ``close()`` the
        client (or let ``timeout`` pass) to stop. Errors are raised typed while iterating."""
        call = self._stub.StreamExperience(
            admin_pb2.StreamExperienceRequest(task_ids=list(task_ids)),
            timeout=timeout,
            metadata=self._metadata,
        )
        try:
            yield from call
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
