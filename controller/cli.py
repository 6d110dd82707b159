"""`llm-loadtest controller`: serve the controller until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal

from common.grpc_options import API_KEY_ENV
from common.logging import configure_logging
from controller.server import Controller


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", default="127.0.0.1:50051", help="HOST:PORT to serve gRPC on")
    parser.add_argument("--db", default="runs.db", help="SQLite database file (created if missing)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"require this key for writes and agent connections (default: ${API_KEY_ENV})",
    )
    parser.add_argument("--grace", type=float, default=5.0, help="shutdown grace period, seconds")
    parser.add_argument("--log-format", choices=["json", "console"], default="json")
    parser.add_argument("--log-level", default="info")


async def serve(args: argparse.Namespace, stop: asyncio.Event) -> None:
    controller = Controller(args.db, api_key=args.api_key)
    await controller.start(args.listen)
    print(f"controller listening on {args.listen.rsplit(':', 1)[0]}:{controller.port}", flush=True)
    try:
        await stop.wait()
    finally:
        await controller.stop(args.grace)


def run(args: argparse.Namespace) -> int:
    configure_logging(args.log_format, args.log_level)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(args, stop)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    return 0
