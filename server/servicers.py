"""gRPC servicers: translate protobuf to data-plane / registry calls and back, nothing else.

Every RPC runs inside :func:`_rpc`, which turns typed polyhead errors into status codes through
``polyhead.server.status`` (the one table) and records ``polyhead_requests_total`` and
``polyhead_request_duration_seconds``. Only a server bug can yield ``INTERNAL``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from polyhead.errors import InvalidArgument
from polyhead.server.dataplane import DataPlane
from polyhead.server.experience import ExperienceHub, Segment, Transition
from polyhead.server.metrics import ServerMetrics
from polyhead.server.monitor import LiveReturnWatch
from polyhead.server.readahead import read_ahead
from polyhead.server.registry import HeadRegistry, LoadedHead, LoadResult, TaskHeads, gc_paused
from polyhead.server.status import code_label, status_for
from polyhead.server.tracing import DISABLED, Tracer
from polyhead.spaces import space_to_proto
from polyhead.tensors import from_proto, is_empty, to_proto
from polyhead.v1 import admin_pb2, admin_pb2_grpc, policy_pb2, policy_pb2_grpc

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
Req = TypeVar("Req")
Resp = TypeVar("Resp")
UNKNOWN_TASK_LABEL = "unknown"


class _Observer:
    """Records request metrics; the task label is limited to served tasks (bounded cardinality)."""

    def __init__(self, metrics: ServerMetrics, registry: HeadRegistry) -> None:
        self.metrics = metrics
        self.registry = registry
        # Label lookups cost more than the increments: keep the children (bounded: served tasks x codes).
        self._children: dict[tuple[str, str, grpc.StatusCode], tuple[Any, Any]] = {}

    def task_label(self, task_id: str) -> str:
        return task_id if task_id in self.registry.tasks or not task_id else UNKNOWN_TASK_LABEL

    def record(self, method: str, task_id: str, code: grpc.StatusCode, started: float) -> None:
        key = (method, task_id, code)
        children = self._children.get(key)
        if children is None:
            task = self.task_label(task_id)
            children = (
                self.metrics.requests.labels(method=method, task=task, code=code_label(code)),
                self.metrics.request_duration.labels(method=method, task=task),
            )
            if task != UNKNOWN_TASK_LABEL:
                self._children[key] = children
        children[0].inc()
        children[1].observe(time.perf_counter() - started)


def _translate(exc: BaseException, method: str) -> tuple[grpc.StatusCode, str]:
    """Status code and message for an exception raised while serving ``method``."""
    code = status_for(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.error("%s failed with a server error", method, exc_info=exc)
        return code, f"internal server error in {method} ({type(exc).__name__}); see the server log"
    return code, str(exc)


def _rpc(
    method: str, *, traced: bool = False
) -> Callable[
    [Callable[[Any, Req, Context], Awaitable[Resp]]], Callable[[Any, Req, Context], Awaitable[Resp]]
]:
    """Unary / client-streaming RPC wrapper: error translation and request metrics; with ``traced``, a span
    per call when the servicer's tracer is on."""

    def wrap(
        fn: Callable[[Any, Req, Context], Awaitable[Resp]],
    ) -> Callable[[Any, Req, Context], Awaitable[Resp]]:
        @functools.wraps(fn)
        async def handler(self: Any, request: Req, context: Context) -> Resp:
            started = time.perf_counter()
            task_id = str(getattr(request, "task_id", ""))
            response: Resp
            try:
                if traced and self._tracer.enabled:
                    response = await self._tracer.call(method, context, fn(self, request, context))
                else:
                    response = await fn(self, request, context)
            except asyncio.CancelledError:
                self._observer.record(method, task_id, grpc.StatusCode.CANCELLED, started)
                raise
            except Exception as exc:
                code, message = _translate(exc, method)
                self._observer.record(method, task_id, code, started)
                await context.abort(code, message)
            self._observer.record(method, task_id, grpc.StatusCode.OK, started)
            return response

        return handler

    return wrap


def _deadline(context: Context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


# --- PolicyService ------------------------------------------------------------------------------------
class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):
    def __init__(
        self,
        plane: DataPlane,
        observer: _Observer,
        live: LiveReturnWatch | None = None,
        tracer: Tracer = DISABLED,
    ) -> None:
        self._plane = plane
        self._observer = observer
        self._live = live
        self._tracer = tracer

    @_rpc("Act", traced=True)
    async def Act(self, request: policy_pb2.ActRequest, context: Context) -> policy_pb2.ActResponse:
        obs = from_proto(request.observations, field="observations")
        out = await self._plane.act(
            request.task_id,
            obs,
            deterministic=request.deterministic,
            seed=request.seed if request.HasField("seed") else None,
            version=request.version,
            episode_ids=request.episode_ids,
            steps=request.steps,
            want_log_prob=request.return_log_prob,
            want_value=request.return_value,
            deadline=_deadline(context),
        )
        a = out.actions

        def pick(x: Any) -> Any:
            return x if out.batched else x[0, ...]  # a 0-d array, not a numpy scalar: to_proto's fast path

        response = policy_pb2.ActResponse(
            task_id=out.task_id, head_version=out.version, head_versions=out.row_versions
        )
        to_proto(pick(a.env), response.actions)
        if request.return_log_prob:
            to_proto(pick(a.log_prob), response.log_probs)
            if a.raw.dtype.kind == "f":
                to_proto(pick(a.raw), response.raw_actions)
        if request.return_value:
            to_proto(pick(a.value), response.values)
        return response

    async def ActStream(
        self, request_iterator: AsyncIterator[policy_pb2.StepRequest], context: Context
    ) -> AsyncIterator[policy_pb2.StepResponse]:
        messages = aiter(request_iterator)
        while True:
            started = time.perf_counter()
            task_id = ""
            try:
                request = await anext(messages)
                task_id = request.task_id
                if self._tracer.enabled:
                    response = await self._tracer.call("ActStream", context, self._step(request, context))
                else:
                    response = await self._step(request, context)
            except StopAsyncIteration:
                return
            except Exception as exc:  # includes a malformed message (DecodeError) from the iterator
                code, message = _translate(exc, "ActStream")
                self._observer.record("ActStream", task_id, code, started)
                await context.abort(code, message)
            self._observer.record("ActStream", task_id, grpc.StatusCode.OK, started)
            yield response

    async def _step(self, request: policy_pb2.StepRequest, context: Context) -> policy_pb2.StepResponse:
        obs = None if is_empty(request.observation) else from_proto(request.observation, field="observation")
        feedback = request.feedback if request.HasField("feedback") else None
        out = await self._plane.step(
            request.task_id,
            request.episode_id,
            obs,
            reward=None if feedback is None else feedback.reward,
            terminated=feedback is not None and feedback.terminated,
            truncated=feedback is not None and feedback.truncated,
            deterministic=request.deterministic,
            seed=request.seed if request.HasField("seed") else None,
            deadline=_deadline(context),
            feedback_step=feedback.step if feedback is not None and feedback.HasField("step") else None,
            final_observation=_final_observation(feedback.final_observation, "feedback.final_observation")
            if feedback is not None
            else None,
            want_value=request.return_value,
        )
        response = policy_pb2.StepResponse(
            task_id=request.task_id, episode_id=request.episode_id, head_version=out.version, step=out.step
        )
        if out.actions is not None:
            to_proto(out.actions.env[0, ...], response.action)
            if request.return_log_prob:
                to_proto(out.actions.log_prob[0, ...], response.log_prob)
            if request.return_value:
                to_proto(out.actions.value[0, ...], response.value)
        return response

    @_rpc("ListTasks")
    async def ListTasks(
        self, request: policy_pb2.ListTasksRequest, context: Context
    ) -> policy_pb2.ListTasksResponse:
        registry = self._plane.registry
        response = policy_pb2.ListTasksResponse(
            trunk_sha256=registry.manifest.trunk_sha256,
            observation_size=registry.manifest.observation_size,
            max_batch_size=self._plane.max_batch_size,
        )
        for entry in self._plane.tasks():
            meta = entry.active_head.meta
            state = self._live.state(entry.task_id) if self._live is not None else None
            response.tasks.append(
                policy_pb2.TaskInfo(
                    task_id=entry.task_id,
                    spec=meta.task.to_proto(),
                    observation_space=space_to_proto(meta.observation_space),
                    action_space=space_to_proto(meta.action_space),
                    active_version=entry.active,
                    loaded_versions=sorted(entry.versions),
                    canary_version=entry.canary,
                    canary_percent=entry.canary_percent,
                    regressed=state is not None and state.regressed,
                    regression_detail=state.last_test.describe()
                    if state is not None and state.last_test is not None
                    else "",
                    reference_return=state.reference_mean if state is not None else math.nan,
                )
            )
        return response

    @_rpc("ReportExperience")
    async def ReportExperience(
        self, request_iterator: AsyncIterator[policy_pb2.ExperienceReport], context: Context
    ) -> policy_pb2.ReportExperienceResponse:
        accepted = dropped = completed = 0
        async for report in request_iterator:
            transition = None
            if not is_empty(report.observation):
                if is_empty(report.action):
                    raise InvalidArgument("a reported transition with an observation also needs its action")
                transition = Transition(
                    observation=from_proto(report.observation, field="observation"),  # type: ignore[arg-type]
                    action=from_proto(report.action, field="action"),
                    log_prob=report.log_prob,
                    head_version=report.head_version,
                    deterministic=report.deterministic,
                )
            outcome = self._plane.report(
                report.task_id,
                report.episode_id,
                reward=report.reward,
                terminated=report.terminated,
                truncated=report.truncated,
                transition=transition,
                step=report.step if report.HasField("step") else None,
                final_observation=_final_observation(report.final_observation, "final_observation"),
            )
            accepted += outcome.accepted
            dropped += not outcome.accepted
            completed += outcome.completed
        return policy_pb2.ReportExperienceResponse(
            accepted=accepted, dropped=dropped, episodes_completed=completed
        )


def _final_observation(tensor: Any, field: str) -> Any:
    """A truncation's final observation (None when the message carries none)."""
    return None if is_empty(tensor) else from_proto(tensor, field=field)


class DiagnosticsServicer(policy_pb2_grpc.DiagnosticsServicer):
    """The benchmark floor: no metrics, no work, the same stack."""

    async def Echo(self, request: policy_pb2.EchoRequest, context: Context) -> policy_pb2.EchoResponse:
        return policy_pb2.EchoResponse(payload=request.payload)


# --- HeadAdmin ----------------------------------------------------------------------------------------
def head_info(head: LoadedHead, active: bool, canary_percent: float | None = None) -> admin_pb2.HeadInfo:
    """``canary_percent``: set when ``head`` is its task's canary."""
    return admin_pb2.HeadInfo(
        canary=canary_percent is not None,
        canary_percent=canary_percent or 0.0,
        task_id=head.task_id,
        version=head.version,
        active=active,
        head_sha256=head.head_sha256,
        trunk_sha256=head.meta.trunk_sha256,
        loaded_at=head.loaded_at,
        eval_return=head.eval_return,
        source=head.source,
        spec=head.meta.task.to_proto(),
    )


def segment_to_proto(segment: Segment) -> admin_pb2.EpisodeSegment:
    msg = admin_pb2.EpisodeSegment(
        task_id=segment.task_id,
        episode_id=segment.episode_id,
        head_versions=segment.head_versions,
        terminated=segment.terminated,
        truncated=segment.truncated,
        start_step=segment.start_step,
        episode_return=segment.episode_return if not math.isnan(segment.episode_return) else 0.0,
        episode_length=segment.episode_length,
        deterministic=segment.deterministic,
        episode_ordinal=segment.episode_ordinal,
    )
    to_proto(segment.observations, msg.observations)
    to_proto(segment.actions, msg.actions)
    to_proto(segment.log_probs, msg.log_probs)
    to_proto(segment.rewards, msg.rewards)
    if segment.next_observation is not None:
        to_proto(segment.next_observation, msg.next_observation)
    return msg


# LoadHeads reads at most this much ahead of its loads (a head may be as large as the message limit).
_READ_AHEAD_BYTES = 8 << 20


class HeadAdminServicer(admin_pb2_grpc.HeadAdminServicer):
    def __init__(self, registry: HeadRegistry, hub: ExperienceHub, observer: _Observer) -> None:
        self._registry = registry
        self._hub = hub
        self._observer = observer

    @_rpc("LoadHead")
    async def LoadHead(
        self, request: admin_pb2.LoadHeadRequest, context: Context
    ) -> admin_pb2.LoadHeadResponse:
        # Loading parses, checks and (for a session) warms up a head: off the event loop.
        return await asyncio.to_thread(self._load, request)

    async def LoadHeads(
        self, request_iterator: AsyncIterator[admin_pb2.LoadHeadRequest], context: Context
    ) -> AsyncIterator[admin_pb2.LoadHeadResponse]:
        batches = read_ahead(
            request_iterator, max_bytes=_READ_AHEAD_BYTES, size=admin_pb2.LoadHeadRequest.ByteSize
        )
        index = 0
        try:
            while True:
                started = time.perf_counter()
                try:
                    batch = await anext(batches)
                except StopAsyncIteration:
                    return
                except Exception as exc:  # reading the next message failed (undecodable)
                    await self._abort_load(context, exc, index, "", started)
                    return  # not reached: abort raises
                outcomes = await asyncio.to_thread(self._load_in_order, batch)
                for request, outcome in zip(batch, outcomes, strict=False):
                    if isinstance(outcome, Exception):
                        await self._abort_load(context, outcome, index, request.task_id, started)
                        return  # not reached: abort raises
                    self._observer.record("LoadHeads", request.task_id, grpc.StatusCode.OK, started)
                    index += 1
                    yield outcome
        finally:
            await batches.aclose()

    def _load_in_order(
        self, requests: list[admin_pb2.LoadHeadRequest]
    ) -> list[admin_pb2.LoadHeadResponse | Exception]:
        """Load each request in turn; a refused one ends the list (the rest are not loaded)."""
        out: list[admin_pb2.LoadHeadResponse | Exception] = []
        with gc_paused():  # a few loads at a time; what they leave goes at the next collection
            for request in requests:
                try:
                    out.append(self._load(request))
                except Exception as exc:
                    out.append(exc)
                    break
        return out

    async def _abort_load(
        self, context: Context, exc: BaseException, index: int, task_id: str, started: float
    ) -> None:
        code, message = _translate(exc, "LoadHeads")
        self._observer.record("LoadHeads", task_id, code, started)
        where = f"task {task_id!r}, " if task_id else ""
        await context.abort(code, f"LoadHeads request {index} ({where}earlier ones loaded): {message}")

    def _load(self, request: admin_pb2.LoadHeadRequest) -> admin_pb2.LoadHeadResponse:
        """One LoadHead request, in the calling (worker) thread."""
        source = request.WhichOneof("source")
        wants_canary = request.HasField("canary_percent")
        if wants_canary:  # checked before loading: a refused request changes nothing
            if request.activate:
                raise InvalidArgument("LoadHead takes canary_percent only with activate=false")
            self._registry.check_canary_load(request.task_id, request.canary_percent)
        result: LoadResult
        if source == "onnx":
            result = self._registry.load_from_bytes(
                request.task_id,
                request.onnx,
                request.head_json,
                encoder=request.encoder_onnx,
                version=request.version,
                activate=request.activate,
            )
        elif source == "repository_path":
            result = self._registry.load_from_path(
                request.task_id,
                request.repository_path,
                version=request.version,
                activate=request.activate,
            )
        else:
            raise InvalidArgument("LoadHead needs `onnx` bytes (with head_json) or a `repository_path`")
        canary: float | None = None
        if wants_canary:
            self._registry.set_canary(request.task_id, result.head.version, request.canary_percent)
            canary = request.canary_percent
        return admin_pb2.LoadHeadResponse(
            head=head_info(result.head, result.active_version == result.head.version, canary),
            active_version=result.active_version,
            load_seconds=result.load_seconds,
        )

    @_rpc("SetActiveVersion")
    async def SetActiveVersion(
        self, request: admin_pb2.SetActiveVersionRequest, context: Context
    ) -> admin_pb2.SetActiveVersionResponse:
        swap = self._registry.set_active(request.task_id, request.version)
        return admin_pb2.SetActiveVersionResponse(
            previous_version=swap.previous_version,
            active_version=swap.active_version,
            swap_seconds=swap.swap_seconds,
        )

    @_rpc("UnloadHead")
    async def UnloadHead(
        self, request: admin_pb2.UnloadHeadRequest, context: Context
    ) -> admin_pb2.UnloadHeadResponse:
        removed = self._registry.unload(request.task_id, request.version, all_versions=request.all_versions)
        return admin_pb2.UnloadHeadResponse(unloaded_versions=removed)

    @_rpc("ListHeads")
    async def ListHeads(
        self, request: admin_pb2.ListHeadsRequest, context: Context
    ) -> admin_pb2.ListHeadsResponse:
        tasks = self._registry.tasks
        if request.task_id and request.task_id not in tasks:
            self._registry.resolve(request.task_id)  # raises UnknownTask
        response = admin_pb2.ListHeadsResponse()
        for task_id, entry in sorted(tasks.items()):
            if request.task_id and task_id != request.task_id:
                continue
            for version, head in sorted(entry.versions.items()):
                canary = entry.canary_percent if version == entry.canary else None
                response.heads.append(head_info(head, version == entry.active, canary))
        return response

    @_rpc("SetCanary")
    async def SetCanary(self, request: admin_pb2.SetCanaryRequest, context: Context) -> admin_pb2.CanaryState:
        entry = self._registry.set_canary(request.task_id, request.version, request.canary_percent)
        return _canary_state(entry)

    @_rpc("PromoteCanary")
    async def PromoteCanary(
        self, request: admin_pb2.PromoteCanaryRequest, context: Context
    ) -> admin_pb2.SetActiveVersionResponse:
        swap = self._registry.promote_canary(request.task_id, request.version)
        return admin_pb2.SetActiveVersionResponse(
            previous_version=swap.previous_version,
            active_version=swap.active_version,
            swap_seconds=swap.swap_seconds,
        )

    @_rpc("ClearCanary")
    async def ClearCanary(
        self, request: admin_pb2.ClearCanaryRequest, context: Context
    ) -> admin_pb2.CanaryState:
        cleared = self._registry.clear_canary(request.task_id)
        state = _canary_state(self._registry.tasks[request.task_id])
        state.cleared_version = cleared
        return state

    async def StreamExperience(
        self, request: admin_pb2.StreamExperienceRequest, context: Context
    ) -> AsyncIterator[admin_pb2.EpisodeSegment]:
        started = time.perf_counter()
        subscription = self._hub.subscribe(request.task_ids)
        try:
            async for segment in subscription:
                yield segment_to_proto(segment)
        finally:
            subscription.close()
            self._observer.record("StreamExperience", "", grpc.StatusCode.OK, started)


def _canary_state(entry: TaskHeads) -> admin_pb2.CanaryState:
    return admin_pb2.CanaryState(
        task_id=entry.task_id,
        stable_version=entry.active,
        canary_version=entry.canary,
        canary_percent=entry.canary_percent,
    )


def make_observer(metrics: ServerMetrics, registry: HeadRegistry) -> _Observer:
    return _Observer(metrics, registry)
