"""User commands: `run` (create, watch, print the table) and `runs list|get|cancel|delete|result`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from pathlib import Path

import grpc

from client import formats, live, render, spec_builder
from client.scenarios import SCENARIOS, describe
from client.sdk import ControllerClient
from common.grpc_options import API_KEY_ENV
from common.proto.loadtest.v1 import run_pb2
from common.tls import add_client_tls_arguments, client_tls_from_args

CONTROLLER_ENV = "LLM_LOADTEST_CONTROLLER"


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
    add_client_tls_arguments(parser)


def open_client(args: argparse.Namespace) -> ControllerClient:
    """A client for the controller the connection flags name (TLS when asked for)."""
    return ControllerClient(args.controller, args.api_key, args.timeout, client_tls_from_args(args))


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    add_connection_arguments(parser)
    spec_builder.add_spec_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    parser.add_argument("--no-watch", action="store_true", help="create the run, print its id and return")


async def watch_until_done(client: ControllerClient, run_id: str) -> run_pb2.RunResult:
    """Show live progress until the run ends; returns the final result."""
    return await live.watch_run(client, run_id, sys.stderr)


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
    async with open_client(args) as client:
        run = await client.create_run(spec, request_id=uuid.uuid4().hex)
        print(f"created run {run.id}", file=sys.stderr, flush=True)
        if args.no_watch:
            print(run.id)
            return 0
        result = await watch_until_done(client, run.id)
        run = await client.get_run(run.id)
    return print_result(args, run, result)


def print_result(
    args: argparse.Namespace, run: run_pb2.Run, result: run_pb2.RunResult, *, details: bool = False
) -> int:
    """Print a result (table or JSON) with its checks; the exit code from state and verdict."""
    if args.json:
        print(render.to_json(result))
    else:
        con = render.console()
        con.print(render.result_table(result))
        if details:
            for part in render.result_details(result):
                con.print(part)
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
    sub = parser.add_subparsers(
        dest="runs_command", required=True, metavar="{list,get,cancel,delete,result,export,compare}"
    )
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
        if name == "result":
            p.add_argument("--format", choices=formats.RESULT_FORMATS, default=None,
                           help="table (default), json, markdown (for a PR) or vllm-json (vLLM bench serve keys)")
            p.add_argument("--output-dir", type=Path, help="vllm-json: write <run>_stage<i>.json files here")
            p.add_argument("--summary", action="store_true", help="table: only the per-stage summary table")
    p = sub.add_parser("export", help="stream a run's per-request samples as CSV or JSON Lines")
    add_connection_arguments(p)
    p.add_argument("run_id")
    p.add_argument("--format", choices=formats.EXPORT_FORMATS, default="csv")
    p.add_argument("-o", "--output", type=Path, help="file to write (default: stdout)")
    p.add_argument("--include-warmup", action="store_true", help="include warmup samples (flagged)")
    p = sub.add_parser("compare", help="compare runs with a baseline stage by stage; exit 1 on a regression")
    add_connection_arguments(p)
    p.add_argument("run_id", metavar="BASE", help="the baseline run")
    p.add_argument("others", nargs="+", metavar="OTHER", help="runs to compare with the baseline")
    p.add_argument("--tolerance", type=float, default=10.0, help="change counted as a regression, percent")
    p.add_argument("--all-metrics", action="store_true", help="show every compared metric, not only the key ones")
    p.add_argument("--json", action="store_true")


async def cmd_runs(args: argparse.Namespace) -> int:
    async with open_client(args) as client:
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
    if command == "export":
        return await _export(args, client)
    if command == "compare":
        try:
            comparison = await client.compare_runs(args.run_id, args.others, args.tolerance)
        except grpc.aio.AioRpcError as exc:
            print(render.rpc_error_text(exc), file=sys.stderr)
            return 2  # 1 means "regressed"
        if args.json:
            print(render.to_json(comparison))
        else:
            for table in formats.comparison_tables(comparison, args.all_metrics):
                render.console().print(table)
        return 1 if formats.any_regressed(comparison) else 0
    run = await client.get_run(args.run_id)
    result = await client.get_result(args.run_id)
    fmt = args.format or ("json" if args.json else "table")
    if fmt == "markdown":
        sys.stdout.write(formats.markdown(result, run))
    elif fmt == "vllm-json":
        _write_vllm_json(run, result, args.output_dir)
    else:
        args.json = fmt == "json"
        print_result(args, run, result, details=not args.summary)
    return 0


def _write_vllm_json(run: run_pb2.Run, result: run_pb2.RunResult, output_dir: Path | None) -> None:
    stages = formats.vllm_results(run, result)
    if output_dir is None:
        print(json.dumps(stages, indent=2))
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    for stage in stages:
        path = output_dir / formats.vllm_file_name(run.id, stage["stage_index"])
        path.write_text(json.dumps(stage, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {path}", file=sys.stderr)


async def _export(args: argparse.Namespace, client: ControllerClient) -> int:
    samples = client.export_samples(args.run_id, include_warmup=args.include_warmup)
    if args.output is None:
        try:
            count = await formats.write_samples(samples, sys.stdout, args.format)
            sys.stdout.flush()
        except BrokenPipeError:  # `... | head`: the reader has seen enough
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141  # as a shell tool killed by SIGPIPE
    else:
        with args.output.open("w", encoding="utf-8", newline="") as out:
            count = await formats.write_samples(samples, out, args.format)
    print(f"exported {count} samples", file=sys.stderr)
    return 0


def add_scenarios_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--peak-concurrency", type=int, help="show the stages for this peak concurrency")


def cmd_scenarios(args: argparse.Namespace) -> int:
    for scenario in SCENARIOS.values():
        print(f"{scenario.name:<7} {scenario.description}")
        print(f"        stages: {describe(scenario, args.peak_concurrency)}")
    return 0
