"""`llm-loadtest controller`: serve the controller until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from typing import TypedDict

from common.grpc_options import API_KEY_ENV
from common.logging import configure_logging
from common.tls import ServerTls
from controller.domain.access import ratelimit
from controller.domain.access.destinations import parse_allow_entry
from controller.memory import limit_arenas
from controller.server import Controller, OpenListenerError
from controller.store.database import UnusableDatabase


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", default="127.0.0.1:50051", help="HOST:PORT to serve gRPC on")
    parser.add_argument("--db", default="runs.db", help="SQLite database file (created if missing)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"require this key for writes and agent connections (default: ${API_KEY_ENV})",
    )
    parser.add_argument("--grace", type=float, default=5.0, help="shutdown grace period, seconds")
    parser.add_argument(
        "--metrics-listen",
        default=None,
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off; e.g. 127.0.0.1:9464)",
    )
    parser.add_argument("--log-format", choices=["json", "console"], default="json")
    parser.add_argument("--log-level", default="info")
    # Security (docs/security.md).
    parser.add_argument(
        "--require-auth-for-reads", action="store_true", help="reads need a reader or admin key (default: public)"
    )
    parser.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate (needs --tls-key)")
    parser.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    parser.add_argument(
        "--tls-client-ca", metavar="PEM", help="require client certificates signed by this CA (mutual TLS)"
    )
    parser.add_argument(
        "--allow-target",
        action="append",
        default=[],
        metavar="CIDR|HOST_PATTERN",
        help="runs may send traffic (targets, server-metrics scrapes) only to these destinations, e.g. "
        "10.0.0.0/8 or '*.internal' (repeatable; default: anywhere except link-local addresses and this "
        "controller's own ports)",
    )
    parser.add_argument(
        "--insecure-open",
        action="store_true",
        help="serve a non-loopback --listen address with no API key at all (refused without this flag)",
    )
    for kind, rate, burst in (
        ("write", ratelimit.DEFAULT_WRITE_RATE, ratelimit.DEFAULT_WRITE_BURST),
        ("read", ratelimit.DEFAULT_READ_RATE, ratelimit.DEFAULT_READ_BURST),
    ):
        parser.add_argument(
            f"--{kind}-rate-limit",
            type=float,
            default=rate,
            metavar="PER_S",
            help=f"{kind} calls per second per key (token bucket; default {rate:g})",
        )
        parser.add_argument(
            f"--{kind}-burst",
            type=float,
            default=burst,
            metavar="N",
            help=f"{kind} calls a key may make at once (default {burst:g})",
        )
    parser.add_argument(
        "--refusal-rate-limit",
        type=float,
        default=ratelimit.DEFAULT_REFUSAL_RATE,
        metavar="PER_S",
        help="refused calls (bad key, wrong role) per second per client address; past the burst they get"
        f" RESOURCE_EXHAUSTED (token bucket; default {ratelimit.DEFAULT_REFUSAL_RATE:g})",
    )
    parser.add_argument(
        "--refusal-burst",
        type=float,
        default=ratelimit.DEFAULT_REFUSAL_BURST,
        metavar="N",
        help=f"refused calls a client address may make at once (default {ratelimit.DEFAULT_REFUSAL_BURST:g})",
    )


class SecurityOptions(TypedDict):
    """The security keyword arguments of Controller."""

    require_auth_for_reads: bool
    tls: ServerTls | None
    rate_limits: ratelimit.RateLimits
    allow_targets: list[str]
    insecure_open: bool


def security_options(args: argparse.Namespace) -> SecurityOptions:
    """Controller keyword arguments from the security flags (ValueError when inconsistent)."""
    if bool(args.tls_cert) != bool(args.tls_key) or (args.tls_client_ca and not args.tls_cert):
        raise ValueError("--tls-cert and --tls-key go together; --tls-client-ca needs them")
    for entry in args.allow_target:
        parse_allow_entry(entry)
    return SecurityOptions(
        require_auth_for_reads=args.require_auth_for_reads,
        tls=ServerTls(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None,
        rate_limits=ratelimit.RateLimits(
            args.write_rate_limit,
            args.write_burst,
            args.read_rate_limit,
            args.read_burst,
            args.refusal_rate_limit,
            args.refusal_burst,
        ),
        allow_targets=list(args.allow_target),
        insecure_open=args.insecure_open,
    )


async def serve(args: argparse.Namespace, stop: asyncio.Event) -> None:
    controller = Controller(args.db, api_key=args.api_key, metrics_listen=args.metrics_listen, **security_options(args))
    await controller.start(args.listen)
    print(f"controller listening on {args.listen.rsplit(':', 1)[0]}:{controller.port}", flush=True)
    if args.metrics_listen:
        host = args.metrics_listen.rsplit(":", 1)[0]
        print(f"metrics on http://{host}:{controller.metrics_port}/metrics", flush=True)
    try:
        await stop.wait()
    finally:
        await controller.stop(args.grace)


def run(args: argparse.Namespace) -> int:
    limit_arenas()  # this process is the controller alone: before its threads start
    configure_logging(args.log_format, args.log_level)
    try:
        security_options(args)
    except ValueError as exc:
        print(f"llm-loadtest controller: {exc}", file=sys.stderr)
        return 2

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(args, stop)

    with contextlib.suppress(KeyboardInterrupt):
        try:
            asyncio.run(main())
        except OpenListenerError as exc:
            print(f"llm-loadtest controller: {exc}", file=sys.stderr)
            return 2
        except UnusableDatabase as exc:
            print(f"llm-loadtest: {exc}", file=sys.stderr)
            return 1
    return 0
