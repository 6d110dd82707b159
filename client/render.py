"""Rendering of runs and results for the terminal: rich tables, plain when piped."""

from __future__ import annotations

import sys

import grpc
from google.protobuf import json_format
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from rich.console import Console
from rich.table import Table

from client.report_server import server_facts, server_notes
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
    table.caption = "\n".join(
        ["latencies in ms (p50/p99); TTFT absent for non-streaming requests", *fleet_notes(result),
         *server_notes(result), *retry_notes(result), *(f"WARNING {w}" for w in result.warnings)]
    )
    return table


def fleet_notes(result: run_pb2.RunResult) -> list[str]:
    """One line per multi-agent stage: agents, start skew, agents and requests lost."""
    notes = []
    for s in result.stages:
        if len(s.agents) < 2 and not s.agents_lost and not s.reduced_load:
            continue
        line = f"stage {s.index}: {len(s.agents)} agents, start skew {s.start_skew_ms:.1f} ms"
        if s.agents_lost:
            line += f", {s.agents_lost} agent(s) lost with {s.requests_lost} unreported requests"
        if s.reduced_load:
            line += f", REDUCED LOAD: {s.reduced_load_reason}"
        notes.append(line)
    return notes


def retry_notes(result: run_pb2.RunResult) -> list[str]:
    """One line per stage with requests sent again on a fresh connection."""
    return [
        f"stage {s.index}: {s.requests_retried} request(s) sent again on a fresh connection "
        "(the server had closed the kept-alive one)"
        for s in result.stages
        if s.requests_retried
    ]


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


_LATENCIES = (
    ("TTFT", "ttft"),
    ("TPOT", "tpot"),
    ("ITL", "itl"),
    ("E2E", "e2e"),
    ("queue delay", "queue_delay"),
    ("E2E incl. queue", "e2e_including_queue"),
)


def _latency_table(s: run_pb2.StageResult, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for name in ("metric", "count", "mean", "std", "min", "p50", "p90", "p95", "p99", "p99.9", "max"):
        table.add_column(name, justify="left" if name == "metric" else "right")
    for label, field in _LATENCIES:
        st: run_pb2.LatencyStats = getattr(s, field)
        if not st.count:
            table.add_row(label, "0", *["-"] * 9)
            continue
        table.add_row(
            label, str(st.count),
            *(f"{v:.1f}" for v in (st.mean_ms, st.std_ms, st.min_ms, st.p50_ms, st.p90_ms, st.p95_ms,
                                   st.p99_ms, st.p999_ms, st.max_ms)),
        )  # fmt: skip
    return table


def _stage_facts(s: run_pb2.StageResult) -> list[str]:
    total = s.requests_ok + s.requests_failed
    lines = [
        f"requests {total}: ok {s.requests_ok}, failed {s.requests_failed}"
        + (" (" + ", ".join(f"{k} {v}" for k, v in sorted(s.errors.items())) + ")" if s.errors else ""),
        f"throughput {s.request_throughput:.2f} req/s, {s.output_token_throughput:.1f} output tok/s "
        f"(peak {s.peak_output_token_throughput:.1f}), {s.total_token_throughput:.1f} total tok/s; "
        f"achieved concurrency {s.achieved_concurrency:.2f} over {s.duration_s:.1f} s",
        f"tokens: {s.prompt_tokens} prompt, {s.output_tokens} output, counted from "
        + ("estimates (the server sent no usage)" if s.output_tokens_estimated else "the server's usage"),
    ]
    if s.requests_retried:
        lines.append(
            f"retried {s.requests_retried} request(s) on a fresh connection: the server had closed the "
            "kept-alive connection before answering (they count once, with the second send's outcome)"
        )
    if s.mean_requested_input_tokens or s.mean_requested_output_tokens:
        lines.append(
            f"lengths (mean, requested -> actual): input {s.mean_requested_input_tokens:.1f} -> "
            f"{s.mean_input_tokens:.1f}, output {s.mean_requested_output_tokens:.1f} -> {s.mean_output_tokens:.1f}"
        )
    if s.HasField("goodput"):
        lines.append(f"goodput {s.goodput:.2f} req/s, good fraction {s.good_fraction:.1%} (SLO met, of all requests)")
    if s.saturated:
        lines.append(f"WARNING load generator saturated: {s.saturation_reason}")
    if s.HasField("server_metrics"):
        lines.extend(server_facts(s.server_metrics))
    return lines


def _agents_table(s: run_pb2.StageResult) -> Table:
    table = Table(title=f"stage {s.index} per agent", title_justify="left")
    for name in ("agent", "ok", "failed", "req/s", "out tok/s", "TTFT p50", "TTFT p99", "ITL p50", "E2E p50"):
        table.add_column(name, justify="left" if name == "agent" else "right")
    for a in s.agents:
        table.add_row(
            a.agent_name, str(a.requests_ok), str(a.requests_failed), f"{a.request_throughput:.2f}",
            f"{a.output_token_throughput:.1f}", _ms(a.ttft.p50_ms), _ms(a.ttft.p99_ms), _ms(a.itl.p50_ms),
            _ms(a.e2e.p50_ms),
        )  # fmt: skip
    return table


def result_details(result: run_pb2.RunResult) -> list[object]:
    """Everything in a result, stage by stage and for the whole run (latencies in ms)."""
    parts: list[object] = []
    sections = [(f"stage {s.index}: {s.name}", s) for s in result.stages]
    if result.HasField("overall") and len(result.stages) > 1:
        sections.append(("whole run", result.overall))
    for title, s in sections:
        parts.append("")
        parts.append(_latency_table(s, f"{title} — latencies (ms)"))
        parts.extend(f"  {line}" for line in _stage_facts(s))
        if s.agents:
            parts.append(_agents_table(s))
    return parts
