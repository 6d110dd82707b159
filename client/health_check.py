"""`llm-loadtest health`: ask a controller's `grpc.health.v1.Health/Check`.

For container health checks (the Dockerfile's HEALTHCHECK) and scripts: exit 0 when the
service is SERVING, 1 when it is not or cannot be reached within the timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.tls import ClientTls, add_client_tls_arguments, client_tls_from_args, open_channel

EXIT_SERVING = 0
EXIT_NOT_SERVING = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the health check's flags to `parser`."""
    parser.add_argument("--controller", default="127.0.0.1:50051", help="controller HOST:PORT (default: %(default)s)")
    parser.add_argument(
        "--service",
        default="",
        help="service to check, e.g. loadtest.v1.RunService (default: the whole server)",
    )
    parser.add_argument(
        "--timeout", type=float, default=5.0, help="deadline of the check, seconds (default: %(default)s)"
    )
    add_client_tls_arguments(parser)


async def check(address: str, service: str, timeout_s: float, tls: ClientTls | None = None) -> str:
    """The serving status name (SERVING, NOT_SERVING, ...); raises grpc.aio.AioRpcError."""
    async with open_channel(address, tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def run(args: argparse.Namespace) -> int:
    """Print the status; exit 0 only when SERVING."""
    try:
        tls = client_tls_from_args(args)
    except ValueError as exc:
        print(f"llm-loadtest health: {exc}", file=sys.stderr)
        return 2
    try:
        status = asyncio.run(check(args.controller, args.service, args.timeout, tls))
    except grpc.aio.AioRpcError as exc:
        print(f"{args.controller}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return EXIT_NOT_SERVING
    print(status)
    return EXIT_SERVING if status == "SERVING" else EXIT_NOT_SERVING
