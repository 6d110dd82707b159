"""How intervals are shown: the `runs result` table (±h by default, [low, high] with --wide,
open sides marked), Markdown cells, the report's summary and its error bars."""

from __future__ import annotations

import re

import pytest

from client import formats, intervals, render
from common.proto.loadtest.v1 import run_pb2
from tests.unit.test_cli_output import rendered, result, stage
from tests.unit.test_report import make_run, report_for

pytestmark = pytest.mark.timeout(30)


def ci(low: float, high: float, low_open: bool = False, high_open: bool = False) -> run_pb2.Interval:
    return run_pb2.Interval(low=low, high=high, low_open=low_open, high_open=high_open)


def with_intervals(s: run_pb2.StageResult) -> run_pb2.StageResult:
    """`s` with intervals around its figures: p99s open at the top, everything else closed."""
    s.request_throughput_ci.CopyFrom(ci(s.request_throughput - 35, s.request_throughput + 35))
    s.output_token_throughput_ci.CopyFrom(ci(s.output_token_throughput - 1500, s.output_token_throughput + 1500))
    s.error_rate = s.requests_failed / (s.requests_ok + s.requests_failed)
    s.error_rate_ci.CopyFrom(ci(s.error_rate * 0.9, s.error_rate * 1.1))
    for stats in (s.ttft, s.tpot, s.itl, s.e2e):
        stats.p50_ci.CopyFrom(ci(stats.p50_ms * 0.99, stats.p50_ms * 1.01))
        stats.p99_ci.CopyFrom(ci(stats.p99_ms * 0.98, stats.max_ms, high_open=True))
    return s


def test_interval_texts() -> None:
    assert intervals.short(ci(10.0, 14.0)) == "±2.0"
    assert intervals.short(ci(1000.0, 1070.0)) == "±35"
    assert intervals.short(ci(0.5, 0.524), 2) == "±0.012"
    assert intervals.short(ci(2790.0, 3000.0, high_open=True)) == "≥2790"
    assert intervals.short(ci(1.0, 3.14, low_open=True)) == "≤3.1"
    assert intervals.short(ci(1.0, 2.0, True, True)) == "?"
    assert intervals.short(None) == intervals.bounds(None) == ""
    assert intervals.bounds(ci(2710.0, 2890.4)) == "[2710, 2890]"
    assert intervals.bounds(ci(27.1, 31.25, high_open=True)) == "[27.1, ≥31.2]"
    assert intervals.bounds(ci(0.5, 0.75, low_open=True), 2) == "[≤0.50, 0.75]"
    assert intervals.inline("52.0", ci(51.7, 52.3)) == "52.0 ±0.3"
    assert intervals.inline("58.9", ci(55.2, 60.0, high_open=True)) == "58.9 (≥55.2)"
    assert intervals.inline("58.9", None) == "58.9"


@pytest.mark.parametrize("width", [80, 100, 120])
def test_the_summary_with_intervals_still_fits_the_terminal(width: int) -> None:
    stages = [with_intervals(stage(0, 1)), with_intervals(stage(1, 32)), with_intervals(stage(2, 1024))]
    text = rendered(render.result_table(result(*stages)), width)
    assert max(len(line) for line in text.splitlines()) <= width
    assert "…" not in text
    s = stages[0]
    # Each figure's interval sits under it: request rate ±35, TTFT p50 ±1 % (12.3), p99 open above.
    lines = text.splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith("0 "))
    under = lines[row + 1].split()
    assert under[:3] == ["±35", "±1500", "±12"], under
    assert f"≥{s.ttft.p99_ms * 0.98:.0f}" in under
    assert "±: half the 95 % interval" in text


def test_wide_shows_bounds_with_open_sides_marked() -> None:
    s = with_intervals(stage(0, 8))
    text = rendered(render.result_table(result(s), wide=True), 300)
    assert f"[{s.request_throughput - 35:.0f}, {s.request_throughput + 35:.0f}]" in text
    assert f"[{s.ttft.p99_ms * 0.98:.0f}, ≥{s.ttft.max_ms:.0f}]" in text
    assert f"[{100 * s.error_rate * 0.9:.2f}, {100 * s.error_rate * 1.1:.2f}]" in text  # err %
    assert "[low, high]: the 95 % interval" in text  # not eaten as rich markup


def test_a_result_without_intervals_shows_none() -> None:
    text = rendered(render.result_table(result(stage(0, 8))), 120)
    assert "±" not in text and "≥" not in text and "interval" not in text
    md = formats.markdown(result(stage(0, 8)))
    assert "±" not in md and "confidence" not in md


def test_details_show_each_latencys_intervals_and_the_rates() -> None:
    s = with_intervals(stage(0, 8))
    s.request_throughput_ci.CopyFrom(ci(2600.0, 2680.0))
    out = "\n".join(rendered(p, 250) if not isinstance(p, str) else p for p in render.result_details(result(s)))
    assert f"[{s.ttft.p50_ms * 0.99:.0f}, {s.ttft.p50_ms * 1.01:.0f}]" in out  # 1222.2 -> no decimals above 1000
    assert f"[{s.tpot.p50_ms * 0.99:.1f}, {s.tpot.p50_ms * 1.01:.1f}]" in out
    assert "2637.81 req/s [2600, 2680]" in out


def test_markdown_cells_carry_their_intervals() -> None:
    s = with_intervals(stage(0, 8))
    r = result(s)
    r.confidence_percent = 95
    md = formats.markdown(r)
    rows = [line for line in md.splitlines() if line.startswith("| 0")]
    cells = [c.strip() for c in rows[0].strip("|").split(" | ")]
    row = dict(zip(formats.MARKDOWN_COLUMNS, cells, strict=True))
    assert row["TTFT p50"] == f"{s.ttft.p50_ms:.1f} ±{s.ttft.p50_ms * 0.01:.0f}"
    assert row["TTFT p99"] == f"{s.ttft.p99_ms:.1f} (≥{s.ttft.p99_ms * 0.98:.0f})"
    assert row["req/s"] == f"{s.request_throughput:.2f} ±35"
    assert "±: half the 95 % confidence interval" in md
    assert re.search(r"Error rates: stage 0 0\.64 % \[0\.57, 0\.70\]", md), md


def test_report_summary_and_chart_show_intervals() -> None:
    run, r = make_run("run_1", "baseline")
    for s in r.stages:
        with_intervals(s)
    html = report_for((run, r))
    first = r.stages[0]
    assert f'title="95 % interval {intervals.bounds(first.ttft.p99_ci)}"' in html.replace("&gt;", ">")
    chart = html[html.index('data-chart="ttft-vs-throughput"') : html.index('data-chart="tpot-vs-throughput"')]
    # p50 and p99 each: a bar per stage, vertical (latency) and horizontal (throughput).
    assert chart.count('class="error-bars"') == 2
    # p99's open top is a dashed stub, one per stage; closed ends have caps.
    assert chart.count('stroke-dasharray="2 2"') == len(r.stages)
    # Without intervals, no bars.
    run2, r2 = make_run("run_2", "plain")
    plain = report_for((run2, r2))
    assert 'class="error-bars"' not in plain and 'class="ci"' not in plain
