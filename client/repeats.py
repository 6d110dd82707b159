"""`run --repeat N`: one CreateRun of a group of N repeats, each repeat watched in turn with the
live display, a line as each one ends, then the group's result (figures over its SUCCEEDED
repeats, intervals from the spread between them) printed as a run's is, and its exit code.

Ctrl-C as for `run` (client/commands.py): the first cancels the repeat under way, which cancels
the later ones too, waits for it to end and prints the group's result over what finished (exit
130); a second one detaches and leaves the group running.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid

import grpc

from client import exitcodes, live, render, series
from client.commands import INTERRUPT_REASON, Interrupts, _cancel_and_wait, _cancel_command, print_result
from client.formats import group_as_run
from client.sdk import ControllerClient
from common.codes import FINAL_RUN_STATES
from common.proto.loadtest.v1 import run_pb2


async def _cancel_quietly(client: ControllerClient, run_id: str) -> None:
    try:
        await client.cancel_run(run_id, INTERRUPT_REASON)
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:  # it had ended by itself meanwhile
            raise


def repeat_line(run: run_pb2.Run, result: run_pb2.RunResult, count: int) -> str:
    """One line for a repeat that ended: its state, counts, TTFT and throughput."""
    overall = result.overall
    line = f"repeat {run.repeat_index + 1}/{count} {run.id} {render.state_name(run.state)}"
    line += f"  ok {overall.requests_ok}  failed {overall.requests_failed}"
    if overall.ttft.count:
        line += f"  TTFT p50 {overall.ttft.p50_ms:.1f} ms  p99 {overall.ttft.p99_ms:.1f} ms"
    line += f"  {overall.output_token_throughput:.0f} tok/s"
    return line + (f"  ({run.state_reason})" if run.state_reason else "")


async def run_group(
    args: argparse.Namespace, client: ControllerClient, spec: run_pb2.RunSpec, interrupts: Interrupts
) -> int:
    group = await client.create_group(spec, args.repeat, request_id=uuid.uuid4().hex)
    name = f" ({spec.display_name})" if spec.display_name else ""
    print(f"created group {group.id}{name}: {len(group.run_ids)} repeats, run one after another", file=sys.stderr)
    if args.detach:
        print(group.id)
        print(
            f"result: llm-loadtest runs result {group.id} --controller {args.controller}; "
            f"cancel: {_cancel_command(args, group.run_ids[0])} (cancels the later repeats too)",
            file=sys.stderr,
        )
        return exitcodes.OK
    count = len(group.run_ids)
    cancelled = False
    for run_id in group.run_ids:
        if interrupts.count:
            if not cancelled:  # Ctrl-C came between two repeats: cancel the next (and the rest)
                await _cancel_quietly(client, run_id)
            break  # the cancelled repeat took the later ones with it
        run = await client.get_run(run_id)
        if run.state in FINAL_RUN_STATES:  # e.g. cancelled from elsewhere with an earlier repeat
            print(repeat_line(run, await client.get_result(run_id), count), file=sys.stderr, flush=True)
            continue
        print(f"repeat {run.repeat_index + 1}/{count}: run {run_id}", file=sys.stderr, flush=True)
        watch = asyncio.create_task(live.watch_run(client, run_id, sys.stderr))
        first = asyncio.create_task(interrupts.next())
        try:
            await asyncio.wait({watch, first}, return_when=asyncio.FIRST_COMPLETED)
            if not watch.done():
                cancelled = True
                print(f"(cancelling repeat {run.repeat_index + 1} cancels the later repeats)", file=sys.stderr)
                if not await _cancel_and_wait(args, client, run_id, watch, interrupts):
                    print(f"group {group.id} left running", file=sys.stderr)
                    return exitcodes.INTERRUPTED
            result = await watch
        finally:
            for task in (watch, first):
                if not task.done():
                    task.cancel()
        run = await client.get_run(run_id)
        print(repeat_line(run, result, count), file=sys.stderr, flush=True)
    response = await client.get_group_result(group.id)
    group_run = group_as_run(response)
    code = print_result(args, group_run, response.result)
    if getattr(args, "compare_to", "") and not interrupts.count:
        # As `run --compare-to`: the group compared with the series' baseline, the worse exit code.
        out = sys.stderr if args.json else sys.stdout
        compared = await series.gate_on_baseline(client, args.compare_to, group_run, args.compare_tolerance, out)
        code = code if compared is None else series.worse_exit_code(code, compared)
    return exitcodes.INTERRUPTED if interrupts.count else code
