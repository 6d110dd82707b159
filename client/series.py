"""Series on the command line: `runs baseline set|show|list|delete` (the baseline of a series),
`runs history` (one metric's trend over a series' runs, as a table and a sparkline), and the
comparison with the series' baseline that `run --compare-to NAME` ends with (its gate)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import TextIO

import grpc
from google.protobuf import timestamp_pb2
from rich.console import Console
from rich.table import Table
from rich.text import Text

from client import exitcodes, formats, render
from client.envconfig import not_from_env
from client.sdk import ControllerClient
from common.proto.loadtest.v1 import run_pb2, run_service_pb2

SPARK_BARS = "▁▂▃▄▅▆▇█"
DEFAULT_METRIC = "ttft_p99_ms"
# `run --compare-to`: the worse of the run's own exit code and the comparison's wins, in this
# order (worst first): a comparison that could not be made at all (2: no stage matched the
# baseline's loads), a failure or a regression (1), inconclusive (3), success (0).
_SEVERITY = {exitcodes.OK: 0, exitcodes.INCONCLUSIVE: 1, exitcodes.FAILED: 2, exitcodes.USAGE: 3}


def add_series_parsers(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    add_connection: Callable[..., None],
) -> None:
    """`runs baseline ...` and `runs history` (`add_connection`: commands.add_connection_arguments)."""
    p = sub.add_parser("baseline", help="set, show, list or delete the baseline of a series")
    actions = p.add_subparsers(dest="baseline_command", required=True, metavar="{set,show,list,delete}")
    q = actions.add_parser("set", help="make a SUCCEEDED run (or a group) the baseline of series NAME")
    add_connection(q)
    q.add_argument("name", metavar="NAME", help="the series (letters, digits, . _ -; at most 64)")
    q.add_argument("run_id", metavar="RUN", help="a run id (or a group id, grp_...)")
    q.add_argument("--json", action="store_true", help="print the baseline as JSON")
    q = actions.add_parser("show", help="show the baseline of series NAME")
    add_connection(q, read_only=True)
    q.add_argument("name", metavar="NAME")
    q.add_argument("--json", action="store_true", help="print the baseline as JSON")
    q = actions.add_parser("list", help="list every series' baseline")
    add_connection(q, read_only=True)
    q.add_argument("--json", action="store_true", help="print a JSON array of baselines")
    q = actions.add_parser("delete", help="remove the baseline of series NAME (its runs stay)")
    add_connection(q)
    q.add_argument("name", metavar="NAME")

    p = sub.add_parser("history", help="one metric over the runs of a series, oldest first, with its baseline")
    add_connection(p, read_only=True)
    p.add_argument("name", metavar="NAME", help="the series")
    p.add_argument("--metric", default=DEFAULT_METRIC, help=f"the figure to follow (default {DEFAULT_METRIC})")
    # Not from LLM_LOADTEST_LABEL: that variable holds KEY=VALUE labels (of agents and runs), this is a key.
    not_from_env(
        p.add_argument("--label", default="", metavar="KEY", help="name each run by this label's value, e.g. commit")
    )
    p.add_argument(
        "--load", default="", metavar="LOAD", help="the stage by its load, e.g. concurrency=8 (default: the first)"
    )
    p.add_argument("--limit", type=int, default=50, help="most recent runs shown (at most 1000)")
    p.add_argument("--json", action="store_true", help="print the history as JSON")


async def run_command(args: argparse.Namespace, client: ControllerClient) -> int:
    """`runs baseline ...` or `runs history`."""
    if args.runs_command == "history":
        history = await client.series_history(args.name, args.metric, args.label, args.load, args.limit)
        if args.json:
            print(render.to_json(history))
        else:
            print_history(history, args.label, render.console(), sys.stdout)
        return exitcodes.OK
    command = args.baseline_command
    if command == "list":
        baselines = await client.list_baselines()
        if args.json:
            print(json.dumps([render.message_dict(b) for b in baselines], indent=2, ensure_ascii=False))
        elif not baselines:
            print("no baselines; set one with: llm-loadtest runs baseline set NAME RUN")
        else:
            render.console().print(baselines_table(baselines))
        return exitcodes.OK
    if command == "delete":
        await client.delete_baseline(args.name)
        print(f"deleted the baseline of {args.name}")
        return exitcodes.OK
    if command == "set":
        baseline = await client.set_baseline(args.name, args.run_id)
    else:
        baseline = await client.get_baseline(args.name)
    if args.json:
        print(render.to_json(baseline))
    else:
        print(baseline_line(baseline))
    return exitcodes.OK


def _time(ts: timestamp_pb2.Timestamp) -> str:
    """UTC, to the minute ("" when unset)."""
    return ts.ToDatetime().strftime("%Y-%m-%d %H:%M") if ts.seconds or ts.nanos else ""


def baseline_line(baseline: run_service_pb2.Baseline) -> str:
    by = f" by key {baseline.set_by_key_id}" if baseline.set_by_key_id else ""
    return f"baseline of {baseline.name}: {baseline.run_id} (set {_time(baseline.set_time)} UTC{by})"


def baselines_table(baselines: Sequence[run_service_pb2.Baseline]) -> Table:
    table = Table(title="baselines", title_justify="left")
    for column in ("series", "baseline", "set", "by key"):
        table.add_column(column)
    for b in baselines:
        table.add_row(b.name, b.run_id, _time(b.set_time), b.set_by_key_id)
    return table


def sparkline(values: Sequence[float | None]) -> str:
    """One bar per value, its height from the lowest to the highest; a space for no value."""
    known = [v for v in values if v is not None]
    if not known:
        return " " * len(values)
    low, high = min(known), max(known)
    top = len(SPARK_BARS) - 1

    def bar(v: float) -> str:
        return SPARK_BARS[round((v - low) / (high - low) * top) if high > low else top // 2]

    return "".join(" " if v is None else bar(v) for v in values)


def value_text(metric: str, value: float) -> str:
    if metric == "error_rate":
        return f"{value * 100:.2f}%"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}"


def _interval_text(metric: str, point: run_service_pb2.HistoryPoint) -> str:
    if not point.HasField("ci"):
        return ""
    low = ("≤" if point.ci.low_open else "") + value_text(metric, point.ci.low)
    high = ("≥" if point.ci.high_open else "") + value_text(metric, point.ci.high)
    return f"[{low}, {high}]"


def baseline_value(history: run_service_pb2.GetSeriesHistoryResponse) -> float | None:
    """The metric's value in the baseline's point (None without a baseline or a value)."""
    point = next((p for p in history.points if p.baseline), None)
    return point.value if point is not None and point.HasField("value") else None


def history_table(history: run_service_pb2.GetSeriesHistoryResponse, label: str) -> Table:
    """created, label value, run, state, value with its interval, change vs the baseline, mark."""
    stage = history.load or "each run's first stage"
    level = f"; intervals at {history.confidence_percent:g}%" if history.confidence_percent else ""
    table = Table(title=f"{history.name}: {history.metric} at {stage}{level}", title_justify="left")
    intervals = any(p.HasField("ci") for p in history.points)
    columns = ("created", label or "label", "run", "state", history.metric, "interval", "vs baseline", "")
    for column in columns:
        if column != "interval" or intervals:
            table.add_column(column, justify="right" if column in (history.metric, "vs baseline") else "left")
    base = baseline_value(history)
    for p in history.points:
        has_value = p.HasField("value")
        change = ""
        if has_value and base:
            change = f"{(p.value - base) / base * 100:+.1f}%"
        cells: list[str | Text] = [
            _time(p.create_time),
            p.label_value,
            p.run_id,
            render.state_name(p.state),
            value_text(history.metric, p.value) if has_value else formats.NA,
        ]
        if intervals:
            cells.append(_interval_text(history.metric, p))
        cells += [change, Text("◆ baseline", style="bold") if p.baseline else ""]
        table.add_row(*cells)
    return table


def print_history(history: run_service_pb2.GetSeriesHistoryResponse, label: str, console: Console, out: TextIO) -> None:
    if not history.points:
        print(f"no runs in series {history.name} (runs join one with `run --series {history.name}`)", file=out)
        return
    console.print(history_table(history, label))
    values = [p.value if p.HasField("value") else None for p in history.points]
    known = [v for v in values if v is not None]
    if known:
        marks = "".join("^" if p.baseline else " " for p in history.points)
        low, high = value_text(history.metric, min(known)), value_text(history.metric, max(known))
        print(f"trend (oldest → newest): {sparkline(values)}  {low} … {high}", file=out)
        if marks.strip():
            print(f"                         {marks}  ^ baseline", file=out)
    if not history.HasField("baseline"):
        print(
            f"no baseline for {history.name}: set one with `llm-loadtest runs baseline set {history.name} RUN`",
            file=out,
        )


def worse_exit_code(a: int, b: int) -> int:
    """The worse of two exit codes (order in _SEVERITY; any other code, e.g. 4 or 130, wins)."""
    rank_a, rank_b = _SEVERITY.get(a, len(_SEVERITY)), _SEVERITY.get(b, len(_SEVERITY))
    return a if rank_a >= rank_b else b


async def gate_on_baseline(
    client: ControllerClient, name: str, run: run_pb2.Run, tolerance_percent: float, out: TextIO
) -> int | None:
    """Compare a finished run with the baseline of series `name` and print the tables; the
    comparison's exit code (0, 1, 3; 2 when no stage matched the baseline's loads), or None when
    the series has no baseline yet or the run did not succeed (nothing compared, said why)."""
    if run.state != run_pb2.RUN_STATE_SUCCEEDED:
        print(f"not compared with the baseline of {name}: the run is {render.state_name(run.state)}", file=out)
        return None
    try:
        baseline = await client.get_baseline(name)
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            raise
        print(
            f"no baseline for series {name} yet: nothing compared. To make this run the baseline:\n"
            f"  llm-loadtest runs baseline set {name} {run.id}",
            file=out,
        )
        return None
    response = await client.compare_runs("", [run.id], tolerance_percent, baseline_name=name)
    console = render.console() if out is sys.stdout else Console(file=out, no_color=not out.isatty(), width=120)
    for table in formats.comparison_tables(response, False):
        console.print(table)
    unmatched = [c for c in response.comparisons if not c.stages and not formats.capacity_compared(c)]
    if unmatched:
        print(f"error: no stage of {run.id} matches a stage of the baseline {baseline.run_id} by load", file=out)
        return exitcodes.USAGE
    code = formats.compare_exit_code(response)
    words = {0: "no regression", 1: "REGRESSED", 3: "INCONCLUSIVE (not enough data to tell)"}[code]
    print(f"compared with the baseline of {name} ({baseline.run_id}): {words}", file=out)
    return code
