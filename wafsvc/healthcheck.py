"""Container health check: asks wafsvc's grpc.health.v1 whether it serves.

    python -m wafsvc.healthcheck                    # the service in WAF_LISTEN
    python -m wafsvc.healthcheck --service ""       # the server as a whole

Exit status 0 when SERVING, 1 otherwise (NOT_SERVING while draining, no
answer, unknown service), with the reason on stderr. Docker HEALTHCHECK and
Compose use it; Kubernetes has native gRPC probes and does not need it.
grpc_health_probe is a separate binary that cannot be fetched offline, and
the image already carries grpcio.
"""

from __future__ import annotations

import argparse
import os
import sys

from common.options import dial_address

SERVICE = "waf.v1.Waf"
DEFAULT_LISTEN = "127.0.0.1:50051"


def target_for(listen: str) -> str:
    """The gRPC target to dial for a listen address."""
    host, port = dial_address(listen)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check(target: str, service: str, timeout_s: float) -> tuple[bool, str]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as exc:
            return False, f"{target}: {exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{target} {service or '(server)'}: {status}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wafsvc.healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument("--target", help="HOST:PORT to dial; default derived from WAF_LISTEN")
    parser.add_argument("--service", default=SERVICE, help=f"health service name (default {SERVICE})")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the answer")
    args = parser.parse_args(argv)
    try:
        target = args.target or target_for(os.environ.get("WAF_LISTEN") or DEFAULT_LISTEN)
    except ValueError as exc:
        print(f"wafsvc.healthcheck: WAF_LISTEN: {exc}", file=sys.stderr)
        return 2
    healthy, detail = check(target, args.service, args.timeout)
    print(detail, file=sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
