"""`runs compare` of reasoning models and prefix caching: TTFR and TTFO p50/p99 judged as TTFT
is (their intervals, Holm), only when both runs reasoned; the prefix-cache hit rate shown with
its change and not judged (results carry no interval of it), only when both runs have it; a
plain comparison unchanged."""

from __future__ import annotations

from io import StringIO

import pytest
from rich.console import Console

from client import exitcodes, formats
from common.proto.loadtest.v1 import run_pb2, run_service_pb2
from common.stats import z_value
from controller.domain.results.compare import METRICS, METRICS_BY_NAME, NOT_JUDGED, Comparison, compare_runs
from controller.domain.results.difference import Outcome
from controller.servicers.convert import compare_message

pytestmark = pytest.mark.timeout(10)
Z = z_value(95.0)
NEW = ("ttfr_p50_ms", "ttfr_p99_ms", "ttfo_p50_ms", "ttfo_p99_ms", "prefix_cache_hit_percent")


def latency(p50: float, se: float, count: int = 2000) -> run_pb2.LatencyStats:
    st = run_pb2.LatencyStats(count=count, p50_ms=p50, p99_ms=p50 * 2)
    st.p50_ci.CopyFrom(run_pb2.Interval(low=p50 - Z * se, high=p50 + Z * se))
    st.p99_ci.CopyFrom(run_pb2.Interval(low=2 * p50 - 2 * Z * se, high=2 * p50 + 2 * Z * se))
    return st


def stage(ttfo: float = 0.0, se: float = 1.0, hit: float | None = None) -> run_pb2.StageResult:
    s = run_pb2.StageResult(index=0, concurrency=8, requests_ok=2000)
    s.ttft.CopyFrom(latency(100.0, 1.0))
    s.ttfo.CopyFrom(latency(100.0, 1.0))  # TTFO is TTFT for a model that does not reason
    if ttfo:
        s.ttfr.CopyFrom(latency(90.0, 1.0))
        s.ttfo.CopyFrom(latency(ttfo, se))
        s.reasoning_tokens = 400_000
    if hit is not None:
        s.prefix_cache_hit_percent = hit
        s.cached_prompt_tokens = 1000
    return s


def run(run_id: str, s: run_pb2.StageResult) -> run_pb2.RunResult:
    return run_pb2.RunResult(run_id=run_id, stages=[s], confidence_percent=95)


def compare(base: run_pb2.StageResult, other: run_pb2.StageResult) -> dict[str, object]:
    [c] = compare_runs(run("b", base), [run("o", other)], 10.0, 95.0)
    return {m.metric: m for m in c.stages[0].metrics}


def test_the_new_metrics_are_declared_and_selectable_by_name() -> None:
    assert all(name in METRICS_BY_NAME for name in NEW)
    assert [m.name for m in METRICS[:10]] == [  # the plain metrics come first, in their order
        "ttft_p50_ms",
        "ttft_p99_ms",
        "tpot_p50_ms",
        "tpot_p99_ms",
        "itl_p50_ms",
        "e2e_p50_ms",
        "e2e_p99_ms",
        "error_rate",
        "request_throughput",
        "output_token_throughput",
    ]


def test_plain_runs_compare_exactly_as_before() -> None:
    deltas = compare(stage(), stage())
    assert not set(NEW) & set(deltas)  # TTFO equal to TTFT is not compared twice
    # One run reasoning, the other not: nothing of reasoning to compare either.
    assert not set(NEW) & set(compare(stage(ttfo=3000.0, hit=50.0), stage()))


def test_ttfo_regressions_are_judged_with_their_intervals() -> None:
    deltas = compare(stage(ttfo=3000.0, se=5.0), stage(ttfo=3600.0, se=5.0))
    ttfo = deltas["ttfo_p50_ms"]
    assert ttfo.outcome == Outcome.REGRESSED and ttfo.delta == pytest.approx(600.0)  # type: ignore[attr-defined]
    assert ttfo.delta_ci is not None and ttfo.p_adjusted < 0.05  # type: ignore[attr-defined]
    assert deltas["ttfr_p50_ms"].outcome == Outcome.NO_REGRESSION  # type: ignore[attr-defined]
    # The same change in noise 100 times larger is not shown to be a regression.
    noisy = compare(stage(ttfo=3000.0, se=500.0), stage(ttfo=3600.0, se=500.0))
    assert noisy["ttfo_p50_ms"].outcome == Outcome.INCONCLUSIVE  # type: ignore[attr-defined]


def test_the_hit_rate_is_shown_in_points_and_not_judged() -> None:
    deltas = compare(stage(hit=80.0), stage(hit=35.5))
    hit = deltas["prefix_cache_hit_percent"]
    assert (hit.baseline, hit.value, hit.delta) == (80.0, 35.5, -44.5)  # type: ignore[attr-defined]
    assert hit.outcome == Outcome.UNSPECIFIED and hit.note == NOT_JUDGED and hit.delta_ci is None  # type: ignore[attr-defined]
    chosen = [METRICS_BY_NAME["ttft_p50_ms"], METRICS_BY_NAME["prefix_cache_hit_percent"]]
    [c] = compare_runs(run("b", stage(hit=80.0)), [run("o", stage(hit=35.5))], 10.0, 95.0, chosen)
    # It does not decide the stage: the other metric (unchanged) does.
    assert c.stages[0].outcome == Outcome.NO_REGRESSION
    response = compare_message(Comparison("b", 95.0, [c]))
    assert formats.compare_exit_code(response) == exitcodes.OK
    out = StringIO()
    for table in formats.comparison_tables(response):
        Console(file=out, width=200, no_color=True).print(table)
    row = next(line for line in out.getvalue().splitlines() if "prefix_cache_hit_percent" in line and "%" in line)
    assert "80.0%" in row and "35.5%" in row and "-44.5 pt" in row
    assert f"prefix_cache_hit_percent: {NOT_JUDGED}" in out.getvalue()


def test_ttfo_is_in_the_compare_table_of_reasoning_runs() -> None:
    [c] = compare_runs(run("b", stage(ttfo=3000.0)), [run("o", stage(ttfo=3010.0))], 10.0)
    response = compare_message(Comparison("b", 95.0, [c]))
    assert isinstance(response, run_service_pb2.CompareRunsResponse)
    out = StringIO()
    for table in formats.comparison_tables(response):
        Console(file=out, width=200, no_color=True).print(table)
    text = out.getvalue()
    assert "ttfo_p50_ms" in text and "ttfo_p99_ms" in text and "ttfr_p50_ms" in text


def test_a_series_history_reads_them_only_from_stages_that_have_them() -> None:
    from controller.domain.baselines import _figure

    ttfo, hit = METRICS_BY_NAME["ttfo_p99_ms"], METRICS_BY_NAME["prefix_cache_hit_percent"]
    assert _figure(ttfo, stage()) == (None, None)  # TTFO of a plain run is TTFT: not a point
    reasoning = stage(ttfo=3000.0)
    value, ci = _figure(ttfo, reasoning)
    assert value == reasoning.ttfo.p99_ms == 6000.0 and ci == reasoning.ttfo.p99_ci
    assert _figure(hit, stage()) == (None, None)
    assert _figure(hit, stage(hit=0.0)) == (0.0, None)  # reported: 0 % is a value
