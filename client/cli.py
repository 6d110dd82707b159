"""The `llm-loadtest` entry point: user commands plus the controller, agent and
mock-server subcommands."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable

from client.envconfig import apply_env_defaults
from common.version import __version__


def _parser() -> tuple[argparse.ArgumentParser, dict[str, Callable[[argparse.Namespace], int]]]:
    from agent import cli as agent_cli
    from client import commands, health_check, keys, quickstart, report
    from controller import cli as controller_cli
    from mockserver import cli as mock_cli

    parser = argparse.ArgumentParser(
        prog="llm-loadtest", description="Distributed load tester for LLM serving endpoints."
    )
    parser.add_argument("--version", action="version", version=f"llm-loadtest {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {}

    def add(name: str, help_text: str, configure: Callable[[argparse.ArgumentParser], None],
            handler: Callable[[argparse.Namespace], int]) -> None:  # fmt: skip
        p = sub.add_parser(name, help=help_text, description=help_text)
        configure(p)
        handlers[name] = handler

    add("quickstart", "benchmark the built-in mock server end to end (controller, agent, mock on 127.0.0.1)",
        quickstart.add_arguments, lambda a: asyncio.run(quickstart.quickstart(a)))  # fmt: skip
    add("run", "create a run, watch it and print its per-stage results",
        commands.add_run_arguments, lambda a: asyncio.run(commands.cmd_run(a)))  # fmt: skip
    add("scenarios", "list the named load scenarios and their stages",
        commands.add_scenarios_arguments, commands.cmd_scenarios)  # fmt: skip
    add("runs", "list, inspect, cancel and delete runs",
        commands.add_runs_arguments, lambda a: asyncio.run(commands.cmd_runs(a)))  # fmt: skip
    add("report", "write a self-contained HTML report of one run, or several runs overlaid",
        report.add_arguments, lambda a: asyncio.run(report.cmd_report(a)))  # fmt: skip
    add("controller", "serve the controller (gRPC API and agent streams, SQLite store)",
        controller_cli.add_arguments, controller_cli.run)  # fmt: skip
    add("agent", "run a load-generating agent connected to a controller", agent_cli.add_arguments, agent_cli.run)
    add("mock-server", "serve a mock OpenAI-compatible model server with known latencies",
        mock_cli.add_arguments, mock_cli.run)  # fmt: skip
    add("health", "check a controller's gRPC health service (exit 0 when SERVING; for container probes)",
        health_check.add_arguments, health_check.run)  # fmt: skip
    add("keys", "create, list and revoke the controller's API keys (admin)",
        keys.add_keys_arguments, lambda a: asyncio.run(keys.cmd_keys(a)))  # fmt: skip
    add("audit", "list the controller's audit log: mutating and refused calls (admin)",
        keys.add_audit_arguments, lambda a: asyncio.run(keys.cmd_audit(a)))  # fmt: skip
    return parser, handlers


def main(argv: list[str] | None = None) -> int:
    parser, handlers = _parser()
    try:
        # Last, so every command's flags (whoever added them) get their LLM_LOADTEST_* variable.
        apply_env_defaults(parser, os.environ)
    except ValueError as exc:
        parser.error(str(exc))
    args = parser.parse_args(argv)
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
