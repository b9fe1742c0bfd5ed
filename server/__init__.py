"""polyhead's gRPC policy server: onnxruntime trunk + versioned heads, cross-task batching, hot swaps.

No torch here. Layers, bottom up: ``settings`` (read once), ``runtime`` (onnxruntime sessions),
``registry`` (versioned heads, atomic swap) and ``watch`` (bundle directory), ``batcher`` (cross-task
batches), ``experience`` (episode assembly and the updater feed), ``dataplane`` (transport-independent
request handling), ``servicers`` (protobuf <-> domain, translation only), ``status`` (errors -> gRPC
codes, one table), ``metrics``, and ``app`` (the one place that wires them together).
"""
