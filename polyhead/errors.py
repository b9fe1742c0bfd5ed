"""Typed domain errors shared by every part of polyhead.

Each error says what was wrong and what was expected. The server maps these classes to gRPC status codes
in exactly one table (``server/status.py``); the clients map status codes back to the client-side
exceptions in ``clients/errors.py``. Nothing branches on message text.
"""

from __future__ import annotations


class PolyheadError(Exception):
    """Base class of every polyhead domain error."""


# --- the caller asked for something that does not exist -------------------------------------------------
class UnknownTask(PolyheadError):
    """A task id that is not served (or not in the suite)."""


class UnknownVersion(PolyheadError):
    """A head version that is not loaded for the task."""


# --- the caller sent something malformed ---------------------------------------------------------------
class InvalidArgument(PolyheadError):
    """A request field is missing or malformed."""


class InvalidObservation(InvalidArgument):
    """Observation of the wrong shape or dtype, or containing NaN/inf."""


class BatchTooLarge(InvalidArgument):
    """More observations in one request than the server's max batch size."""


class InvalidExperience(InvalidArgument):
    """A reported reward, action, log-prob, head version or observation that must not reach training.

    ``reason`` is the ``polyhead_experience_dropped_total`` label it is counted under (``invalid_reward``,
    ``invalid_action``, ``invalid_log_prob``, ``unknown_version``, ``invalid_observation``,
    ``invalid_step``).
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class InvalidTaskSpec(PolyheadError):
    """A task spec or suite file that cannot describe a buildable environment."""


class CorruptHead(InvalidArgument):
    """Head bytes or metadata that are not a well-formed head (bad ONNX, bad JSON)."""


# --- the request is well-formed but the state does not allow it ----------------------------------------
class IncompatibleHead(PolyheadError):
    """A head that cannot run on the serving trunk (other trunk hash, feature size or action spec)."""


class VersionConflict(PolyheadError):
    """A version number that is already loaded with different contents."""


class ActiveVersionInUse(PolyheadError):
    """An attempt to unload the version that is serving."""


class CanaryError(PolyheadError):
    """A canary change the task's state does not allow (the stable version as canary, promoting none)."""


# --- bundle (model repository) problems ----------------------------------------------------------------
class BundleError(PolyheadError):
    """A bundle directory that cannot be read as a complete, consistent bundle."""


class BundleNotFound(BundleError):
    """The bundle (or a file it names) does not exist."""


class BundleIntegrityError(BundleError):
    """A file whose sha256 differs from the one recorded in the bundle."""


class UnsupportedBundleVersion(BundleError):
    """A manifest written by a newer (or unknown) bundle format version."""


# --- capacity and lifecycle ----------------------------------------------------------------------------
class Overloaded(PolyheadError):
    """The request queue is full; retry later."""


class DeadlineExpired(PolyheadError):
    """The request's deadline passed before it could be served."""


class ShuttingDown(PolyheadError):
    """The server is draining and accepts no new work."""


class Unauthenticated(PolyheadError):
    """An admin call without the configured bearer token."""


# --- a command cannot use what it was given ------------------------------------------------------------
class UsageError(PolyheadError):
    """A command's input cannot be used: a port already taken, an unreadable file, a server that does not
    answer. The message says what was wrong and how to fix it; ``polyhead`` prints it as one line and
    exits with status 2 (as it does for BundleError, InvalidTaskSpec and InvalidArgument)."""


class ExportParityError(PolyheadError):
    """An exported ONNX model disagrees with the torch module it came from."""
