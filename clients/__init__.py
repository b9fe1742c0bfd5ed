"""polyhead clients: talk to a polyhead policy server from Python (``pip install 'polyhead[client]'``).

* :class:`PolicyClient` / :class:`AsyncPolicyClient`: numpy in, numpy out; deadlines, retries on
  UNAVAILABLE / RESOURCE_EXHAUSTED with jittered backoff, TLS, typed errors (:mod:`polyhead.clients.errors`).
* ``client.session(task)``: an ``ActStream`` session for one simulator loop (:mod:`polyhead.clients.session`).
* :class:`RemotePolicy`: ``policy(obs) -> action`` for your own loops and gymnasium vector envs.
* :class:`AdminClient`: load, activate, roll back, unload and list heads (``HeadAdmin``).
* :mod:`polyhead.clients.simulator`: drive gymnasium environments through the server (``polyhead simulate``).
* :mod:`polyhead.clients.bench`: the load generator behind ``polyhead bench``.

This package imports neither torch nor onnxruntime, nor anything from ``server`` or ``trainer``.
"""

from polyhead.clients.admin import AdminClient
from polyhead.clients.async_policy_client import AsyncPolicyClient
from polyhead.clients.catalog import RemoteTask, TaskCatalog
from polyhead.clients.channel import ChannelConfig
from polyhead.clients.codec import ActResult, StepResult
from polyhead.clients.errors import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    InvalidRequest,
    Overloaded,
    PermissionDenied,
    PolicyClientError,
    PreconditionFailed,
    ProtocolError,
    ServerError,
    TaskNotFound,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from polyhead.clients.policy_client import PolicyClient, ReportSummary, experience_report
from polyhead.clients.remote_policy import RemotePolicy
from polyhead.clients.retry import RetryPolicy
from polyhead.clients.session import AsyncSession, Session

__all__ = [
    "ActResult",
    "AdminClient",
    "AlreadyExists",
    "AsyncPolicyClient",
    "AsyncSession",
    "Cancelled",
    "ChannelConfig",
    "DeadlineExceeded",
    "InvalidRequest",
    "Overloaded",
    "PermissionDenied",
    "PolicyClient",
    "PolicyClientError",
    "PreconditionFailed",
    "ProtocolError",
    "RemotePolicy",
    "RemoteTask",
    "ReportSummary",
    "RetryPolicy",
    "ServerError",
    "Session",
    "StepResult",
    "TaskCatalog",
    "TaskNotFound",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "experience_report",
]
