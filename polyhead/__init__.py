"""polyhead: shared-trunk multi-head RL policies, trained offline, served over gRPC, updated online.

This package is the contract layer that the trainer, the server and the clients all stand on: the
generated wire stubs (``polyhead.v1``), the task-spec format, the bundle format, tensor and space
conversion, action post-processing and the typed errors. It imports neither torch nor onnxruntime, and
nothing from ``polyhead.server``, ``polyhead.trainer`` or ``polyhead.clients``: those three stand on it
(their sources live in the repository's top-level ``server/``, ``trainer/`` and ``clients/`` folders).
"""

__version__ = "0.1.0"
