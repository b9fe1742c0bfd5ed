"""Client-side exceptions: one class per gRPC status the server uses, carrying its code and message.

The server maps domain errors to status codes in one table (``server/status.py``); :data:`STATUS_ERRORS`
is the inverse, and :func:`from_rpc_error` is the one place that turns a ``grpc.RpcError`` into one of
these classes. Callers catch by class (``except TaskNotFound``) and never inspect message text.
"""

from __future__ import annotations

import grpc


class PolicyClientError(Exception):
    """Base class: a call failed. ``code`` is the gRPC status, ``details`` the server's message."""

    #: The status code this class stands for (the base class covers codes without their own class).
    status: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    #: Whether the client retries a call that failed this way (with backoff, within the deadline).
    retryable: bool = False

    def __init__(self, details: str, *, code: grpc.StatusCode | None = None, attempts: int = 1) -> None:
        self.code = code if code is not None else self.status
        self.details = details
        self.attempts = attempts
        suffix = f" (after {attempts} attempts)" if attempts > 1 else ""
        super().__init__(f"{self.code.name}: {details}{suffix}")


class TaskNotFound(PolicyClientError):
    """NOT_FOUND: the task (or the requested head version, or repository path) is not served."""

    status = grpc.StatusCode.NOT_FOUND


class InvalidRequest(PolicyClientError):
    """INVALID_ARGUMENT: malformed request, e.g. an observation of the wrong shape, NaN, batch too large."""

    status = grpc.StatusCode.INVALID_ARGUMENT


class PreconditionFailed(PolicyClientError):
    """FAILED_PRECONDITION: the server's state refuses the call (incompatible head, active version)."""

    status = grpc.StatusCode.FAILED_PRECONDITION


class AlreadyExists(PolicyClientError):
    """ALREADY_EXISTS: a head version already loaded with other bytes."""

    status = grpc.StatusCode.ALREADY_EXISTS


class Overloaded(PolicyClientError):
    """RESOURCE_EXHAUSTED: the server's queue is full; retried with backoff."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED
    retryable = True


class Unavailable(PolicyClientError):
    """UNAVAILABLE: no server answered (not started, restarting, draining); retried with backoff."""

    status = grpc.StatusCode.UNAVAILABLE
    retryable = True


class DeadlineExceeded(PolicyClientError):
    """DEADLINE_EXCEEDED: the call's deadline passed (client side or in the server's queue)."""

    status = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(PolicyClientError):
    """UNAUTHENTICATED: an admin call without the configured bearer token (or with a wrong one)."""

    status = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(PolicyClientError):
    """PERMISSION_DENIED: the credentials are valid but not allowed this call."""

    status = grpc.StatusCode.PERMISSION_DENIED


class Cancelled(PolicyClientError):
    """CANCELLED: the call was cancelled (by this client, or the stream was closed)."""

    status = grpc.StatusCode.CANCELLED


class Unimplemented(PolicyClientError):
    """UNIMPLEMENTED: the server does not offer this RPC (older server, or the wrong port)."""

    status = grpc.StatusCode.UNIMPLEMENTED


class ServerError(PolicyClientError):
    """INTERNAL / UNKNOWN / DATA_LOSS: a server-side fault; the message says what."""

    status = grpc.StatusCode.INTERNAL


class ProtocolError(PolicyClientError):
    """The server's answer broke the API contract (e.g. an action of the wrong shape)."""

    status = grpc.StatusCode.INTERNAL


#: The one table from status code to exception class.
STATUS_ERRORS: dict[grpc.StatusCode, type[PolicyClientError]] = {
    grpc.StatusCode.NOT_FOUND: TaskNotFound,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequest,
    grpc.StatusCode.FAILED_PRECONDITION: PreconditionFailed,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
    grpc.StatusCode.INTERNAL: ServerError,
    grpc.StatusCode.UNKNOWN: ServerError,
    grpc.StatusCode.DATA_LOSS: ServerError,
    grpc.StatusCode.ABORTED: ServerError,
}

#: Codes a call is retried on; everything else fails at once.
RETRYABLE_CODES: frozenset[grpc.StatusCode] = frozenset(
    code for code, cls in STATUS_ERRORS.items() if cls.retryable
)


def error_for(code: grpc.StatusCode, details: str, *, attempts: int = 1) -> PolicyClientError:
    """The exception for a status code and the server's message."""
    cls = STATUS_ERRORS.get(code, PolicyClientError)
    return cls(details, code=code, attempts=attempts)


def from_rpc_error(exc: grpc.RpcError, *, attempts: int = 1) -> PolicyClientError:
    """Translate a failed call (sync ``grpc.Call`` or ``grpc.aio.AioRpcError``) into its typed error."""
    code_fn = getattr(exc, "code", None)
    details_fn = getattr(exc, "details", None)
    code = code_fn() if callable(code_fn) else grpc.StatusCode.UNKNOWN
    details = (details_fn() if callable(details_fn) else None) or str(exc)
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    return error_for(code, details, attempts=attempts)
