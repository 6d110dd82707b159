"""`runs compare` of capacity searches: the domain's comparison of capacities (a drop beyond the
tolerance is a regression), its API message, the table and the exit codes, from results built
by hand."""

from __future__ import annotations

import argparse
import asyncio
import io

import pytest
from rich.console import Console

from client import exitcodes, formats
from client.commands import _compare
from common.proto.loadtest.v1 import run_pb2, run_service_pb2
from controller.domain.results.compare import Comparison, compare_capacities, compare_runs
from controller.domain.results.difference import Outcome
from controller.servicers.convert import compare_message

pytestmark = pytest.mark.timeout(10)
C, R = run_pb2.SEARCH_VARIABLE_CONCURRENCY, run_pb2.SEARCH_VARIABLE_RATE


def stage(index: int, concurrency: int, ttft_p99: float) -> run_pb2.StageResult:
    p99_ci = run_pb2.Interval(low=ttft_p99 * 0.95, high=ttft_p99 * 1.05)
    return run_pb2.StageResult(
        index=index,
        concurrency=concurrency,
        requests_ok=100,
        ttft=run_pb2.LatencyStats(count=100, p99_ms=ttft_p99, p99_ci=p99_ci),
    )


def search(
    run_id: str,
    capacity: float | None,
    variable: int = C,
    stop: int = run_pb2.SEARCH_STOP_REASON_CONVERGED,
    confident: bool = True,
) -> run_pb2.RunResult:
    cap = run_pb2.CapacityResult(variable=variable, stop_reason=stop, confident=confident)  # type: ignore[arg-type]
    if capacity is not None:
        cap.highest_passing = capacity
    # Probes at the same loads in both runs, the one above capacity slow by design.
    return run_pb2.RunResult(
        run_id=run_id, capacity=cap, stages=[stage(0, 8, 100.0), stage(1, 64, 9000.0)], confidence_percent=95
    )


def plain(run_id: str, ttft_p99: float = 100.0) -> run_pb2.RunResult:
    return run_pb2.RunResult(run_id=run_id, stages=[stage(0, 8, ttft_p99)], confidence_percent=95)


@pytest.mark.parametrize(
    ("base", "value", "pct", "regressed"),
    [(24, 20, -16.7, True), (24, 22, -8.3, False), (24, 32, 33.3, False), (24, 24, 0.0, False)],
)
def test_a_capacity_drop_beyond_the_tolerance_is_a_regression(
    base: float, value: float, pct: float, regressed: bool
) -> None:
    delta = compare_capacities(search("b", base), search("o", value), 10.0)
    assert delta is not None
    assert (delta.baseline, delta.value, round(delta.delta_percent, 1), delta.regressed, delta.note) == (
        base,
        value,
        pct,
        regressed,
        "",
    )


def test_two_searches_compare_by_capacity_alone() -> None:
    # The probes at concurrency 64 differ wildly (overloaded): no stage regression is counted.
    other = search("o", 24)
    other.stages[1].ttft.p99_ms = 20000.0
    [comparison] = compare_runs(search("b", 24), [other], 10.0)
    assert comparison.stages == [] and comparison.capacity is not None and not comparison.regressed
    [comparison] = compare_runs(search("b", 24), [search("o", 16)], 10.0)
    assert comparison.regressed


def test_a_search_against_a_run_without_one_says_so_and_compares_stages() -> None:
    [comparison] = compare_runs(search("b", 24), [plain("o", ttft_p99=200.0)], 10.0)
    assert comparison.capacity is not None
    assert (
        comparison.capacity.note == "the baseline b is a capacity search, o is no capacity search: capacities "
        "not compared"
    )
    assert [s.load for s in comparison.stages] == ["concurrency=8"] and comparison.regressed  # TTFT p99 doubled
    [reverse] = compare_runs(plain("b"), [search("o", 24)], 10.0)
    assert reverse.capacity is not None and "the baseline b is no capacity search, o is a capacity search" in (
        reverse.capacity.note
    )


def test_runs_without_searches_have_no_capacity_comparison() -> None:
    [comparison] = compare_runs(plain("b"), [plain("o")], 10.0)
    assert comparison.capacity is None
    assert not compare_message(Comparison("b", 95.0, [comparison])).comparisons[0].HasField("capacity")


def test_a_drop_is_a_regression_only_when_both_searches_are_confident() -> None:
    for base_confident, confident in ((True, False), (False, True), (False, False)):
        delta = compare_capacities(
            search("b", 24, confident=base_confident), search("o", 20, confident=confident), 10.0
        )
        assert delta is not None and delta.outcome == Outcome.INCONCLUSIVE and not delta.regressed
    # No drop beyond the tolerance is no regression, confident or not; a rise is no improvement outcome.
    for value in (23, 32):
        delta = compare_capacities(search("b", 24, confident=False), search("o", value, confident=False), 10.0)
        assert delta is not None and delta.outcome == Outcome.NO_REGRESSION
    [comparison] = compare_runs(search("b", 24), [search("o", 20, confident=False)], 10.0)
    assert comparison.outcome == Outcome.INCONCLUSIVE and not comparison.regressed


@pytest.mark.parametrize(
    ("other", "note"),
    [
        (search("o", 24, variable=R), "the baseline searched concurrency, o rate: capacities not compared"),
        (
            search("o", 4, stop=run_pb2.SEARCH_STOP_REASON_GENERATOR_SATURATED),
            "no capacity measured by o: capacities not compared",
        ),
        (
            search("o", 16, stop=run_pb2.SEARCH_STOP_REASON_RUN_ENDED),
            "no capacity measured by o: capacities not compared",
        ),
    ],
)
def test_capacities_that_cannot_be_compared_say_why(other: run_pb2.RunResult, note: str) -> None:
    delta = compare_capacities(search("b", 24), other, 10.0)
    assert delta is not None and delta.note == note and not delta.regressed
    assert delta.outcome == Outcome.UNSPECIFIED  # not compared: nothing judged


def test_a_search_where_nothing_passed_any_more_is_a_regression() -> None:
    delta = compare_capacities(search("b", 24), search("o", None, stop=run_pb2.SEARCH_STOP_REASON_MIN_FAILED), 10.0)
    assert delta is not None and delta.value == 0 and delta.delta_percent == -100 and delta.regressed
    delta = compare_capacities(search("b", None, stop=run_pb2.SEARCH_STOP_REASON_MIN_FAILED), search("o", 4), 10.0)
    assert delta is not None and not delta.regressed and delta.note == ""


def response(baseline: run_pb2.RunResult, *others: run_pb2.RunResult) -> run_service_pb2.CompareRunsResponse:
    return compare_message(Comparison(baseline.run_id, 95.0, compare_runs(baseline, list(others), 10.0)))


def test_the_api_message_carries_the_capacities() -> None:
    message = response(search("b", 24), search("o", 20)).comparisons[0]
    assert message.regressed and message.capacity.regressed and not message.stages
    assert (message.capacity.baseline, message.capacity.value) == (24, 20)
    assert message.capacity.variable == C and round(message.capacity.delta_percent, 1) == -16.7
    saturated = response(search("b", 24), search("o", 4, stop=run_pb2.SEARCH_STOP_REASON_GENERATOR_SATURATED))
    assert saturated.comparisons[0].capacity.HasField("baseline")
    assert not saturated.comparisons[0].capacity.HasField("value")


def table_text(message: run_service_pb2.CompareRunsResponse) -> str:
    out = io.StringIO()
    for table in formats.comparison_tables(message):
        Console(file=out, width=160, no_color=True).print(table)
    return out.getvalue()


def test_the_comparison_table_shows_the_capacity_row() -> None:
    text = table_text(response(search("b", 24), search("o", 20)))
    row = next(line for line in text.splitlines() if "capacity" in line)
    assert row.replace("│", " ").split()[:6] == ["capacity", "concurrency", "24", "20", "-16.7%", formats.NA]
    assert "▲ regressed" in row
    assert "no stage matches" not in text
    text = table_text(response(search("b", 24), plain("o")))
    # The note is the caption (wrapped to the table's width), the row says to read it.
    assert "not compared (below)" in text and "concurrency=8" in text
    assert "the baseline b is a capacity search, o is no capacity search: capacities not compared" in " ".join(
        text.split()
    )


class FakeClient:
    """CompareRuns and GetResult of the results given, compared by the domain's code."""

    def __init__(self, *results: run_pb2.RunResult) -> None:
        self.results = {r.run_id: r for r in results}

    async def compare_runs(
        self, base: str, others: list[str], tolerance: float, confidence: float, metrics: list[str]
    ) -> run_service_pb2.CompareRunsResponse:
        comparisons = compare_runs(self.results[base], [self.results[o] for o in others], tolerance, confidence)
        return compare_message(Comparison(base, confidence, comparisons))

    async def get_result(self, run_id: str) -> run_pb2.RunResult:
        return self.results[run_id]


def exit_code(baseline: run_pb2.RunResult, other: run_pb2.RunResult) -> int:
    args = argparse.Namespace(
        run_id=baseline.run_id,
        others=[other.run_id],
        tolerance=10.0,
        confidence=95.0,
        metrics=[],
        json=False,
        all_metrics=False,
    )
    return asyncio.run(_compare(args, FakeClient(baseline, other)))  # type: ignore[arg-type]


def test_the_exit_code_of_compare(capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_code(search("b", 24), search("o", 23)) == exitcodes.OK
    assert exit_code(search("b", 24), search("o", 12)) == exitcodes.FAILED
    assert exit_code(search("b", 24), search("o", 12, confident=False)) == exitcodes.INCONCLUSIVE
    capsys.readouterr()
    saturated = search("o", 4, stop=run_pb2.SEARCH_STOP_REASON_GENERATOR_SATURATED)
    assert exit_code(search("b", 24), saturated) == exitcodes.USAGE  # nothing compared is no pass
    err = capsys.readouterr().err
    assert "error: no capacity measured by o" in err and "matches a stage" not in err


def test_a_search_and_a_run_with_no_matching_stage_says_both(capsys: pytest.CaptureFixture[str]) -> None:
    other = plain("o")
    other.stages[0].concurrency = 3
    assert exit_code(search("b", 24), other) == exitcodes.USAGE
    err = capsys.readouterr().err
    assert "error: the baseline b is a capacity search, o is no capacity search" in err
    assert "error: no stage of o matches a stage of b by load" in err and "b: concurrency=8, concurrency=64" in err
