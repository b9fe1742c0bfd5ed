"""Bearer-token check for the control plane, checked by the per-method call wrapper
(:mod:`polyhead.server.calls`).

When a token is configured, every call to a guarded service (``polyhead.v1.HeadAdmin``) needs the metadata
``authorization: Bearer <token>``; anything else ends with ``UNAUTHENTICATED`` before the servicer runs.
Other services on the same server (health, reflection, the data plane in ``admin_mode="shared"``) pass.
"""

from __future__ import annotations

import hmac
from typing import Any

import grpc

GUARDED_PREFIX = "/polyhead.v1.HeadAdmin/"


class TokenCheck:
    """Checks the ``authorization: Bearer <token>`` metadata of calls to ``/polyhead.v1.HeadAdmin/*``."""

    def __init__(self, token: str, *, guarded_prefix: str = GUARDED_PREFIX) -> None:
        self._expected = f"Bearer {token}".encode()
        self._prefix = guarded_prefix

    def guards(self, method: str) -> bool:
        """Whether calls to ``method`` (``/pkg.Service/Method``) need the token."""
        return method.startswith(self._prefix)

    async def check(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """Return when the call carries the token; else abort it with UNAUTHENTICATED."""
        supplied = b""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                supplied = value.encode() if isinstance(value, str) else value
        if not hmac.compare_digest(supplied, self._expected):
            why = "missing" if not supplied else "wrong"
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"{why} admin token: send metadata `authorization: Bearer <token>`",
            )
