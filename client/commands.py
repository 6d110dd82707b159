"""User commands: `run` (create, watch, print the table) and `runs list|get|cancel|delete|result`."""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid

import grpc
from rich.console import Console
from rich.live import Live

from client import render, spec_builder
from client.scenarios import SCENARIOS, describe
from client.sdk import ControllerClient
from common.grpc_options import API_KEY_ENV
from common.proto.loadtest.v1 import run_pb2

CONTROLLER_ENV = "LLM_LOADTEST_CONTROLLER"
PLAIN_PROGRESS_EVERY_S = 5.0


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--controller",
        default=os.environ.get(CONTROLLER_ENV, "127.0.0.1:50051"),
        help=f"controller HOST:PORT (default: ${CONTROLLER_ENV} or 127.0.0.1:50051)",
    )
    parser.add_argument(
        "--api-key", default=os.environ.get(API_KEY_ENV), help=f"controller API key (default: ${API_KEY_ENV})"
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="deadline of each call, seconds")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    add_connection_arguments(parser)
    spec_builder.add_spec_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    parser.add_argument("--no-watch", action="store_true", help="create the run, print its id and return")


async def watch_until_done(client: ControllerClient, run_id: str) -> run_pb2.RunResult:
    """Show live progress until the run ends; returns the final result."""
    out = render.console()
    err = sys.stderr
    final: run_pb2.RunResult | None = None
    if sys.stderr.isatty():
        with Live(console=Console(file=sys.stderr), refresh_per_second=4, transient=True) as live:
            async for update in client.watch(run_id):
                for e in update.events:
                    live.console.print(f"[dim]{e.kind}[/] {e.message}")
                if update.HasField("result"):
                    final = update.result
                else:
                    live.update(render.progress_line(update))
    else:
        last = 0.0
        async for update in client.watch(run_id):
            for e in update.events:
                print(f"event {e.kind} {e.message}", file=err, flush=True)
            if update.HasField("result"):
                final = update.result
            elif time.monotonic() - last >= PLAIN_PROGRESS_EVERY_S:
                last = time.monotonic()
                print(render.progress_line(update), file=err, flush=True)
    del out
    return final if final is not None else await client.get_result(run_id)


async def cmd_run(args: argparse.Namespace) -> int:
    try:
        return await _run(args)
    except grpc.aio.AioRpcError as exc:
        print(render.rpc_error_text(exc), file=sys.stderr)
        return 2


async def _run(args: argparse.Namespace) -> int:
    try:
        spec = spec_builder.build_spec(args)
    except (argparse.ArgumentTypeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    async with ControllerClient(args.controller, args.api_key, args.timeout) as client:
        run = await client.create_run(spec, request_id=uuid.uuid4().hex)
        print(f"created run {run.id}", file=sys.stderr, flush=True)
        if args.no_watch:
            print(run.id)
            return 0
        result = await watch_until_done(client, run.id)
        run = await client.get_run(run.id)
    return print_result(args, run, result)


def print_result(args: argparse.Namespace, run: run_pb2.Run, result: run_pb2.RunResult) -> int:
    if args.json:
        print(render.to_json(result))
    else:
        render.console().print(render.result_table(result))
        print(f"run id: {run.id}  state: {render.state_name(run.state)}"
              + (f"  reason: {run.state_reason}" if run.state_reason else ""))  # fmt: skip
    out = sys.stderr if args.json else sys.stdout
    for check in result.checks:
        mark = "PASS" if check.passed else "FAIL"
        print(f"check {mark} stage {check.stage_index}: {check.expression} — {check.message}", file=out)
    if result.verdict in (run_pb2.VERDICT_PASS, run_pb2.VERDICT_FAIL):
        print(f"verdict: {run_pb2.Verdict.Name(result.verdict).removeprefix('VERDICT_')}", file=out)
    ok = run.state == run_pb2.RUN_STATE_SUCCEEDED and result.verdict != run_pb2.VERDICT_FAIL
    return 0 if ok else 1


def add_runs_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="runs_command", required=True, metavar="{list,get,cancel,delete,result}")
    p = sub.add_parser("list", help="list runs, newest first")
    add_connection_arguments(p)
    p.add_argument("--state", choices=[n.removeprefix("RUN_STATE_").lower() for n in run_pb2.RunState.keys()[1:]])
    p.add_argument("--model", default="")
    p.add_argument("--limit", type=int, default=50, help="how many runs to show")
    p.add_argument("--json", action="store_true")
    for name, text in (("get", "show one run"), ("cancel", "cancel a run"), ("delete", "delete a finished run"),
                       ("result", "show a run's per-stage metrics")):  # fmt: skip
        p = sub.add_parser(name, help=text)
        add_connection_arguments(p)
        p.add_argument("run_id")
        if name in ("get", "result"):
            p.add_argument("--json", action="store_true")
        if name == "cancel":
            p.add_argument("--reason", default="")


async def cmd_runs(args: argparse.Namespace) -> int:
    async with ControllerClient(args.controller, args.api_key, args.timeout) as client:
        try:
            return await _runs(args, client)
        except grpc.aio.AioRpcError as exc:
            print(render.rpc_error_text(exc), file=sys.stderr)
            return 1


async def _runs(args: argparse.Namespace, client: ControllerClient) -> int:
    command = args.runs_command
    if command == "list":
        state = run_pb2.RunState.Value(f"RUN_STATE_{args.state.upper()}") if args.state else 0
        runs: list[run_pb2.Run] = []
        token = ""
        while len(runs) < args.limit:
            page = await client.list_runs(min(100, args.limit - len(runs)), token, state, args.model)
            runs.extend(page.runs)
            token = page.next_page_token
            if not token:
                break
        if args.json:
            print("[" + ",".join(render.to_json(r) for r in runs) + "]")
        else:
            render.console().print(render.runs_table(runs))
        return 0
    if command == "get":
        run = await client.get_run(args.run_id)
        if args.json:
            print(render.to_json(run))
        else:
            render.console().print(render.runs_table([run]))
            if run.state_reason:
                print(f"reason: {run.state_reason}")
        return 0
    if command == "cancel":
        run = await client.cancel_run(args.run_id, args.reason)
        print(f"{run.id} {render.state_name(run.state)}")
        return 0
    if command == "delete":
        await client.delete_run(args.run_id)
        print(f"deleted {args.run_id}")
        return 0
    run = await client.get_run(args.run_id)
    result = await client.get_result(args.run_id)
    print_result(args, run, result)
    return 0


def add_scenarios_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--peak-concurrency", type=int, help="show the stages for this peak concurrency")


def cmd_scenarios(args: argparse.Namespace) -> int:
    for scenario in SCENARIOS.values():
        print(f"{scenario.name:<7} {scenario.description}")
        print(f"        stages: {describe(scenario, args.peak_concurrency)}")
    return 0
