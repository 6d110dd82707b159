"""The rules of `runs compare` (docs/metrics.md, "Comparing runs") on results built by hand:
the difference's interval and p-value from the sides' intervals, Holm over a run's comparison,
each outcome, the data needed to decide, open and missing intervals, the error rate's
tolerance in points, groups, and how outcomes sum up to stages, runs and the response."""

from __future__ import annotations

import math
from io import StringIO

import pytest
from rich.console import Console

from client import exitcodes, formats
from common.proto.loadtest.v1 import run_pb2, run_service_pb2
from common.stats import normal_two_sided_p, z_value
from controller.domain.results.compare import (
    METRICS,
    METRICS_BY_NAME,
    Comparison,
    Metric,
    MetricDelta,
    compare_runs,
)
from controller.domain.results.difference import Estimate, Outcome, data_needed, holm, values_to_bound_quantile
from controller.servicers.convert import compare_message

pytestmark = pytest.mark.timeout(10)
Z = z_value(95.0)
TTFT_P50 = METRICS_BY_NAME["ttft_p50_ms"]
TTFT_P99 = METRICS_BY_NAME["ttft_p99_ms"]


def interval(value: float, se: float, low_open: bool = False, high_open: bool = False) -> run_pb2.Interval:
    """A 95 % interval whose standard error is `se`."""
    return run_pb2.Interval(low=value - Z * se, high=value + Z * se, low_open=low_open, high_open=high_open)


def stage(
    ttft_p50: float = 100.0,
    se: float = 1.0,
    requests: int = 1000,
    concurrency: int = 8,
    index: int = 0,
    repeats: int = 0,
) -> run_pb2.StageResult:
    """A stage with a TTFT median of `ttft_p50` whose interval has standard error `se`."""
    s = run_pb2.StageResult(index=index, concurrency=concurrency, requests_ok=requests, repeats=repeats)
    s.ttft.count = requests
    s.ttft.p50_ms = ttft_p50
    s.ttft.p50_ci.CopyFrom(interval(ttft_p50, se))
    return s


def result(run_id: str, *stages: run_pb2.StageResult, group: bool = False) -> run_pb2.RunResult:
    r = run_pb2.RunResult(run_id=run_id, stages=list(stages), confidence_percent=95.0)
    if group:
        r.group.id = run_id
    return r


def one(
    base: run_pb2.StageResult,
    other: run_pb2.StageResult,
    metric: Metric = TTFT_P50,
    tolerance: float = 10.0,
    confidence: float = 95.0,
    base_group: bool = False,
    other_group: bool = False,
) -> MetricDelta:
    [comparison] = compare_runs(
        result("b", base, group=base_group), [result("o", other, group=other_group)], tolerance, confidence, [metric]
    )
    [compared] = comparison.stages
    [delta] = compared.metrics
    return delta


def test_the_difference_has_a_normal_interval_and_p_value_from_the_sides_intervals() -> None:
    # Standard errors 1 and 2: the difference's is sqrt(5); its interval at 90 % uses z(90).
    d = one(stage(100.0, se=1.0), stage(112.0, se=2.0), confidence=90.0)
    assert (d.baseline, d.value, d.delta, d.delta_percent) == (100.0, 112.0, 12.0, 12.0)
    assert d.delta_ci is not None
    assert d.delta_ci == pytest.approx((12 - z_value(90) * math.sqrt(5), 12 + z_value(90) * math.sqrt(5)))
    assert d.p_value == pytest.approx(normal_two_sided_p(12 / math.sqrt(5)))
    assert d.p_adjusted == d.p_value  # a family of one
    assert d.outcome == Outcome.REGRESSED and d.regressed and d.requests_needed == 0 and d.note == ""


def test_a_stored_interval_of_another_level_gives_the_same_standard_error() -> None:
    base, other = stage(100.0), stage(112.0)
    base.ttft.p50_ci.low, base.ttft.p50_ci.high = 100 - z_value(80) * 1.0, 100 + z_value(80) * 1.0
    baseline = result("b", base)
    baseline.confidence_percent = 80.0
    [comparison] = compare_runs(baseline, [result("o", other)], 10.0, 95.0, [TTFT_P50])
    assert comparison.stages[0].metrics[0].p_value == pytest.approx(normal_two_sided_p(12 / math.sqrt(2)))


@pytest.mark.parametrize(
    ("value", "se", "outcome"),
    [
        (112.0, 1.0, Outcome.REGRESSED),  # worse by 12 % > 10 %, p ~ 1e-17
        (109.0, 1.0, Outcome.INCONCLUSIVE),  # within 10 %, but the interval's worse end 11.8 % is not
        (105.0, 1.0, Outcome.NO_REGRESSION),  # worse end 7.8 %: a regression beyond 10 % is ruled out
        (112.0, 10.0, Outcome.INCONCLUSIVE),  # beyond 10 % but not told from noise (p 0.40)
        (85.0, 1.0, Outcome.IMPROVED),  # better by 15 %, p tiny
        (88.0, 10.0, Outcome.INCONCLUSIVE),  # better by 12 %, but noise hides +15.7 %
        (95.0, 1.0, Outcome.NO_REGRESSION),  # better by 5 %: within the tolerance
    ],
)
def test_the_outcome_needs_both_the_tolerance_and_significance(value: float, se: float, outcome: Outcome) -> None:
    assert one(stage(100.0, se=se), stage(value, se=se)).outcome == outcome


def test_throughput_is_worse_down() -> None:
    def with_throughput(value: float) -> run_pb2.StageResult:
        s = stage()
        s.request_throughput = value
        s.request_throughput_ci.CopyFrom(interval(value, 0.5))
        return s

    metric = METRICS_BY_NAME["request_throughput"]
    assert one(with_throughput(50.0), with_throughput(40.0), metric).outcome == Outcome.REGRESSED
    assert one(with_throughput(50.0), with_throughput(60.0), metric).outcome == Outcome.IMPROVED


def test_requests_needed_to_rule_out_a_regression() -> None:
    # d = 9 within the tolerance 10: ruled out once z * se_d <= 1, se_d^2 = (1 * 1000 + 1 * 1000) / N.
    d = one(stage(100.0, se=1.0), stage(109.0, se=1.0))
    assert d.outcome == Outcome.INCONCLUSIVE
    assert d.requests_needed == math.ceil(2000 / (1 / Z) ** 2) == 7683
    # Unequal stages: each side's se^2 * n is what more requests divide.
    d = one(stage(100.0, se=1.0, requests=4000), stage(109.0, se=2.0, requests=250))
    assert d.requests_needed == math.ceil((1 * 4000 + 4 * 250) / (1 / Z) ** 2)


def test_requests_needed_to_show_a_regression() -> None:
    # d = 12 beyond the tolerance, p = 0.40: significant once 12 / se_d reaches z (family of one).
    d = one(stage(100.0, se=10.0), stage(112.0, se=10.0))
    assert d.outcome == Outcome.INCONCLUSIVE and d.repeats_needed == 0
    assert d.requests_needed == math.ceil(2 * 100 * 1000 / (12 / Z) ** 2)
    # Re-judged with the requests it asked for (the standard errors shrunk as 1 / sqrt(n)):
    # decided, and a tenth fewer would not be.
    n = d.requests_needed
    shrunk = 10.0 * math.sqrt(1000 / n)
    assert one(stage(100.0, se=shrunk, requests=n), stage(112.0, se=shrunk, requests=n)).regressed
    fewer = 10.0 * math.sqrt(1000 / (0.9 * n))
    assert one(stage(100.0, se=fewer), stage(112.0, se=fewer)).outcome == Outcome.INCONCLUSIVE


def test_a_change_at_the_tolerance_cannot_be_decided() -> None:
    d = one(stage(100.0, se=1.0), stage(110.0, se=1.0))
    assert d.outcome == Outcome.INCONCLUSIVE and d.requests_needed == 0
    assert d.note == "the change lies at the tolerance: more data would not decide it"
    d = one(stage(100.0, se=1.0), stage(109.99999999, se=1.0))
    assert d.outcome == Outcome.INCONCLUSIVE and d.requests_needed == 0
    assert d.note == "the change is too close to the tolerance for any practical amount of data"


def test_holm_adjusts_in_step_down_order() -> None:
    # Sorted 0.005, 0.01, 0.03, 0.04: times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> monotone 0.06.
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []


def test_holm_takes_every_judged_metric_of_every_stage_as_one_family() -> None:
    # Each stage alone: d = 12 at p = 0.02. Two stages: adjusted 0.04 (regressed), three: 0.06.
    se = 12 / z_value(98.0) / math.sqrt(2)
    for stages, adjusted, outcome in ((2, 0.04, Outcome.REGRESSED), (3, 0.06, Outcome.INCONCLUSIVE)):
        base = [stage(100.0, se=se, concurrency=c, index=c) for c in range(1, stages + 1)]
        other = [stage(112.0, se=se, concurrency=c, index=c) for c in range(1, stages + 1)]
        [comparison] = compare_runs(result("b", *base), [result("o", *other)], 10.0, 95.0, [TTFT_P50])
        deltas = [m for s in comparison.stages for m in s.metrics]
        assert [m.p_value for m in deltas] == pytest.approx([0.02] * stages)
        assert [m.p_adjusted for m in deltas] == pytest.approx([adjusted] * stages)
        assert {m.outcome for m in deltas} == {outcome}
    # The critical z of the family's first step (0.05 / 3) sets the requests a regression needs.
    assert deltas[0].requests_needed == math.ceil(2 * se**2 * 1000 / (12 / z_value(100 - 5 / 3)) ** 2)


def test_an_open_tail_percentile_of_a_group_asks_for_requests_per_run() -> None:
    # Three runs of 300 requests: each run's p99 is open, so the group's is; 900 in all would
    # be enough for one run, but each run needs 368.
    base, other = stage(), stage(requests=900, repeats=3)
    for s, value in ((base, 300.0), (other, 290.0)):
        s.ttft.p99_ms = value
        s.ttft.p99_ci.CopyFrom(interval(value, 2.0))
    other.ttft.count = 900
    other.ttft.p99_ci.high_open = True
    d = one(base, other, TTFT_P99, other_group=True)
    assert d.outcome == Outcome.INCONCLUSIVE and d.requests_needed == 368
    assert d.note == "o: each run's ~300 values cannot bound it above at 95 % (about 368 requests per run would)"


def test_each_compared_run_is_its_own_family() -> None:
    se = 12 / z_value(98.0) / math.sqrt(2)
    comparisons = compare_runs(
        result("b", stage(100.0, se)), [result(f"o{i}", stage(112.0, se)) for i in range(3)], 10.0
    )
    assert [c.stages[0].metrics[0].p_adjusted for c in comparisons] == pytest.approx([0.02] * 3)


def test_an_open_tail_percentile_is_inconclusive_with_the_requests_to_bound_it() -> None:
    base, other = stage(), stage()
    for s, value in ((base, 300.0), (other, 290.0)):
        s.ttft.p99_ms = value
        s.ttft.p99_ci.CopyFrom(interval(value, 2.0))
    other.ttft.count = other.requests_ok = 120
    other.ttft.p99_ci.high_open = True
    d = one(base, other, TTFT_P99)
    assert d.outcome == Outcome.INCONCLUSIVE and d.delta_ci is None and d.p_value == d.p_adjusted == 1.0
    assert d.requests_needed == values_to_bound_quantile(0.99, 95.0) == 368
    assert d.note == "o: 120 values cannot bound it above at 95 % (about 368 requests would)"
    # Values per request count: ITL has several per request, so fewer requests bound it.
    other.itl.count, other.itl.p50_ms = 4, 5.0
    other.itl.p50_ci.CopyFrom(run_pb2.Interval(low=4.0, high=6.0, low_open=True, high_open=True))
    base.itl.count, base.itl.p50_ms = 8000, 5.0
    base.itl.p50_ci.CopyFrom(interval(5.0, 0.01))
    other.requests_ok = 1
    d = one(base, other, METRICS_BY_NAME["itl_p50_ms"])
    assert d.requests_needed == math.ceil(values_to_bound_quantile(0.5, 95.0) * 1 / 4) == 2
    assert "cannot bound it below or above" in d.note


def test_the_open_metric_leaves_the_family() -> None:
    base, other = stage(100.0, se=1.0), stage(112.0, se=1.0)
    for s in (base, other):
        s.ttft.p99_ms = 500.0
        s.ttft.p99_ci.CopyFrom(interval(500.0, 5.0, high_open=True))
    [comparison] = compare_runs(result("b", base), [result("o", other)], 10.0, 95.0, [TTFT_P50, TTFT_P99])
    p50, p99 = comparison.stages[0].metrics
    assert p50.p_adjusted == p50.p_value and p99.outcome == Outcome.INCONCLUSIVE
    assert comparison.stages[0].outcome == Outcome.REGRESSED  # the worst of its metrics


def test_a_missing_interval_says_why() -> None:
    other = stage(112.0)
    other.ttft.ClearField("p50_ci")
    d = one(stage(), other)
    assert d.outcome == Outcome.INCONCLUSIVE and d.note == "o: no interval (too little data)"
    assert d.requests_needed == values_to_bound_quantile(0.5, 95.0)
    old = run_pb2.RunResult(run_id="old", stages=[other])  # stored before results carried intervals
    [comparison] = compare_runs(result("b", stage()), [old], 10.0, 95.0, [TTFT_P50])
    assert comparison.stages[0].metrics[0].note == "old: its result has no intervals (computed before they existed)"


def test_a_rate_of_a_short_stage_asks_for_its_seconds() -> None:
    metric = METRICS_BY_NAME["request_throughput"]
    base = stage(requests=1000)
    base.duration_s, base.request_throughput = 10.0, 100.0
    base.request_throughput_ci.CopyFrom(interval(100.0, 2.0))
    short = stage(requests=150)
    short.duration_s, short.request_throughput = 1.5, 100.0  # too short for a rate's interval
    d = one(base, short, metric)
    assert (
        d.outcome == Outcome.INCONCLUSIVE and d.note == "o: no interval (a rate needs 3 s of the stage, it ran 1.5 s)"
    )
    assert d.requests_needed == 300  # 3 s at the 100 requests a second it ran


def test_a_regression_the_range_excludes_is_ruled_out() -> None:
    metric = METRICS_BY_NAME["request_throughput"]
    short = stage(requests=150)
    short.duration_s, short.request_throughput = 1.5, 100.0  # no interval
    # Throughput cannot fall below 0: a drop beyond 100 % of the baseline is impossible.
    d = one(short, short, metric, tolerance=100.0)
    assert d.outcome == Outcome.NO_REGRESSION and d.requests_needed == 0
    assert d.note == "a change for the worse beyond the tolerance is outside the figure's range"
    assert one(short, short, metric, tolerance=99.0).outcome == Outcome.INCONCLUSIVE
    # A judged but undecided change, the same way: an error rate cannot rise above 100 %.
    errors = METRICS_BY_NAME["error_rate"]
    noisy = error_stage(950, 1000)
    noisy.error_rate_ci.CopyFrom(interval(0.95, 0.05))
    assert one(noisy, noisy, errors, tolerance=6.0).outcome == Outcome.NO_REGRESSION
    assert one(noisy, noisy, errors, tolerance=4.0).outcome == Outcome.INCONCLUSIVE


def test_a_metric_neither_side_has_is_not_compared() -> None:
    [comparison] = compare_runs(result("b", stage()), [result("o", stage())], 10.0, 95.0, METRICS)
    names = [m.metric for m in comparison.stages[0].metrics]
    assert "tpot_p50_ms" not in names and "itl_p50_ms" not in names and "ttft_p50_ms" in names
    assert "error_rate" in names and "request_throughput" in names  # rates always have a value


def error_stage(failed: int, requests: int = 1000) -> run_pb2.StageResult:
    s = stage()
    s.requests_ok, s.requests_failed = requests - failed, failed
    s.error_rate = failed / requests
    # A symmetric interval of the binomial standard error (a floor at 0 failures).
    se = max(math.sqrt(s.error_rate * (1 - s.error_rate) / requests), 1 / requests)
    s.error_rate_ci.CopyFrom(interval(s.error_rate, se))
    return s


def test_the_error_rate_tolerance_counts_percentage_points() -> None:
    metric = METRICS_BY_NAME["error_rate"]
    # 0 % -> 3 %: no percent of a zero baseline; 3 points are within --tolerance 10 (points).
    d = one(error_stage(0), error_stage(30), metric, tolerance=10.0)
    assert d.delta_percent == 0.0 and d.delta == pytest.approx(0.03) and d.outcome == Outcome.NO_REGRESSION
    # ... and beyond --tolerance 1, significant: a regression.
    assert one(error_stage(0), error_stage(30), metric, tolerance=1.0).outcome == Outcome.REGRESSED
    # 0 % -> 2 % of 100 requests with --tolerance 1: beyond it, but p = 0.25.
    d = one(error_stage(0, 100), error_stage(2, 100), metric, tolerance=1.0)
    assert d.outcome == Outcome.INCONCLUSIVE and d.requests_needed > 100
    # 0 % -> 0 %: no change, its interval inside the points.
    assert one(error_stage(0), error_stage(0), metric, tolerance=1.0).outcome == Outcome.NO_REGRESSION
    # A result from before the error_rate field: read from the counts.
    old = stage()
    old.requests_failed = 10
    assert metric.value(old) == pytest.approx(10 / 1010)


def test_a_group_side_counts_repeats() -> None:
    # The baseline a single run (se 0.3, stays as it is), the other a group of 3 runs (se 1).
    d = one(stage(100.0, se=0.3), stage(109.0, se=1.0, repeats=3), other_group=True)
    assert d.outcome == Outcome.INCONCLUSIVE and d.requests_needed == 0
    assert d.repeats_needed == math.ceil(3 / ((1 / Z) ** 2 - 0.09)) == 18
    # Two groups: both narrow with repeats.
    d = one(stage(100.0, se=1.0, repeats=3), stage(109.0, se=1.0, repeats=5), base_group=True, other_group=True)
    assert d.repeats_needed == math.ceil((3 + 5) / (1 / Z) ** 2)
    # The single run alone is noisier than the target: no number of repeats of the group decides.
    d = one(stage(100.0, se=2.0), stage(109.0, se=1.0, repeats=3), other_group=True)
    assert d.outcome == Outcome.INCONCLUSIVE and d.repeats_needed == 0 and d.requests_needed == 0
    assert d.note == "the single run's own noise is too large: repeat it as a group too"
    # A group of one counted run has no interval yet: two repeats would give it one.
    lone = stage(109.0, repeats=1)
    lone.ttft.ClearField("p50_ci")
    d = one(stage(), lone, other_group=True)
    assert (d.repeats_needed, d.requests_needed) == (2, 0)
    assert d.note == "o: no interval (a group needs 2 counted runs for one)"


def test_data_needed() -> None:
    assert data_needed(1.0, [Estimate(0, 2.0, 100), Estimate(0, 2.0, 100)]) == 800
    assert data_needed(1.0, [Estimate(0, 2.0, 100, scales=False), Estimate(0, 0.5, 10)]) == 0
    assert data_needed(0.0, [Estimate(0, 2.0, 100)]) == 0
    assert data_needed(1e-9, [Estimate(0, 2.0, 100)]) == 0  # beyond any answer


def test_two_exact_figures() -> None:
    assert one(stage(100.0, se=0.0), stage(100.0, se=0.0)).outcome == Outcome.NO_REGRESSION
    d = one(stage(100.0, se=0.0), stage(111.0, se=0.0))
    assert d.outcome == Outcome.REGRESSED and d.p_value == 0.0


def test_outcomes_sum_up_worst_first() -> None:
    inconclusive = stage(109.0, concurrency=2, index=1)
    regressed = stage(112.0, concurrency=4, index=2)
    improved = stage(80.0, concurrency=8, index=3)
    base = [stage(100.0, concurrency=c, index=i) for i, c in ((1, 2), (2, 4), (3, 8))]
    runs = compare_runs(
        result("b", *base),
        [result("o1", improved), result("o2", inconclusive, improved), result("o3", regressed, inconclusive)],
        10.0,
        95.0,
        [TTFT_P50],
    )
    assert [s.outcome for s in runs[0].stages] == [Outcome.NO_REGRESSION]  # an improvement is no regression
    assert [r.outcome for r in runs] == [Outcome.NO_REGRESSION, Outcome.INCONCLUSIVE, Outcome.REGRESSED]
    assert [r.regressed for r in runs] == [False, False, True]
    assert Comparison("b", 95.0, runs).outcome == Outcome.REGRESSED
    assert Comparison("b", 95.0, runs[:2]).outcome == Outcome.INCONCLUSIVE
    assert Comparison("b", 95.0, runs[:1]).outcome == Outcome.NO_REGRESSION
    assert Comparison("b", 95.0, []).outcome == Outcome.UNSPECIFIED


def test_the_message_carries_every_field_and_the_exit_code_follows_the_outcome() -> None:
    runs = compare_runs(result("b", stage(100.0, se=10.0)), [result("o", stage(112.0, se=10.0))], 10.0, 90.0)
    message = compare_message(Comparison("b", 90.0, runs))
    assert message.confidence_percent == 90.0 and message.baseline_run_id == "b"
    assert message.outcome == run_service_pb2.COMPARE_OUTCOME_INCONCLUSIVE
    [c] = message.comparisons
    assert c.outcome == run_service_pb2.COMPARE_OUTCOME_INCONCLUSIVE and not c.regressed
    assert c.stages[0].outcome == run_service_pb2.COMPARE_OUTCOME_INCONCLUSIVE
    [m] = [m for m in c.stages[0].metrics if m.metric == "ttft_p50_ms"]
    [domain] = [m for m in runs[0].stages[0].metrics if m.metric == "ttft_p50_ms"]
    assert domain.delta_ci is not None
    assert (m.delta_ci.low, m.delta_ci.high) == domain.delta_ci
    assert (m.p_value, m.p_adjusted, m.requests_needed) == (domain.p_value, domain.p_adjusted, domain.requests_needed)
    assert m.outcome == run_service_pb2.COMPARE_OUTCOME_INCONCLUSIVE and m.requests_needed > 1000
    unjudged = next(m for m in c.stages[0].metrics if m.metric == "request_throughput")
    assert not unjudged.HasField("delta_ci") and unjudged.note
    assert formats.compare_exit_code(message) == exitcodes.INCONCLUSIVE
    regressed = compare_message(
        Comparison("b", 95.0, compare_runs(result("b", stage()), [result("o", stage(120.0))], 10.0, 95.0, [TTFT_P50]))
    )
    assert regressed.comparisons[0].stages[0].metrics[0].regressed
    assert formats.compare_exit_code(regressed) == exitcodes.FAILED
    fine = compare_message(
        Comparison("b", 95.0, compare_runs(result("b", stage()), [result("o", stage(101.0))], 10.0, 95.0, [TTFT_P50]))
    )
    assert formats.compare_exit_code(fine) == exitcodes.OK
    unmatched = compare_message(
        Comparison("b", 95.0, compare_runs(result("b", stage()), [result("o", stage(concurrency=3))], 10.0))
    )
    assert formats.compare_exit_code(unmatched) == exitcodes.USAGE


def test_the_domain_outcomes_are_the_api_enum() -> None:
    for outcome in Outcome:
        assert run_service_pb2.CompareOutcome.Name(outcome.value) == f"COMPARE_OUTCOME_{outcome.name}"  # type: ignore[arg-type]


def test_the_table_shows_inconclusive_with_the_data_needed_and_the_notes() -> None:
    other = stage(112.0, se=10.0)
    other.ttft.p99_ms = 300.0
    other.ttft.p99_ci.CopyFrom(interval(300.0, 3.0, high_open=True))
    runs = compare_runs(result("b", stage(100.0, se=10.0)), [result("o", other)], 10.0, 95.0, [TTFT_P50, TTFT_P99])
    message = compare_message(Comparison("b", 95.0, runs))
    out = StringIO()
    for table in formats.comparison_tables(message):
        Console(file=out, width=220, no_color=True).print(table)
    text = out.getvalue()
    p50 = next(line for line in text.splitlines() if "ttft_p50_ms" in line)
    needed = runs[0].stages[0].metrics[0].requests_needed
    assert f"inconclusive (needs ~{needed} requests)" in p50 and "+12.0% [" in p50
    assert "delta [interval]" in text and "p (adj.)" in text
    assert "o vs baseline b — inconclusive (95 % confidence)" in text
    assert "concurrency=8 ttft_p99_ms: b: no interval (too little data); o: 1000 values" in " ".join(text.split())
    d = runs[0].stages[0].metrics[1]
    assert d.note.startswith("b: no interval (too little data); o: 1000 values cannot bound it above")
