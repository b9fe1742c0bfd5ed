"""Keep Ray Serve's gRPC proxy on 127.0.0.1 (imported by every Python process of the Ray peer).

Ray Serve 2.60 binds its gRPC proxy to ``[::]:PORT`` and each replica's inter-deployment gRPC server to
``[::]:0``, with no host option for either (``HTTPOptions.host`` covers only the HTTP proxy).
``run_peers.py`` puts this folder on the Ray processes' ``PYTHONPATH``; when the two modules that bind
those ports are first imported, the binding function is wrapped so that a wildcard host (``[::]``,
``0.0.0.0``) becomes 127.0.0.1 on the same port. Nothing else is changed.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

# module -> the function in it that takes (server, "host:port") and binds the port
_TARGETS = {
    "ray.serve._private.default_impl": "add_grpc_address",
    "ray._common.tls_utils": "add_port_to_grpc_server",
}
_WILDCARDS = ("[::]", "0.0.0.0", "")


def _loopback(address: str) -> str:
    host, _, port = address.rpartition(":")
    return f"127.0.0.1:{port}" if host in _WILDCARDS else address


class _LoopbackPatch(importlib.abc.MetaPathFinder):
    def __init__(self) -> None:
        self.done: set[str] = set()

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,  # noqa: ARG002  (the MetaPathFinder signature)
        target: ModuleType | None = None,  # noqa: ARG002
    ) -> importlib.machinery.ModuleSpec | None:
        name = _TARGETS.get(fullname)
        if name is None or fullname in self.done:
            return None
        self.done.add(fullname)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader: Any = spec.loader
        exec_module = loader.exec_module

        def exec_and_patch(module: ModuleType) -> None:
            exec_module(module)
            original = getattr(module, name)

            def bind_loopback(server: Any, address: str, *args: Any, **kwargs: Any) -> Any:
                return original(server, _loopback(address), *args, **kwargs)

            setattr(module, name, bind_loopback)

        loader.exec_module = exec_and_patch
        return spec


sys.meta_path.insert(0, _LoopbackPatch())
