"""Container health check: ask the server's standard ``grpc.health.v1`` service whether it is SERVING.

Used by ``HEALTHCHECK`` in ``deploy/docker/Dockerfile.server`` and by docker-compose. Exit status 0 when
the service reports SERVING, 1 otherwise (NOT_SERVING, UNKNOWN, unreachable, deadline passed), so it needs
no binary beyond the image's Python and ``grpcio-health-checking`` (a dependency of ``polyhead[serve]``).

The target defaults to ``127.0.0.1:$POLYHEAD_PORT`` (50051). When the data plane has TLS on
(``POLYHEAD_TLS_CERT``), the check connects with TLS and trusts ``--ca`` (default: that certificate
itself, right for a self-signed certificate), checking it against ``--tls-name`` (default: localhost).
Kubernetes does not need this script: its native ``grpc`` probes call the same service.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--target",
        default=f"127.0.0.1:{os.environ.get('POLYHEAD_PORT', '50051')}",
        help="HOST:PORT of the data plane (default: %(default)s)",
    )
    parser.add_argument(
        "--service",
        default="",
        help="health service name: empty for the whole server, or polyhead.v1.PolicyService/<task id> for "
        "one task (default: the whole server)",
    )
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait (default: %(default)s)")
    parser.add_argument(
        "--ca",
        default=os.environ.get("POLYHEAD_TLS_CERT") or None,
        help="PEM trust root; setting it (or POLYHEAD_TLS_CERT) switches the check to TLS",
    )
    parser.add_argument("--tls-name", default="localhost", help="server name expected in the certificate")
    return parser.parse_args(argv)


def check(target: str, service: str, timeout: float, ca: str | None, tls_name: str) -> tuple[bool, str]:
    """Return (serving, what was seen). Never raises for a server that is down or slow."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if ca:
        credentials = grpc.ssl_channel_credentials(root_certificates=Path(ca).read_bytes())
        channel = grpc.secure_channel(
            target, credentials, options=[("grpc.ssl_target_name_override", tls_name)]
        )
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as exc:
            return False, f"{exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return response.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    serving, seen = check(args.target, args.service, args.timeout, args.ca, args.tls_name)
    print(f"{args.target} service={args.service!r}: {seen}", file=sys.stderr)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
