"""Container health check: `python -m server.healthprobe HOST:PORT [--service NAME]`.

Asks the gRPC health service (grpc.health.v1) on a plaintext port and exits 0 iff it answers
SERVING within the timeout, 1 otherwise (NOT_SERVING, unreachable, timed out), 2 on bad usage.
The Dockerfile's HEALTHCHECK runs it. Loads neither torch nor the server.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_TIMEOUT_SECONDS = 3.0


def probe(target: str, service: str = "", timeout: float = DEFAULT_TIMEOUT_SECONDS) -> bool:
    """Whether the health service at `target` reports `service` SERVING within `timeout`."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return False
    return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


def main(argv: list[str] | None = None) -> int:
    """Run the probe; the exit status is 0 iff SERVING."""
    parser = argparse.ArgumentParser(prog="python -m server.healthprobe", description=__doc__)
    parser.add_argument("target", help="HOST:PORT of the gRPC port")
    parser.add_argument("--service", default="", help='health service name ("" = the server)')
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_SECONDS, help="seconds")
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error("--timeout must be > 0")
    serving = probe(args.target, args.service, args.timeout)
    print("SERVING" if serving else "NOT SERVING", file=sys.stderr)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
