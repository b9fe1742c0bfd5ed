"""Generated protobuf and gRPC stubs of package ``polyhead.v1`` (regenerate with ``make proto``)."""
