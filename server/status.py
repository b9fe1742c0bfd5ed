"""The one table from polyhead's typed errors to gRPC status codes.

Servicers raise (or let through) :class:`polyhead.errors.PolyheadError` subclasses; :func:`status_for`
picks the code from :data:`STATUS_TABLE` (most specific class first). Anything else is a server bug and
becomes ``INTERNAL``; no client mistake may reach that branch.
"""

from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError

from polyhead import errors

STATUS_TABLE: tuple[tuple[type[errors.PolyheadError], grpc.StatusCode], ...] = (
    (errors.UnknownTask, grpc.StatusCode.NOT_FOUND),
    (errors.UnknownVersion, grpc.StatusCode.NOT_FOUND),
    (errors.BundleNotFound, grpc.StatusCode.NOT_FOUND),
    # InvalidObservation, InvalidExperience, BatchTooLarge and CorruptHead are InvalidArgument subclasses.
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.InvalidTaskSpec, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.IncompatibleHead, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ActiveVersionInUse, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.CanaryError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.VersionConflict, grpc.StatusCode.ALREADY_EXISTS),
    (errors.BundleIntegrityError, grpc.StatusCode.DATA_LOSS),
    (errors.UnsupportedBundleVersion, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.BundleError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.DeadlineExpired, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.ShuttingDown, grpc.StatusCode.UNAVAILABLE),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.ExportParityError, grpc.StatusCode.FAILED_PRECONDITION),
)


# Malformed request bytes in a request stream (decoded as the servicer iterates): the client's mistake.
TRANSPORT_TABLE: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (DecodeError, grpc.StatusCode.INVALID_ARGUMENT),
)


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The gRPC code for an exception: the first matching table row, else INTERNAL."""
    for cls, code in (*STATUS_TABLE, *TRANSPORT_TABLE):
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def code_label(code: grpc.StatusCode) -> str:
    """The metrics label for a code, e.g. ``"OK"``, ``"NOT_FOUND"``."""
    return str(code.name)
