"""`llm-loadtest agent`: run a load-generating agent connected to a controller.

`add_arguments` and `run` are mounted as a subcommand by the `llm-loadtest` entry point;
`run_agent` (re-exported from `agent.controller_link`) runs an agent inside an existing event loop
for tests and the in-process quickstart.

Exit codes: 0 after a clean shutdown (SIGINT/SIGTERM), 1 when the controller refuses our API
key, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import Coroutine
from typing import Any

import structlog

from agent.controller_link import AgentAuthError, run_agent
from agent.gcload import freeze_startup
from agent.observability import AgentMetrics
from common.grpc_options import API_KEY_ENV
from common.logging import configure_logging
from common.tls import add_client_tls_arguments, client_tls_from_args, open_channel

__all__ = ["add_arguments", "parse_label", "run", "run_agent"]

log = structlog.get_logger(__name__)

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2


def parse_label(text: str) -> tuple[str, str]:
    """`key=value` -> (key, value); argparse type for `--label`."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"label must be key=value, got {text!r}")
    return key.strip(), value.strip()


def default_name() -> str:
    """Host name and process id: unique per agent process on a host."""
    return f"{socket.gethostname()}-{os.getpid()}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the agent's options to `parser`."""
    parser.add_argument("--controller", required=True, metavar="HOST:PORT", help="controller gRPC address")
    parser.add_argument("--name", default=None, help="agent name (default: host name and process id)")
    parser.add_argument(
        "--label",
        dest="labels",
        action="append",
        type=parse_label,
        default=[],
        metavar="KEY=VALUE",
        help="placement label, repeatable (e.g. --label zone=a)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV) or None,
        help=f"API key for the controller (default: ${API_KEY_ENV})",
    )
    parser.add_argument("--log-format", choices=("json", "console"), default="json")
    parser.add_argument("--log-level", default="info", help="debug, info, warning, error")
    parser.add_argument(
        "--metrics-listen",
        default=None,
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off; e.g. 127.0.0.1:9465)",
    )
    add_client_tls_arguments(parser)


def _run_loop(main: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


async def _main(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    labels = dict(args.labels)
    name = args.name or default_name()
    metrics = AgentMetrics() if args.metrics_listen else None
    if metrics is not None:
        port = await metrics.serve(args.metrics_listen)
        print(f"metrics on http://{args.metrics_listen.rsplit(':', 1)[0]}:{port}/metrics", flush=True)
    tls = client_tls_from_args(args)
    # Everything imported and built so far lives for the whole process (see agent/gcload.py).
    freeze_startup()
    agent = asyncio.create_task(
        run_agent(
            args.controller,
            name,
            labels,
            args.api_key,
            stop,
            observer=metrics,
            channel_factory=lambda target: open_channel(target, tls),
        )
    )

    def on_signal() -> None:
        # First signal: graceful stop (flush samples, wait briefly for acks). A second one
        # means the operator will not wait: cancel outright.
        if stop.is_set():
            agent.cancel()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        # Not on every platform (Windows): there Ctrl-C still raises KeyboardInterrupt.
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal)
    log.info("agent_starting", name=name, controller=args.controller, labels=labels)
    try:
        await agent
    except AgentAuthError:
        return EXIT_REFUSED  # already logged clearly by the session
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise  # we ourselves are cancelled, not just the agent task
        log.warning("agent_stopped_forcibly", name=name)
        return EXIT_OK
    finally:
        if metrics is not None:
            await metrics.close()
    log.info("agent_stopped", name=name)
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    """Run the agent until SIGINT/SIGTERM; returns the process exit code."""
    try:
        configure_logging(args.log_format, args.log_level)
        tls = client_tls_from_args(args)
        if tls is not None:
            tls.credentials()  # unreadable files are a usage error now, not a reconnect loop
    except ValueError as exc:
        print(f"llm-loadtest agent: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return _run_loop(_main(args))
    except KeyboardInterrupt:
        return EXIT_OK
