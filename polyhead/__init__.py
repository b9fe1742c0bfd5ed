"""polyhead: shared-trunk multi-head RL policies, trained offline, served over gRPC, updated online.

This package is the contract layer that the trainer, the server and the clients all stand on: the
generated wire stubs (``polyhead.v1``), the task-spec format, the bundle format, tensor and space
conversion, action post-processing and the typed errors. It imports neither torch nor onnxruntime, and
nothing from ``server``, ``trainer`` or ``clients``.
"""

__version__ = "0.1.0"
