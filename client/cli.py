"""The `llm-loadtest` entry point: user commands plus the controller, agent and
mock-server subcommands."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import NoReturn, cast

from client import exitcodes
from client.envconfig import apply_env_defaults, iter_subparsers
from common.version import __version__

# name -> (help, module, function adding the arguments, handler: a function or an async one).
# Modules are imported only for the command being run: a process pays for its own imports
# (the agent does not load the report renderer, and so on).
_COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "quickstart": (
        "benchmark the built-in mock server end to end (controller, agent, mock on 127.0.0.1)",
        "client.quickstart",
        "add_arguments",
        "async:quickstart",
    ),
    "run": (
        "create a run, watch it and print its per-stage results",
        "client.commands",
        "add_run_arguments",
        "async:cmd_run",
    ),
    "scenarios": (
        "list the named load scenarios and their stages",
        "client.commands",
        "add_scenarios_arguments",
        "cmd_scenarios",
    ),
    "runs": ("list, inspect, cancel and delete runs", "client.commands", "add_runs_arguments", "async:cmd_runs"),
    "report": (
        "write a self-contained HTML report of one run, or several runs overlaid",
        "client.report.command",
        "add_arguments",
        "async:cmd_report",
    ),
    "controller": (
        "serve the controller (gRPC API and agent streams, SQLite store)",
        "controller.cli",
        "add_arguments",
        "run",
    ),
    "agent": ("run a load-generating agent connected to a controller", "agent.cli", "add_arguments", "run"),
    "mock-server": (
        "serve a mock OpenAI-compatible model server with known latencies",
        "mockserver.cli",
        "add_arguments",
        "run",
    ),
    "health": (
        "check a controller's gRPC health service (exit 0 when SERVING; for container probes)",
        "client.health_check",
        "add_arguments",
        "run",
    ),
    "datasets": (
        "upload, list and delete datasets, traces and tokenizers stored by the controller",
        "client.datasets",
        "add_datasets_arguments",
        "async:cmd_datasets",
    ),
    "keys": (
        "create, list and revoke the controller's API keys (admin)",
        "client.keys",
        "add_keys_arguments",
        "async:cmd_keys",
    ),
    "audit": (
        "list the controller's audit log: mutating and refused calls (admin)",
        "client.keys",
        "add_audit_arguments",
        "async:cmd_audit",
    ),
}


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (`llm-loadtest run: error: ...`), exit 2, no usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# The largest number any flag takes: values go into 32-bit protobuf fields and durations into
# nanoseconds, and no sensible load, count or duration comes near these.
MAX_INT_FLAG = 2**31 - 1
MAX_FLOAT_FLAG = 1e9


def _numbers(value: object) -> Iterator[int | float]:
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        yield value
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _numbers(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _numbers(item)


def _in_range(convert: Callable[[str], object]) -> Callable[[str], object]:
    """The flag's own conversion, then every number in its value checked: not negative, finite
    and at most MAX_INT_FLAG / MAX_FLOAT_FLAG (a usage error instead of a traceback later)."""

    def check(text: str) -> object:
        value = convert(text)
        for number in _numbers(value):
            limit: float = MAX_INT_FLAG if isinstance(number, int) else MAX_FLOAT_FLAG
            if not 0 <= number <= limit:  # also refuses NaN
                raise argparse.ArgumentTypeError(f"{text!r} is out of range (0 to {limit:,.0f})")
        return value

    check.__name__ = getattr(convert, "__name__", "value")  # argparse names the type in its message
    return check


def _check_ranges(parser: argparse.ArgumentParser) -> None:
    for _, sub in iter_subparsers(parser):
        for action in sub._actions:
            if callable(action.type) and action.type not in (str, Path):
                action.type = _in_range(action.type)


def _handler(module: ModuleType, spec: str) -> Callable[[argparse.Namespace], int]:
    is_async, _, name = spec.rpartition(":")
    function = getattr(module, name)
    if is_async:
        return lambda args: int(asyncio.run(function(args)))
    return cast(Callable[[argparse.Namespace], int], function)


def _parser(
    only: str | None = None,
) -> tuple[argparse.ArgumentParser, dict[str, Callable[[argparse.Namespace], int]]]:
    """The CLI's parser and a handler per command; with `only`, just that command gets its
    arguments (and its module imported) — the others are listed for `--help`."""
    parser = _Parser(prog="llm-loadtest", description="Distributed load tester for LLM serving endpoints.")
    parser.add_argument("--version", action="version", version=f"llm-loadtest {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {}
    for name, (help_text, module_name, configure, handler) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or name == only:
            module = importlib.import_module(module_name)
            getattr(module, configure)(p)
            handlers[name] = _handler(module, handler)
    _check_ranges(parser)
    return parser, handlers


# Long-running services: a SIGTERM before their own handler is installed (while importing)
# means "stop" too, and there is nothing to flush yet, so it exits cleanly.
_SERVICES = frozenset({"controller", "agent", "mock-server"})


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    command = next((a for a in args_in if not a.startswith("-")), None)
    if command in _SERVICES and argv is None:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    parser, handlers = _parser(command if command in _COMMANDS else None)
    try:
        # Last, so every command's flags (whoever added them) get their LLM_LOADTEST_* variable.
        apply_env_defaults(parser, os.environ)
    except ValueError as exc:
        parser.error(str(exc))
    args = parser.parse_args(args_in)
    if hasattr(args, "tls_client_cert"):
        from common.tls import client_tls_from_args

        try:  # a half-given client certificate is a usage error, said before any work starts
            client_tls_from_args(args)
        except (ValueError, OSError) as exc:
            parser.error(str(exc))
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:  # `run` handles Ctrl-C itself while a run is under way
        return exitcodes.INTERRUPTED
    except BrokenPipeError:  # `... | head`: the reader has seen enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a shell tool killed by SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
