"""The HTML report of a capacity search: the probes on the latency-vs-throughput charts (a
point each, coloured by outcome) with the SLO lines and the capacity marked, and the probe
table section; a report of runs without a search has none of it."""

from __future__ import annotations

import re

import pytest

from client.report.chart_sections import CAPACITY_COLOR, OUTCOME_COLORS
from common.proto.loadtest.v1 import run_pb2
from tests.unit.test_report import make_run, make_stage, report_for

pytestmark = pytest.mark.timeout(30)
PASS, FAIL, INCONCLUSIVE = run_pb2.PROBE_OUTCOME_PASS, run_pb2.PROBE_OUTCOME_FAIL, run_pb2.PROBE_OUTCOME_INCONCLUSIVE
# (concurrency, outcome, good %, TTFT p99, output tok/s) in the order the search ran them
PROBES = (
    (1, PASS, 100.0, 60.0, 300.0),
    (64, FAIL, 40.0, 900.0, 6000.0),
    (16, PASS, 97.0, 180.0, 4000.0),
    (32, INCONCLUSIVE, 90.0, 400.0, 5200.0),
    (24, FAIL, 93.0, 260.0, 4700.0),
)


def search_run(
    run_id: str = "run_s", stop: int = run_pb2.SEARCH_STOP_REASON_CONVERGED, name: str = "search"
) -> tuple[run_pb2.Run, run_pb2.RunResult]:
    run, result = make_run(run_id, name)
    del run.spec.stages[:]
    del result.stages[:]
    run.spec.slo.tpot.FromMilliseconds(30)
    run.spec.search.variable = run_pb2.SEARCH_VARIABLE_CONCURRENCY
    run.spec.search.goodput_target_percent = 95
    capacity = result.capacity
    capacity.variable = run_pb2.SEARCH_VARIABLE_CONCURRENCY
    capacity.stop_reason = stop  # type: ignore[assignment]
    capacity.stop_message = "16 passed, 24 failed"
    for i, (c, outcome, good, ttft_p99, tok_s) in enumerate(PROBES):
        run.spec.stages.add(concurrency=c).duration.FromSeconds(5)
        result.stages.append(make_stage(i, c, ttft_p99 / 1.3, tok_s))
        capacity.probes.add(
            stage_index=i,
            load=c,
            outcome=outcome,
            requests=500,
            good_percent=good,
            good_percent_low=good - 3,
            good_percent_high=min(100.0, good + 2),
            ttft_p50_ms=ttft_p99 / 1.3,
            ttft_p99_ms=ttft_p99,
            tpot_p50_ms=10 + c * 0.2,
            tpot_p99_ms=12 + c * 0.3,
            e2e_p99_ms=ttft_p99 + 400,
            request_throughput=tok_s / 32,
            output_token_throughput=tok_s,
            reason=f"good {good} % vs target 95 %",
        )
    capacity.highest_passing, capacity.lowest_failing = 16, 24
    capacity.request_throughput, capacity.output_token_throughput = 125.0, 4000.0
    capacity.confident = True
    return run, result


def chart(html: str, name: str) -> str:
    match = re.search(rf'<figure class="chart" data-chart="{name}".*?</figure>', html, re.DOTALL)
    assert match, name
    return match.group(0)


def test_the_probes_are_points_coloured_by_outcome_on_the_latency_chart() -> None:
    html = report_for(search_run())
    ttft, legend = chart(html, "ttft-vs-throughput").split('<div class="legend">')
    assert "pass · TTFT p99" in legend and "inconclusive · TTFT p50" in legend
    # p50 circles and p99 squares per probe, in the outcome's colour: 2 pass, 2 fail, 1 inconclusive.
    for outcome, count in ((PASS, 2), (FAIL, 2), (INCONCLUSIVE, 1)):
        color = OUTCOME_COLORS[outcome][1]
        assert len(re.findall(rf'<circle cx="[\d.]+" cy="[\d.]+" r="4" fill="{color}">', ttft)) == count
        assert (
            len(re.findall(rf'<rect x="[\d.]+" y="[\d.]+" width="7" height="7" fill="#fff" stroke="{color}"', ttft))
            == count
        )
    # Points alone: the probes ran in search order, a line through them would zigzag.
    assert 'class="line"' not in ttft
    assert "probe 3 · 32 · inconclusive · good 90.0 %" in ttft


def test_the_slo_lines_and_the_capacity_are_marked() -> None:
    html = report_for(search_run())
    ttft, tpot = chart(html, "ttft-vs-throughput"), chart(html, "tpot-vs-throughput")
    assert "SLO TTFT 100 ms" in ttft and "SLO TPOT 30 ms" in tpot
    for figure in (ttft, tpot):
        assert f'stroke="{CAPACITY_COLOR}"' in figure and "capacity 16" in figure


def test_no_capacity_is_marked_when_none_was_measured() -> None:
    html = report_for(search_run(stop=run_pb2.SEARCH_STOP_REASON_GENERATOR_SATURATED))
    assert "capacity 16" not in chart(html, "ttft-vs-throughput")
    section = re.search(r'<section id="capacity".*?</section>', html, re.DOTALL)
    assert section and 'data-capacity="no"' in section.group(0)
    assert "generator saturated: no capacity measured" in section.group(0)


def test_the_capacity_section_lists_every_probe() -> None:
    html = report_for(search_run())
    section = re.search(r'<section id="capacity".*?</section>', html, re.DOTALL)
    assert section
    text = section.group(0)
    assert "capacity: concurrency 16 (highest passing; 24 failed)" in text and 'data-capacity="yes"' in text
    rows = re.findall(r'<tr class="(\w+)" data-probe="(\d+)">', text)
    assert rows == [("pass", "0"), ("fail", "1"), ("pass", "2"), ("inconclusive", "3"), ("fail", "4")]
    assert "97.0%" in text and "94.0 to 99.0" in text and "goodput target 95 %" in text
    assert "16 passed, 24 failed" in text
    # The header card says it too.
    assert re.search(r"<th>Capacity</th><td>capacity: concurrency 16", html)


def test_a_search_overlaid_with_a_plain_run_keeps_the_plain_runs_lines() -> None:
    html = report_for(search_run(), make_run("run_p", "plain"))
    ttft = chart(html, "ttft-vs-throughput")
    assert ttft.count('class="line"') == 2  # the plain run's p50 and p99
    assert "search · capacity 16" in ttft


def test_a_report_without_a_search_has_no_capacity_parts() -> None:
    html = report_for(make_run("run_1", "baseline"))
    assert 'id="capacity"' not in html and "Capacity" not in html and "SLO TTFT" not in html


def test_probe_reasons_are_escaped() -> None:
    run, result = search_run()
    result.capacity.probes[0].reason = "<script>alert(1)</script>"
    html = report_for((run, result))
    assert "<script>alert(1)" not in html and "&lt;script&gt;alert(1)" in html


def test_the_legend_names_only_the_outcomes_there_were() -> None:
    run, result = search_run()
    for p in result.capacity.probes:
        p.outcome = PASS
    legend = chart(report_for((run, result)), "ttft-vs-throughput").split('<div class="legend">')[1]
    legend = legend.split("<figcaption>")[0]
    assert "pass · TTFT p50" in legend and "fail" not in legend and "inconclusive" not in legend
