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

from client import render
from client.sdk import ControllerClient
from common.durations import parse_duration
from common.grpc_options import API_KEY_ENV
from common.proto.loadtest.v1 import run_pb2

CONTROLLER_ENV = "LLM_LOADTEST_CONTROLLER"
TARGET_API_KEY_ENV = "LLM_LOADTEST_TARGET_API_KEY"
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


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values:
        raise argparse.ArgumentTypeError("expected at least one value")
    return values


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected NAME:VALUE, got {text!r}")
    return name.strip(), value.strip()


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    add_connection_arguments(parser)
    parser.add_argument(
        "--target", required=True, help="base URL of the OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1"
    )
    parser.add_argument("--model", required=True, help="model name sent with each request")
    parser.add_argument("--api-kind", choices=["chat", "completions"], default="chat")
    parser.add_argument(
        "--concurrency", type=_int_list, default=[1], help="closed-loop concurrency; 1,8,32 makes one stage per value"
    )
    parser.add_argument(
        "--duration",
        type=_duration,
        default=None,
        help="duration of each stage, e.g. 10s (default: 10s; none with --requests)",
    )
    parser.add_argument(
        "--requests", type=int, default=0, help="requests per stage (with --duration: whichever comes first)"
    )
    parser.add_argument("--input-tokens", type=int, default=128, help="prompt length in tokens")
    parser.add_argument("--output-tokens", type=int, default=128, help="max_tokens of each request")
    parser.add_argument("--seed", type=int, default=0, help="seed for prompts (0: random, reported in the spec)")
    parser.add_argument("--agents", type=int, default=1, help="agents sharing each stage")
    parser.add_argument(
        "--header", type=_header, action="append", default=[], help="extra HTTP header NAME:VALUE (repeatable)"
    )
    parser.add_argument("--target-api-key", default=os.environ.get(TARGET_API_KEY_ENV, ""),
                        help=f"API key of the model server (default: ${TARGET_API_KEY_ENV})")
    parser.add_argument("--request-timeout", type=_duration, default=None, help="per-request timeout (default 300s)")
    parser.add_argument("--no-stream", action="store_true", help="non-streaming requests (TTFT not measurable)")
    parser.add_argument("--name", default="", help="display name of the run")
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    parser.add_argument("--no-watch", action="store_true", help="create the run, print its id and return")


def build_spec(args: argparse.Namespace) -> run_pb2.RunSpec:
    """The RunSpec the `run` flags describe."""
    duration = args.duration if args.duration is not None else (0.0 if args.requests else 10.0)
    spec = run_pb2.RunSpec(display_name=args.name)
    t = spec.target
    t.base_url = args.target
    t.model = args.model
    t.api_kind = run_pb2.API_KIND_COMPLETIONS if args.api_kind == "completions" else run_pb2.API_KIND_CHAT
    t.api_key = args.target_api_key
    t.stream = not args.no_stream
    for name, value in args.header:
        t.headers[name] = value
    if args.request_timeout:
        t.request_timeout.FromNanoseconds(int(args.request_timeout * 1e9))
    spec.workload.synthetic.input_tokens.fixed = args.input_tokens
    spec.workload.synthetic.output_tokens.fixed = args.output_tokens
    spec.workload.seed = args.seed
    spec.placement.agents = args.agents
    for c in args.concurrency:
        stage = spec.stages.add()
        stage.concurrency = c
        if duration:
            stage.duration.FromNanoseconds(int(duration * 1e9))
        stage.requests = args.requests
    return spec


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
    spec = build_spec(args)
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
    return 0 if run.state == run_pb2.RUN_STATE_SUCCEEDED else 1


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
