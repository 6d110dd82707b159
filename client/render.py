"""Rendering of runs and results for the terminal: rich tables, plain when piped."""

from __future__ import annotations

import sys

import grpc
from google.protobuf import json_format
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from rich.console import Console
from rich.table import Table

from common.proto.loadtest.v1 import run_pb2, run_service_pb2


def console() -> Console:
    # Piped output keeps whole table rows on one line instead of wrapping at 80 columns.
    return Console() if sys.stdout.isatty() else Console(width=220, no_color=True)


def state_name(state: int) -> str:
    return run_pb2.RunState.Name(state).removeprefix("RUN_STATE_")  # type: ignore[arg-type]


def _ms(value: float) -> str:
    return f"{value:.1f}" if value else "-"


def result_table(result: run_pb2.RunResult) -> Table:
    table = Table(title=f"run {result.run_id} — {state_name(result.state)}", title_justify="left")
    for name in ("stage", "load", "ok", "failed", "req/s", "out tok/s", "TTFT p50", "TTFT p99",
                 "TPOT p50", "TPOT p99", "ITL p50", "ITL p99", "E2E p50", "E2E p99"):  # fmt: skip
        table.add_column(name, justify="left" if name == "stage" else "right")
    for s in result.stages:
        table.add_row(
            f"{s.index}: {s.name}",
            f"{s.request_rate:g}/s" if s.request_rate else str(s.concurrency or "-"),
            str(s.requests_ok),
            str(s.requests_failed),
            f"{s.request_throughput:.2f}",
            f"{s.output_token_throughput:.1f}",
            _ms(s.ttft.p50_ms), _ms(s.ttft.p99_ms), _ms(s.tpot.p50_ms), _ms(s.tpot.p99_ms),
            _ms(s.itl.p50_ms), _ms(s.itl.p99_ms), _ms(s.e2e.p50_ms), _ms(s.e2e.p99_ms),
        )  # fmt: skip
    table.caption = "latencies in ms (p50/p99); TTFT absent for non-streaming requests"
    return table


def runs_table(runs: list[run_pb2.Run]) -> Table:
    table = Table()
    for name in ("id", "state", "model", "stages", "ok", "failed", "created"):
        table.add_column(name)
    for r in runs:
        table.add_row(
            r.id, state_name(r.state), r.spec.target.model, str(len(r.spec.stages)),
            str(r.progress.requests_ok), str(r.progress.requests_failed),
            r.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S") if r.HasField("create_time") else "",
        )  # fmt: skip
    return table


def progress_line(update: run_service_pb2.WatchRunResponse) -> str:
    run, live = update.run, update.live
    stages = len(run.spec.stages)
    planned = f"/{live.stage_planned_s:.0f}" if live.stage_planned_s else ""
    requests = f"/{live.stage_requests_planned}" if live.stage_requests_planned else ""
    return (
        f"{state_name(run.state):<9} stage {run.current_stage + 1}/{stages} "
        f"{run.spec.stages[run.current_stage].name if stages else ''} "
        f"t={live.stage_elapsed_s:.0f}{planned}s requests={live.stage_requests_done}{requests} | "
        f"run ok={run.progress.requests_ok} failed={run.progress.requests_failed} "
        f"TTFT p50/p99={live.ttft_p50_ms:.0f}/{live.ttft_p99_ms:.0f}ms "
        f"{live.output_token_throughput:.0f} tok/s"
    )


def rpc_error_text(exc: grpc.aio.AioRpcError) -> str:
    """`CODE: details`, plus one line per field violation when the server sent them."""
    lines = [f"error: {exc.code().name}: {exc.details()}"]
    status = rpc_status.from_call(exc)
    for detail in status.details if status is not None else ():
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            lines.extend(f"  {v.field}: {v.description}" for v in bad.field_violations)
    return "\n".join(lines)


def to_json(message: object) -> str:
    return json_format.MessageToJson(message, indent=2, preserving_proto_field_name=True)  # type: ignore[arg-type]
