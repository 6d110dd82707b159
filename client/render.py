"""Rendering of runs and results for the terminal: rich tables, plain when piped."""

from __future__ import annotations

import json
import sys
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from client import formats
from client import intervals as ci_text
from client.formats import NA, has_prefix_cache, has_reasoning
from client.intervals import interval_of
from common.proto.loadtest.v1 import run_pb2, run_service_pb2

# Where stdout is no terminal, rows stay whole on one line instead of wrapping at 80 columns.
PIPE_WIDTH = 220


def console(wide: bool = False) -> Console:
    """The console tables are printed on: the terminal's width, or unbounded for `--wide` and
    for pipes (a long row then wraps in the terminal instead of a number being cut)."""
    if sys.stdout.isatty() and not wide:
        return Console()
    return Console(
        width=PIPE_WIDTH if not sys.stdout.isatty() else max(PIPE_WIDTH, Console().width),
        no_color=not sys.stdout.isatty(),
    )


def state_name(state: int) -> str:
    return run_pb2.RunState.Name(state).removeprefix("RUN_STATE_")  # type: ignore[arg-type]


def _ms(value: float) -> str:
    return _num(value) if value else NA


def _table(title: str | None = None) -> Table:
    # Compact: two spaces between columns and a line under the header only, so the default
    # columns fit 80.
    return Table(
        title=title, title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), pad_edge=False, show_edge=False
    )


def _num(value: float, decimals: int = 1) -> str:
    """A table number: its decimals while they matter (below 1000), none above — shorter, never cut."""
    return f"{value:.{decimals}f}" if abs(value) < 1000 else f"{value:.0f}"


def _add_columns(
    table: Table, columns: list[tuple[str, list[str]]], left: tuple[str, ...], shrinkable: tuple[str, ...]
) -> None:
    """Adds the columns with their cells, `left` ones left-justified. Only `shrinkable` columns
    (names) are narrowed to fit the width, their text wrapped; every other column (numbers, ids)
    is never narrower than its widest cell, so none is cut."""
    for name, cells in columns:
        shrinks = name in shrinkable
        widest = max([len(name), *(len(line) for c in cells for line in c.split("\n"))])
        table.add_column(
            name,
            justify="left" if name in left else "right",
            no_wrap=not shrinks,
            min_width=None if shrinks else widest,
            overflow="fold",
        )
    for row in zip(*(cells for _, cells in columns), strict=True):
        table.add_row(*row)


# The summary columns that fit an 80-column terminal; `--wide` shows RESULT_WIDE_COLUMNS. A
# figure with an interval has it on a second line: `±h` by default, `[low, high]` with --wide.
RESULT_COLUMNS = ("stage", "load", "ok/failed", "req/s", "tok/s", "TTFT p50", "TTFT p99", "TPOT p50", "E2E p99")
RESULT_WIDE_COLUMNS = (
    "stage",
    "load",
    "ok",
    "failed",
    "err %",
    "req/s",
    "out tok/s",
    "TTFT p50",
    "TTFT p99",
    "TPOT p50",
    "TPOT p99",
    "ITL p50",
    "ITL p99",
    "E2E p50",
    "E2E p99",
)


def _stage_cell(s: run_pb2.StageResult) -> str:
    return f"{s.index}: {s.name}" if s.name and s.name != formats.load_label(s) else str(s.index)


def _result_cells(s: run_pb2.StageResult) -> dict[str, str]:
    load = f"{s.request_rate:g}/s" if s.request_rate else str(s.concurrency or NA)
    return {
        "stage": _stage_cell(s),
        "load": load,
        "ok": str(s.requests_ok),
        "failed": str(s.requests_failed),
        "ok/failed": f"{s.requests_ok}/{s.requests_failed}",
        "err %": _num(100 * s.error_rate, 2) if s.requests_ok + s.requests_failed else NA,
        "req/s": _num(s.request_throughput, 2),
        "tok/s": _num(s.output_token_throughput),
        "out tok/s": _num(s.output_token_throughput),
        "TTFT p50": _ms(s.ttft.p50_ms),
        "TTFT p99": _ms(s.ttft.p99_ms),
        "TPOT p50": _ms(s.tpot.p50_ms),
        "TPOT p99": _ms(s.tpot.p99_ms),
        "ITL p50": _ms(s.itl.p50_ms),
        "ITL p99": _ms(s.itl.p99_ms),
        "E2E p50": _ms(s.e2e.p50_ms),
        "E2E p99": _ms(s.e2e.p99_ms),
    }


def _result_intervals(s: run_pb2.StageResult) -> dict[str, tuple[run_pb2.Interval | None, int]]:
    """The interval of each column that has one, with the decimals of its figure."""
    return {
        "err %": (ci_text.percent(interval_of(s, "error_rate_ci")), 2),
        "req/s": (interval_of(s, "request_throughput_ci"), 2),
        "tok/s": (interval_of(s, "output_token_throughput_ci"), 1),
        "out tok/s": (interval_of(s, "output_token_throughput_ci"), 1),
        **{
            f"{label} {p}": (interval_of(getattr(s, field), f"{p}_ci"), 1)
            for label, field in (("TTFT", "ttft"), ("TPOT", "tpot"), ("ITL", "itl"), ("E2E", "e2e"))
            for p in ("p50", "p99")
        },
    }


def _with_intervals(s: run_pb2.StageResult, wide: bool) -> tuple[dict[str, str], bool]:
    """The stage's cells, each figure with its interval on a second line; and whether any has one."""
    cells = _result_cells(s)
    shown = False
    for name, (ci, decimals) in _result_intervals(s).items():
        text = ci_text.bounds(ci, decimals) if wide else ci_text.short(ci, decimals)
        if text and cells[name] != NA:
            cells[name] += "\n" + escape(text)
            shown = True
    return cells, shown


def result_table(result: run_pb2.RunResult, wide: bool = False) -> Table:
    what = f"group of {len(result.group.run_ids)} repeats" if result.HasField("group") else "run"
    table = _table(f"{what} {result.run_id} — {state_name(result.state)}")
    rows = [_with_intervals(s, wide) for s in result.stages]
    cells = [c for c, _ in rows]
    names = RESULT_WIDE_COLUMNS if wide else RESULT_COLUMNS
    _add_columns(table, [(name, [c[name] for c in cells]) for name in names], left=("stage",), shrinkable=("stage",))
    notes = ["latencies in ms" + ("" if wide else "; --wide for every column")]
    if any(shown for _, shown in rows):
        notes.append(escape((ci_text.WIDE_LEGEND if wide else ci_text.LEGEND).format(level=ci_text.level(result))))
    if any(s.requests_ok and s.ttft.count < s.requests_ok for s in result.stages):
        notes.append("TTFT absent for non-streaming requests")
    notes.extend(token_notes(result))
    table.caption = "\n".join([*notes, *fleet_notes(result), *cross_check_notes(result), *retry_notes(result)])
    table.caption_justify = "left"
    return table


def token_notes(result: run_pb2.RunResult) -> list[str]:
    """How exact the run's token counts are (TokenAccounting's note), when the result says."""
    return [escape(f"tokens: {result.tokens.note}")] if result.tokens.note else []


# --- reasoning, prefix cache and conversations (shown only for runs that have them) ---------


def _percent(value: float | None) -> str:
    return NA if value is None else f"{value:.1f}"


def _client_hit(m: run_pb2.StageResult | run_pb2.TurnResult) -> float | None:
    return m.prefix_cache_hit_percent if m.HasField("prefix_cache_hit_percent") else None


def _server_hit(s: run_pb2.StageResult) -> float | None:
    sm = s.server_metrics
    return sm.prefix_cache_hit_percent if sm.HasField("prefix_cache_hit_percent") else None


REASONING_COLUMNS = ("stage", "TTFR p50", "TTFR p99", "TTFO p50", "TTFO p99", "reason tok", "answer tok")


def reasoning_table(result: run_pb2.RunResult, wide: bool = False) -> Table | None:
    """Time to first reasoning / answer token and the mean token split, per reasoning stage."""
    stages = [s for s in result.stages if has_reasoning(s)]
    if not stages:
        return None
    table = _table("reasoning")
    cells = []
    for s in stages:
        c = {
            "stage": _stage_cell(s),
            "TTFR p50": _ms(s.ttfr.p50_ms),
            "TTFR p99": _ms(s.ttfr.p99_ms),
            "TTFO p50": _ms(s.ttfo.p50_ms),
            "TTFO p99": _ms(s.ttfo.p99_ms),
            "reason tok": _num(s.mean_reasoning_tokens),
            "answer tok": _num(s.mean_answer_tokens),
        }
        for label, field in (("TTFR", "ttfr"), ("TTFO", "ttfo")):
            for p in ("p50", "p99"):
                ci = interval_of(getattr(s, field), f"{p}_ci")
                text = ci_text.bounds(ci, 1) if wide else ci_text.short(ci, 1)
                if text and c[f"{label} {p}"] != NA:
                    c[f"{label} {p}"] += "\n" + escape(text)
        cells.append(c)
    _add_columns(table, [(n, [c[n] for c in cells]) for n in REASONING_COLUMNS], left=("stage",), shrinkable=("stage",))
    table.caption = "TTFR/TTFO: to first reasoning/answer token, ms\ntok: mean tokens per request"
    table.caption_justify = "left"
    return table


def prefix_cache_table(result: run_pb2.RunResult, wide: bool = False) -> Table | None:
    """The prefix-cache hit rate per stage: the client's (usage cached tokens over prompt
    tokens) and the server's (its own counters), the server's only where it has one."""
    stages = [s for s in result.stages if has_prefix_cache(s)]
    if not stages:
        return None
    server = any(_server_hit(s) is not None for s in stages)
    names = ["stage", "cached tok", "client hit %"] + (["server hit %"] if server else [])
    if wide and server:
        names.append("server source")
    cells = [
        {
            "stage": _stage_cell(s),
            "cached tok": str(s.cached_prompt_tokens),
            "client hit %": _percent(_client_hit(s)),
            "server hit %": _percent(_server_hit(s)),
            "server source": s.server_metrics.prefix_cache_source or NA,
        }
        for s in stages
    ]
    table = _table("prefix cache")
    _add_columns(
        table,
        [(n, [c[n] for c in cells]) for n in names],
        left=("stage", "server source"),
        shrinkable=("stage", "server source"),
    )
    table.caption = "client: usage's cached / prompt tokens"
    if server:
        table.caption += "\nserver: its own cache counters"
    table.caption_justify = "left"
    return table


TURN_COLUMNS = ("turn", "ok/failed", "TTFT p50", "TTFT p99", "TPOT p50", "E2E p50", "in tok", "cache %")
TURN_WIDE_COLUMNS = (
    "turn",
    "ok",
    "failed",
    "TTFT p50",
    "TTFT p99",
    "TPOT p50",
    "TPOT p99",
    "E2E p50",
    "E2E p99",
    "in tok",
    "cache %",
)


def _turn_cells(t: run_pb2.TurnResult) -> dict[str, str]:
    return {
        "turn": str(t.turn),
        "ok": str(t.requests_ok),
        "failed": str(t.requests_failed),
        "ok/failed": f"{t.requests_ok}/{t.requests_failed}",
        "TTFT p50": _ms(t.ttft.p50_ms),
        "TTFT p99": _ms(t.ttft.p99_ms),
        "TPOT p50": _ms(t.tpot.p50_ms),
        "TPOT p99": _ms(t.tpot.p99_ms),
        "E2E p50": _ms(t.e2e.p50_ms),
        "E2E p99": _ms(t.e2e.p99_ms),
        "in tok": _num(t.mean_input_tokens),
        "cache %": _percent(_client_hit(t)),
    }


def session_line(s: run_pb2.StageResult) -> str:
    """`sessions completed 40, session duration p50 12.3 s, p99 20.1 s`."""
    line = f"sessions completed {s.sessions_completed}"
    d = s.session_duration
    if d.count:
        line += f", session duration p50 {d.p50_ms / 1000:.2f} s, p99 {d.p99_ms / 1000:.2f} s"
    return line


def turns_table(s: run_pb2.StageResult, wide: bool = False) -> Table | None:
    """A conversation stage's figures by turn index (TTFT by turn shows what the prefix cache
    buys), its completed sessions and their duration in the caption."""
    if not s.turns:
        return None
    table = _table(f"stage {_stage_cell(s)} by turn")
    cells = [_turn_cells(t) for t in s.turns]
    names: tuple[str, ...] = TURN_WIDE_COLUMNS if wide else TURN_COLUMNS
    if not any(t.HasField("prefix_cache_hit_percent") for t in s.turns):
        names = tuple(n for n in names if n != "cache %")
    _add_columns(table, [(n, [c[n] for c in cells]) for n in names], left=("turn",), shrinkable=())
    table.caption = escape(session_line(s)) + "\nlatencies in ms; in tok: mean prompt tokens, history included"
    table.caption_justify = "left"
    return table


def result_extras(result: run_pb2.RunResult, wide: bool = False) -> list[Table]:
    """The tables shown under the summary when they apply: reasoning, prefix cache, and each
    conversation stage by turn (none for a plain run)."""
    tables = [reasoning_table(result, wide), prefix_cache_table(result, wide)]
    tables += [turns_table(s, wide) for s in result.stages]
    return [t for t in tables if t is not None]


# The probe table of a capacity search: the default columns fit 80, `--wide` shows them all.
PROBE_COLUMNS = ("#", "load", "outcome", "requests", "good %", "TTFT p50/p99", "TPOT p50/p99", "req/s")
PROBE_WIDE_COLUMNS = (
    "#",
    "stage",
    "load",
    "outcome",
    "requests",
    "good %",
    "TTFT p50",
    "TTFT p99",
    "TPOT p50",
    "TPOT p99",
    "E2E p99",
    "req/s",
    "out tok/s",
    "reason",
)


def probe_table(result: run_pb2.RunResult, wide: bool = False) -> Table:
    """A capacity search's probes, one a row, in the order they ran, under the run's title;
    the caption explains the columns and gives the search's stop message."""
    table = _table(f"run {result.run_id} — {state_name(result.state)} — capacity search")
    cells = formats.probe_cells(result.capacity)
    names = PROBE_WIDE_COLUMNS if wide else PROBE_COLUMNS
    _add_columns(
        table,
        [(name, [c[name] for c in cells]) for name in names],
        left=("#", "outcome", "reason"),
        shrinkable=("reason",),
    )
    notes = [
        "good %: requests within every SLO, with its 95 % interval; latencies in ms"
        + ("" if wide else "; --wide for every column"),
    ]
    if any(p.repeat for p in result.capacity.probes):
        notes.append("*: a repeat at the same load (judged with the earlier probe)")
    if any(p.outcome == run_pb2.PROBE_OUTCOME_INCONCLUSIVE for p in result.capacity.probes):
        notes.append("inconcl.: inconclusive, proves nothing (load generator saturated, or the probe ended early)")
    if result.capacity.stop_message:
        notes.append(f"stopped: {result.capacity.stop_message}")
    table.caption = "\n".join([*notes, *fleet_notes(result), *cross_check_notes(result), *retry_notes(result)])
    table.caption_justify = "left"
    return table


def fleet_notes(result: run_pb2.RunResult) -> list[str]:
    """One line per multi-agent stage: its agents and their start skew (lost agents and
    reduced load are warnings: formats.stage_warnings)."""
    return [
        f"stage {s.index}: {len(s.agents)} agents, start skew {s.start_skew_ms:.1f} ms"
        for s in result.stages
        if len(s.agents) >= 2
    ]


def retry_notes(result: run_pb2.RunResult) -> list[str]:
    """One line per stage with requests sent again on a fresh connection."""
    return [
        f"stage {s.index}: {s.requests_retried} request(s) sent again on a fresh connection "
        "(the server had closed the kept-alive one)"
        for s in result.stages
        if s.requests_retried
    ]


def cross_check_notes(result: run_pb2.RunResult) -> list[str]:
    """The client/server cross-checks that agree (a mismatch is a warning)."""
    return [
        f"stage {s.index}: {c.message}" for s in result.stages for c in s.server_metrics.cross_checks if not c.mismatch
    ]


RUNS_COLUMNS = ("id", "state", "name", "ok", "failed", "created")
RUNS_WIDE_COLUMNS = ("id", "state", "name", "model", "stages", "ok", "failed", "created", "reason")


def _run_cells(r: run_pb2.Run) -> dict[str, str]:
    created = r.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M") if r.HasField("create_time") else ""
    return {
        "id": r.id,
        "state": state_name(r.state),
        "name": r.spec.display_name or r.spec.target.model,
        "model": r.spec.target.model,
        "stages": str(len(r.spec.stages)),
        "ok": str(r.progress.requests_ok),
        "failed": str(r.progress.requests_failed),
        "created": created,
        "reason": r.state_reason,
    }


def runs_table(runs: list[run_pb2.Run], wide: bool = False) -> Table:
    """Runs, one a row; by default the columns that fit 80 columns (the name is the run's
    display name, else its model), `--wide` adds model, stage count and reason."""
    table = _table()
    cells = [_run_cells(r) for r in runs]
    names = RUNS_WIDE_COLUMNS if wide else RUNS_COLUMNS
    _add_columns(
        table,
        [(n, [c[n] for c in cells]) for n in names],
        left=("id", "state", "name", "model", "reason"),
        shrinkable=("name", "model", "reason"),
    )
    return table


def progress_line(update: run_service_pb2.WatchRunResponse) -> str:
    """One plain progress line: stages counted from 0 as in every table, TTFT an en dash until
    the first response."""
    run, live = update.run, update.live
    stages = len(run.spec.stages)
    if run.spec.HasField("search"):  # probes are planned one at a time: there is no "of N" yet
        return _search_progress_line(update)
    planned = f"/{live.stage_planned_s:.0f}" if live.stage_planned_s else ""
    requests = f"/{live.stage_requests_planned}" if live.stage_requests_planned else ""
    ttft = f"{live.ttft_p50_ms:.0f}/{live.ttft_p99_ms:.0f}ms" if live.ttft_p50_ms or live.ttft_p99_ms else NA
    return (
        f"{state_name(run.state):<9} stage {run.current_stage} ({run.current_stage + 1} of {stages}) "
        f"{run.spec.stages[run.current_stage].name if stages else ''} "
        f"t={live.stage_elapsed_s:.0f}{planned}s requests={live.stage_requests_done}{requests} | "
        f"run ok={run.progress.requests_ok} failed={run.progress.requests_failed} "
        f"TTFT p50/p99={ttft} "
        f"{live.output_token_throughput:.0f} tok/s"
    )


def _search_progress_line(update: run_service_pb2.WatchRunResponse) -> str:
    run, live = update.run, update.live
    stages = run.spec.stages
    load = (
        formats.search_load(run.spec.search.variable, _stage_load(stages[run.current_stage]))
        if (run.current_stage < len(stages))
        else NA
    )
    planned = f"/{live.stage_planned_s:.0f}" if live.stage_planned_s else ""
    ttft = f"{live.ttft_p50_ms:.0f}/{live.ttft_p99_ms:.0f}ms" if live.ttft_p50_ms or live.ttft_p99_ms else NA
    return (
        f"{state_name(run.state):<9} search stage {run.current_stage} at {load} "
        f"t={live.stage_elapsed_s:.0f}{planned}s requests={live.stage_requests_done} | "
        f"run ok={run.progress.requests_ok} failed={run.progress.requests_failed} "
        f"TTFT p50/p99={ttft} {live.output_token_throughput:.0f} tok/s"
    )


def _stage_load(stage: run_pb2.Stage) -> float:
    return stage.request_rate if stage.WhichOneof("load") == "request_rate" else float(stage.concurrency)


def rpc_error_text(exc: grpc.aio.AioRpcError) -> str:
    """`CODE: details`, plus one line per field violation when the server sent them."""
    lines = [f"error: {exc.code().name}: {exc.details()}"]
    status = rpc_status.from_call(exc)
    for detail in status.details if status is not None else ():
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            lines.extend(f"  {v.field}: {v.description}" for v in bad.field_violations)
    return "\n".join(lines)


def message_dict(message: Message) -> dict[str, Any]:
    """A message as `--json` prints it (docs/json.md): proto field names, every field present
    (zeros and empty lists too), 64-bit integers as JSON numbers, enums by name, timestamps
    as RFC 3339 strings and durations as `1.5s`, as in the proto3 JSON mapping."""
    return json_format.MessageToDict(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
        unquote_int64_if_possible=True,
    )


def to_json(message: Message, **extra: object) -> str:
    """`message_dict` as indented JSON, with `extra` top-level keys added."""
    return json.dumps(message_dict(message) | extra, indent=2, ensure_ascii=False)


_LATENCIES = (
    ("TTFT", "ttft"),
    ("TPOT", "tpot"),
    ("ITL", "itl"),
    ("E2E", "e2e"),
    ("queue delay", "queue_delay"),
    ("E2E incl. queue", "e2e_including_queue"),
)


def _latency_table(s: run_pb2.StageResult, title: str) -> Table:
    """Every latency's figures; mean and percentiles with their intervals on a second line."""
    table = Table(title=title, title_justify="left")
    for name in ("metric", "count", "mean", "std", "min", "p50", "p90", "p95", "p99", "p99.9", "max"):
        table.add_column(name, justify="left" if name == "metric" else "right")
    latencies = list(_LATENCIES)
    if has_reasoning(s):
        latencies[1:1] = [("TTFR", "ttfr"), ("TTFO", "ttfo")]
    if s.session_duration.count:
        latencies.append(("session", "session_duration"))
    for label, field in latencies:
        st: run_pb2.LatencyStats = getattr(s, field)
        if not st.count:
            table.add_row(label, "0", *["-"] * 9)
            continue

        def figure(name: str, st: run_pb2.LatencyStats = st) -> str:
            ci = ci_text.bounds(interval_of(st, f"{name}_ci"))
            return f"{getattr(st, f'{name}_ms'):.1f}" + (f"\n{escape(ci)}" if ci else "")

        table.add_row(
            label,
            str(st.count),
            figure("mean"),
            f"{st.std_ms:.1f}",
            f"{st.min_ms:.1f}",
            *(figure(p) for p in ("p50", "p90", "p95", "p99", "p999")),
            f"{st.max_ms:.1f}",
        )
    return table


def _with_bounds(text: str, ci: run_pb2.Interval | None, decimals: int = 1) -> str:
    """`text` followed by the interval, e.g. `2.50 req/s [2.41, 2.59]`."""
    shown = ci_text.bounds(ci, decimals)
    return f"{text} {escape(shown)}" if shown else text


def _stage_facts(s: run_pb2.StageResult) -> list[str]:
    total = s.requests_ok + s.requests_failed
    lines = [
        f"requests {total}: ok {s.requests_ok}, failed {s.requests_failed}"
        + (" (" + ", ".join(f"{k} {v}" for k, v in sorted(s.errors.items())) + ")" if s.errors else ""),
        "throughput "
        + _with_bounds(f"{s.request_throughput:.2f} req/s", interval_of(s, "request_throughput_ci"), 2)
        + ", "
        + _with_bounds(f"{s.output_token_throughput:.1f} output tok/s", interval_of(s, "output_token_throughput_ci"))
        + f" (peak {s.peak_output_token_throughput:.1f}), "
        + _with_bounds(f"{s.total_token_throughput:.1f} total tok/s", interval_of(s, "total_token_throughput_ci"))
        + f"; achieved concurrency {s.achieved_concurrency:.2f} over {s.duration_s:.1f} s",
        f"tokens: {s.prompt_tokens} prompt, {s.output_tokens} output, counted from "
        + ("estimates (the server sent no usage)" if s.output_tokens_estimated else "the server's usage"),
    ]
    if total:
        lines.append(
            _with_bounds(f"error rate {100 * s.error_rate:.2f} %", ci_text.percent(interval_of(s, "error_rate_ci")), 2)
        )
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
        lines.append(
            "goodput "
            + _with_bounds(f"{s.goodput:.2f} req/s", interval_of(s, "goodput_ci"), 2)
            + ", good fraction "
            + _with_bounds(f"{100 * s.good_fraction:.1f} %", ci_text.percent(interval_of(s, "good_fraction_ci")))
            + " (SLO met, of all requests)"
        )
    if has_reasoning(s):
        lines.append(
            f"reasoning: {s.reasoning_tokens} reasoning tokens (part of output); mean per request "
            f"{s.mean_reasoning_tokens:.1f} reasoning, {s.mean_answer_tokens:.1f} answer"
        )
    if s.HasField("prefix_cache_hit_percent") or _server_hit(s) is not None:
        lines.append(
            f"prefix cache: client {_percent(_client_hit(s))} % ({s.cached_prompt_tokens} cached prompt tokens)"
            + (
                f", server {_percent(_server_hit(s))} % ({s.server_metrics.prefix_cache_source})"
                if _server_hit(s) is not None
                else ""
            )
        )
    if s.turns or s.sessions_completed:
        lines.append(session_line(s))
    if s.saturated:
        lines.append(f"WARNING load generator saturated: {s.saturation_reason}")
    if s.target_saturated:
        lines.append(f"WARNING {s.target_saturation_reason}")
    if s.HasField("server_metrics"):
        lines.extend(_server_facts(s.server_metrics))
    return lines


def _server_facts(sm: run_pb2.ServerMetricsResult) -> list[str]:
    """Plain-text lines of a stage's server view."""
    lines = [f"server metrics: {sm.scrapes_ok} scrapes, {sm.scrapes_failed} failed, {len(sm.series)} series"]
    for c in sm.cross_checks:
        lines.append(("WARNING " if c.mismatch else "") + c.message)
    for e in sm.errors:
        lines.append(f"scrape of {e.endpoint} failed {e.count}x: {e.message}")
    return lines


def _agents_table(s: run_pb2.StageResult) -> Table:
    table = Table(title=f"stage {s.index} per agent", title_justify="left")
    for name in ("agent", "ok", "failed", "req/s", "out tok/s", "TTFT p50", "TTFT p99", "ITL p50", "E2E p50"):
        table.add_column(name, justify="left" if name == "agent" else "right")
    for a in s.agents:
        cells, _ = _with_intervals(a, wide=False)
        table.add_row(
            a.agent_name,
            str(a.requests_ok),
            str(a.requests_failed),
            *(cells[c] for c in ("req/s", "out tok/s", "TTFT p50", "TTFT p99", "ITL p50", "E2E p50")),
        )
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
